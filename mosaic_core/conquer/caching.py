"""Caching across steps: DeepCache-style block-output reuse, alone or stacked with staging.

Pruning thins every step; caching skips work *between* steps: the output of a deep block
changes slowly from one denoising step to the next, so a "cached" step can reuse what the
block added to its input at the last full step instead of computing it (DeepCache, Ma et
al. 2024, reuses a UNet's deep features the same way; this is our block-level version,
written here, labelled "DeepCache-style" wherever it is reported; docs/method.md §9).

For each cached block i (every block of the family adapter's `block_paths`, in the order a
call runs them (`call_order`: a UNet's down, mid, up), except the first `keep_first` and
the last `keep_last`):

    full step k₀:    y_i = block_i(x_i),           r_i ← y_i − x_i   (stored)
    cached step k:   y_i = x_i + r_i                                   (block not run)

A full step runs every `interval` calls, and whenever the network about to run is not the
one whose residuals are stored (a staged model entering a new stage) or the batch shape
changed. In a sequential stack (DiT) the cached blocks a..b together add Σ rᵢ =
y_b − x_a of the full step: reusing each block's residual is reusing the span's. Per block
it is also family-neutral: a UNet's transformer blocks sit between resnets, and each maps
its hidden states to the same shape, so each keeps its own residual.

Cost (`cached_sampling_macs`): a cached step costs only the computed blocks' MACs;
`cache_schedule` says which steps are full, from the step count, the interval and which
network each step runs, by the same rule as the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence

import torch
from torch import nn

from mosaic_core.conquer.staged_denoiser import DenoiserWrapper, call_denoiser, distinct_networks
from mosaic_core.limits import shown


@dataclass(frozen=True)
class CacheConfig:
    """Block-output reuse: a full step every `interval` calls; the first/last blocks always run."""

    interval: int = 2
    keep_first: int = 1
    keep_last: int = 1

    def __post_init__(self) -> None:
        for name, low in (("interval", 1), ("keep_first", 0), ("keep_last", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 1000:
                raise ValueError(f"cache {name} must be a whole number in [{low}, 1000], got {shown(value)}")

    def cached_blocks(self, num_blocks: int) -> range:
        """Indices of the blocks that reuse their residual on cached steps (may be empty)."""
        return range(min(self.keep_first, num_blocks), max(num_blocks - self.keep_last, min(self.keep_first, num_blocks)))

    def label(self) -> str:
        """Short description for tables: interval and kept blocks."""
        return f"DeepCache-style, full every {self.interval}, first {self.keep_first}/last {self.keep_last} blocks always run"


def parse_cache(text: str | None) -> CacheConfig | None:
    """'2' or '2,1,1' (interval[,keep_first,keep_last]) -> CacheConfig; None/'' -> None."""
    if text is None or str(text).strip() in ("", "0", "off", "none"):
        return None
    parts = [part.strip() for part in str(text).split(",")]
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise ValueError(f"--cache must be INTERVAL or INTERVAL,KEEP_FIRST,KEEP_LAST (whole numbers), got {shown(text)}") from None
    if len(values) not in (1, 3):
        raise ValueError(f"--cache must be INTERVAL or INTERVAL,KEEP_FIRST,KEEP_LAST, got {shown(text)}")
    return CacheConfig(*values)


def cache_schedule(num_steps: int, interval: int, step_networks: Sequence[Hashable] | None = None) -> list[bool]:
    """Which steps are full (True) or cached (False): every `interval`-th, and each network change.

    `step_networks[k]` identifies the network step k runs (e.g. its kept counts); a step
    whose network differs from the last full step's is full (no residuals to reuse).
    """
    if step_networks is not None and len(step_networks) != num_steps:
        raise ValueError(f"step_networks must have one entry per step ({num_steps}), got {len(step_networks)}")
    full, cached_network = [], object()
    for k in range(num_steps):
        network = None if step_networks is None else step_networks[k]
        is_full = k % interval == 0 or network != cached_network
        if is_full:
            cached_network = network
        full.append(is_full)
    return full


def block_macs(network: nn.Module, shape, removed: Mapping[str, int] | None = None) -> list[int]:
    """Block-linear MACs of one call of each of `network`'s blocks, in call order (`call_order`):
    the groups each prunable layer of the network keeps, at the plan's cost per group
    (`shape`: a `TransformerShape`, whose blocks share one cost per head and per unit, or a
    `BlockwiseShape`, which has each layer's own). `removed` (layer name → groups) costs the
    network those removals would build, without building it."""
    from mosaic_core.divide.cost import group_macs_per_token
    from mosaic_core.divide.shapes import MLP_KINDS, BlockwiseShape
    from mosaic_core.models.adapters import adapter_for_model

    adapter = adapter_for_model(network)
    paths = adapter.block_paths(network)
    per_block = [0] * len(paths)
    if isinstance(shape, BlockwiseShape):
        cost = {layer.name: layer.macs_per_group for layer in shape.layers}
    for layer in adapter.prunable_layers(network):
        if isinstance(shape, BlockwiseShape):
            if layer.name not in cost:
                raise ValueError(f"layer {layer.name} of the network is not in the plan's cost shape")
            per_group = cost[layer.name]
        else:
            kind = "mlp" if layer.kind in MLP_KINDS else "attn"
            per_group = shape.num_tokens * group_macs_per_token(kind, shape.hidden_size, shape.head_dim)
        per_block[layer.block] += (layer.num_groups - (removed or {}).get(layer.name, 0)) * per_group
    index = {path: i for i, path in enumerate(paths)}
    return [per_block[index[path]] for path in adapter.call_order(network)]


def computed_share(config: CacheConfig, macs: Sequence[int]) -> float:
    """The share of a call's block-linear MACs that a cached call still computes: its blocks
    that run, weighted by `macs` (each block's, in call order; equal MACs give blocks run /
    all blocks)."""
    total = float(sum(macs))
    if total <= 0:
        return 1.0
    return 1.0 - sum(macs[i] for i in config.cached_blocks(len(macs))) / total


def cached_sampling_macs(step_macs: Sequence[int], full: Sequence[bool], computed_fraction: Sequence[float] | float) -> int:
    """Σ_k MACs of step k: all of it on full steps, `computed_fraction` of it on cached ones.

    For a homogeneous stack the computed fraction of a step is (blocks run) / (all blocks),
    since every block of one network costs the same.
    """
    fractions = [computed_fraction] * len(step_macs) if isinstance(computed_fraction, (int, float)) else list(computed_fraction)
    return int(round(sum(m if f else m * c for m, f, c in zip(step_macs, full, fractions))))


def _fits(residual: torch.Tensor | None, x: torch.Tensor | None) -> bool:
    """Whether a stored residual can be added to this call's stream (None: the block returned none)."""
    return residual is None or (x is not None and residual.shape == x.shape)


def _residual(out: Any, streams: tuple, path: str):
    """What block `path` added on a full step: y − x for a block that returns its new hidden
    states, (y_enc − x_enc, y − x) for a joint block's (encoder_hidden_states, hidden_states)
    (None where the block returns no context, as SD3's last block). Any other output is
    refused: the block would run on every step while its MACs were counted as saved."""
    encoder, hidden = streams
    if torch.is_tensor(out) and out.shape == hidden.shape:
        return out - hidden
    if (
        isinstance(out, tuple) and len(out) == 2 and torch.is_tensor(out[1]) and out[1].shape == hidden.shape
        and (out[0] is None or (torch.is_tensor(encoder) and out[0].shape == encoder.shape))
    ):
        return (None if out[0] is None else out[0] - encoder, out[1] - hidden)
    form = type(out).__name__ if not isinstance(out, tuple) else f"a tuple of {len(out)}"
    raise ValueError(
        f"block {path} returns {form}, not its hidden states (or a joint block's (encoder_hidden_states, "
        "hidden_states) called by keyword): DeepCache-style reuse cannot skip it; drop --cache for this model"
    )


class BlockReuse(DenoiserWrapper):
    """Wraps a denoiser (dense or staged) with DeepCache-style block-output reuse (see module doc).

    Calls are counted from `reset()`; a call whose timestep is not below the previous one
    starts a new trajectory (and resets). `history` records, per call, whether it was full.
    With `enabled=False` every call runs the wrapped denoiser unchanged.
    """

    def __init__(self, denoiser: nn.Module, config: CacheConfig = CacheConfig(), enabled: bool = True) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.cache_config = config
        self.enabled = enabled
        self.history: list[bool] = []
        self._residuals: dict[int, Any] = {}  # block index -> residual, or a joint block's (context, image) pair
        self._network: int | None = None  # id of the network whose residuals are stored
        self._last_timestep: float | None = None
        self._calls = 0
        self._full = True

    def reset(self) -> None:
        """Forget residuals and the call count: the next call is full."""
        self._residuals.clear()
        self._network, self._last_timestep, self._calls = None, None, 0
        self.history.clear()

    def _wrap(self, index: int, path: str, forward):
        def cached_forward(hidden_states, *args, **kwargs):
            # A joint block (SD3, Flux) takes both streams and returns (encoder_hidden_states,
            # hidden_states); every other block maps hidden_states to its new value.
            streams = (kwargs.get("encoder_hidden_states"), hidden_states)
            if not self._full and index in self._residuals:
                residual = self._residuals[index]
                if isinstance(residual, tuple):
                    if all(_fits(r, x) for r, x in zip(residual, streams)):
                        return tuple(None if r is None else x + r for r, x in zip(residual, streams))
                elif residual.shape == hidden_states.shape:
                    return hidden_states + residual
                self._full = True  # the batch changed shape: this call computes (and stores) instead
            out = forward(hidden_states, *args, **kwargs)
            if self._full and self._network is not None:
                self._residuals[index] = _residual(out, streams, path)
            return out

        return cached_forward

    def forward(self, hidden_states: torch.Tensor, timestep=None, *args: Any, return_dict: bool = True, **kwargs: Any):
        """The wrapped denoiser's call, with the cached blocks reusing residuals on cached steps."""
        from mosaic_core.models.adapters import adapter_for_model

        if not self.enabled:
            return call_denoiser(self.denoiser, hidden_states, timestep, args, return_dict, kwargs)
        t = float(torch.as_tensor(timestep).reshape(-1)[0]) if timestep is not None else None
        if t is not None and self._last_timestep is not None and t >= self._last_timestep:
            self.reset()  # timesteps went up: a new trajectory
        self._last_timestep = t
        self._full = self._calls % self.cache_config.interval == 0
        # The network this call runs (staged: the stage's); residuals of another are useless.
        stage_of = getattr(self.denoiser, "stage_index", None)
        running = self.denoiser
        if callable(stage_of) and timestep is not None:
            stages = sorted(set(stage_of(torch.as_tensor(timestep).detach().cpu()).reshape(-1).tolist()))
            running = self.denoiser.networks()[stages[0]] if len(stages) == 1 else None
        if running is None or id(running) != self._network:
            self._full = True
        if self._full:
            self._residuals.clear()
            self._network = None if running is None else id(running)  # None: a mixed batch stores nothing
        patched: dict[int, nn.Module] = {}
        try:
            for network in distinct_networks(self.denoiser):
                paths = adapter_for_model(network).call_order(network)
                for index in self.cache_config.cached_blocks(len(paths)):
                    block = network.get_submodule(paths[index])
                    if id(block) not in patched:  # a block shared by two networks is patched once
                        block.forward = self._wrap(index, paths[index], block.forward)
                        patched[id(block)] = block
            out = call_denoiser(self.denoiser, hidden_states, timestep, args, return_dict, kwargs)
        finally:
            for block in patched.values():
                del block.forward  # back to the class's forward
        self.history.append(self._full)
        self._calls += 1
        return out


def centred_config(num_blocks: int, cached: int, interval: int) -> CacheConfig:
    """`cached` consecutive middle blocks reuse their residuals (the deep ones), every `interval` steps full."""
    if not 0 <= cached <= num_blocks:
        raise ValueError(f"cached blocks must be in [0, {num_blocks}], got {cached}")
    keep_first = (num_blocks - cached) // 2
    return CacheConfig(interval, keep_first, num_blocks - cached - keep_first)


def match_cache_to_macs(
    num_blocks: int, step_macs: Sequence[int], target_macs: float, step_networks: Sequence[Hashable] | None = None,
    within: bool = False, macs_by_block: Sequence[int] | dict[Hashable, Sequence[int]] | None = None,
) -> tuple[CacheConfig, int] | None:
    """The centred reuse setting (interval 2..5, 1..L−2 cached blocks) whose MACs come closest to `target_macs`.

    Intervals stay in DeepCache's usual 2..5: longer ones match a budget by skipping few
    blocks for many steps, which drifts further from the trajectory. Ties go to the
    shorter interval. With `within`, only settings at or under `target_macs` count (the
    closest from below; None when even the most caching costs more).

    Returns the setting and its MACs (`cached_sampling_macs`). A cached step computes the
    `computed_share` of its MACs: by `macs_by_block` (`block_macs` of every block in call
    order: one list for every step, or one per network of `step_networks`), or, without
    it, blocks run / all blocks, which is exact only when every block costs the same.
    """
    if macs_by_block is None:
        macs_by_block = [1] * num_blocks
    if isinstance(macs_by_block, dict):
        if step_networks is None:
            raise ValueError("MACs per block by network need the network of every step (step_networks)")
        per_step = [macs_by_block[network] for network in step_networks]
    else:
        per_step = [macs_by_block] * len(step_macs)
    if any(len(macs) != num_blocks for macs in per_step):
        raise ValueError(f"MACs per block must list all {num_blocks} blocks")
    best: tuple[float, CacheConfig, int] | None = None
    for interval in range(2, 6):
        full = cache_schedule(len(step_macs), interval, step_networks)
        for cached in range(1, max(2, num_blocks - 1)):
            config = centred_config(num_blocks, min(cached, num_blocks), interval)
            macs = cached_sampling_macs(step_macs, full, [computed_share(config, m) for m in per_step])
            if within and macs > target_macs:
                continue
            gap = abs(macs - target_macs)
            if best is None or gap < best[0]:
                best = (gap, config, macs)
    if best is None:
        if within:
            return None
        raise AssertionError("no reuse setting was tried")
    return best[1], best[2]
