"""cache-dit's DBCache on a diffusers DiT: the caching library people use, as a contender.

cache-dit (PyPI, pinned in requirements.txt) caches across steps at run time. Its DBCache
mode runs the first `fn` blocks of every step; when the relative L1 change of what they
added, against the last step that ran in full, is below `threshold`, the middle blocks do
not run and their cached residual is added instead (the last `bn` blocks always run).
The first `warmup` steps always run in full. Which steps skip is decided by the data, so
the cost of a run is only known after it: `CacheDiT` counts the blocks that ran.

It drives diffusers' `DiTTransformer2DModel` through cache-dit's own DiT patch (its
`DiTPatchFunctor`: diffusers' forward reads the first block's embedder, which cache-dit's
block wrapper would hide), and a staged denoiser of DiT networks with one cache-dit context
per stage network: pruning thins every step, caching skips work across steps. cache-dit
rewires the model it is given, so `CacheDiT` hands it a copy whose modules are new and
whose parameters are the original's: no weight memory is added and the original keeps its
forward. docs/method.md §9.

Block-linear MACs of a run: a trajectory of n calls costs the MACs of the blocks that ran,
each at its own (pruned) width, against n calls of the dense network (eq. 9.3).
"""

from __future__ import annotations

import copy
import functools
import math
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Generator, Sequence

import torch
from torch import nn

from mosaic_core.conquer.staged_denoiser import DenoiserWrapper, call_denoiser, distinct_networks
from mosaic_core.limits import shown

CACHE_DIT_VERSION = "1.5.3"
SEARCH_RANGE = (1e-3, 1.0)  # thresholds `threshold_search` bisects, geometrically
SEARCH_PROBES = 10  # its default runs: the last interval spans 0.7 % of the threshold
# `bench`'s second search, on the quality images: a factor REFINE_SPAN either side of the
# first search's threshold, REFINE_PROBES runs (the last interval spans 2.2 % of the threshold)
REFINE_SPAN = 2.0
REFINE_PROBES = 6


@dataclass(frozen=True)
class DBCacheSetting:
    """DBCache: residual-change `threshold`, `fn` first / `bn` last blocks always run, `warmup` full steps.

    `threshold` None: to be matched to a MACs target (`threshold_search`) before it runs.
    """

    threshold: float | None = 0.08
    fn: int = 1
    bn: int = 0
    warmup: int = 8

    def __post_init__(self) -> None:
        if self.threshold is not None and (
            isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not 0 <= self.threshold <= 10
        ):
            raise ValueError(f"cache-dit threshold must be a number in [0, 10], got {shown(self.threshold)}")
        for name, low in (("fn", 1), ("bn", 0), ("warmup", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 1000:
                raise ValueError(f"cache-dit {name} must be a whole number in [{low}, 1000], got {shown(value)}")

    def label(self) -> str:
        threshold = "matched" if self.threshold is None else f"{self.threshold:.3g}"
        return (f"cache-dit {CACHE_DIT_VERSION} DBCache F{self.fn}B{self.bn}, residual threshold {threshold}, "
                f"first {self.warmup} steps full; skipped steps decided per run, MACs as run")


def import_cache_dit():
    """The `cache_dit` module, or RuntimeError saying how to install it."""
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # read at its import; it logs each context to stdout (JSON output too)
    try:
        import cache_dit
    except ImportError as error:
        raise RuntimeError(
            f"the cache-dit row needs cache-dit=={CACHE_DIT_VERSION}: pip install -r requirements.txt "
            f"(it is pinned there beside torch, so pip cannot replace torch for it)"
        ) from error
    return cache_dit


def sharing_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` with new submodules and the same parameter and buffer tensors."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


def block_linear_macs(block: nn.Module) -> int:
    """Per-token MACs of a DiT block's prunable linears (attention q, k, v, out; MLP in, out):
    the cost model's 4·D·h·hd + 2·D·u for the block as it is (pruned or dense)."""
    total = 0
    for part in ("attn1", "ff"):
        for layer in getattr(block, part).modules():
            if isinstance(layer, nn.Linear):
                total += layer.in_features * layer.out_features
    return total


def _dit_class():
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return ()
    return DiTTransformer2DModel


def serves_cache_dit(dense: nn.Module, named: bool, what: str) -> bool:
    """Whether cache-dit can run on `dense` (a diffusers DiT). When it cannot: ValueError if
    `what` (e.g. "the cache-dit row") was asked for by name, else False (left out)."""
    if isinstance(dense, _dit_class()):
        return True
    if named:
        raise ValueError(
            f"{what} needs diffusers' DiTTransformer2DModel (cache-dit's DiT patch), this model's denoiser is "
            f"{type(dense).__name__}; the DeepCache-style block reuse serves every family"
        )
    return False


class CacheDiT(DenoiserWrapper):
    """A diffusers DiT, or a staged denoiser of DiT networks, with cache-dit's DBCache: a
    denoiser to sample like any other.

    Each distinct network gets its own cache-dit context (a staged model's stage networks
    differ, and a residual of one network is useless to another). A call whose timestep is
    not below the previous one starts a new trajectory: every context is refreshed, the
    network of that first call with `setting.warmup` full steps, the others with none (a
    network's first call has nothing cached, so it runs in full anyway). `trajectories`
    holds, per trajectory, [calls, MACs per token of the blocks that ran]; `dense` (default:
    the denoiser itself) is the network whose full call the shares are of.
    """

    def __init__(self, denoiser: nn.Module, setting: DBCacheSetting, num_inference_steps: int,
                 dense: nn.Module | None = None) -> None:
        super().__init__()
        dit = _dit_class()
        dense = denoiser if dense is None else dense
        for network in [dense, *distinct_networks(denoiser)]:
            if not isinstance(network, dit):
                raise ValueError(
                    "cache-dit rows serve diffusers' DiTTransformer2DModel (cache-dit's DiT patch), "
                    f"got {type(network).__name__}; the DeepCache-style `cache` rows serve every family"
                )
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a whole number ≥ 1, got {shown(num_inference_steps)}")
        if setting.threshold is None:
            raise ValueError("a cache-dit setting needs its threshold before it runs (threshold_search matches one to a MACs target)")
        cache_dit = import_cache_dit()
        from cache_dit import BlockAdapter, ForwardPattern
        from cache_dit.caching.patch_functors import DiTPatchFunctor

        self.setting = setting
        self.num_inference_steps = num_inference_steps
        self.dense_step_macs = sum(block_linear_macs(block) for block in dense.transformer_blocks)
        self.trajectories: list[list[int]] = []
        self._last_timestep: float | None = None
        model = sharing_copy(denoiser)
        networks = distinct_networks(model)
        for network in networks:
            for block in network.transformer_blocks:
                block.register_forward_pre_hook(functools.partial(self._ran, block_linear_macs(block)))
            adapter = BlockAdapter(
                transformer=network, blocks=network.transformer_blocks, forward_pattern=ForwardPattern.Pattern_3,
                patch_functor=DiTPatchFunctor(), check_forward_pattern=True,
            )
            cache_dit.enable_cache(adapter, cache_config=self._config(setting.warmup))
        self.denoiser = model  # the name wrappers hold their denoiser by (adapters.base.denoiser_adapter)
        self._networks = tuple(networks)  # not registered twice: they are submodules of `denoiser`

    def _config(self, warmup: int):
        from cache_dit import DBCacheConfig

        s = self.setting
        return DBCacheConfig(
            Fn_compute_blocks=s.fn, Bn_compute_blocks=s.bn, residual_diff_threshold=float(s.threshold),
            max_warmup_steps=warmup, num_inference_steps=self.num_inference_steps,
        )

    def _ran(self, macs: int, module, args) -> None:
        if self.trajectories:
            self.trajectories[-1][1] += macs

    def _first_network(self, timestep) -> nn.Module:
        stage_index = getattr(self.denoiser, "stage_index", None)
        if stage_index is None or timestep is None:
            return self.denoiser
        stage = int(stage_index(timestep.detach().cpu() if torch.is_tensor(timestep) else timestep).reshape(-1)[0])
        return self.denoiser.networks()[stage]

    def forward(self, hidden_states: torch.Tensor, timestep=None, *args: Any, return_dict: bool = True, **kwargs: Any):
        t = float(torch.as_tensor(timestep).reshape(-1)[0]) if timestep is not None else None
        if not self.trajectories or t is None or self._last_timestep is None or t >= self._last_timestep:
            first = self._first_network(timestep)
            cache_dit = import_cache_dit()
            for network in self._networks:
                cache_dit.refresh_context(network, cache_config=self._config(self.setting.warmup if network is first else 0))
            self.trajectories.append([0, 0])
        self._last_timestep = t
        self.trajectories[-1][0] += 1
        return call_denoiser(self.denoiser, hidden_states, timestep, args, return_dict, kwargs)

    def computed_fraction(self, trajectory: int = -1) -> float:
        """Block-linear MACs of a trajectory (the last by default) as a share of the dense network's at the same calls."""
        if not self.trajectories:
            raise ValueError("no trajectory sampled yet")
        calls, ran = self.trajectories[trajectory]
        return ran / (calls * self.dense_step_macs)


def probe_fraction(sample: Callable[[nn.Module], object], transformer: nn.Module, setting: DBCacheSetting, steps: int,
                   dense: nn.Module | None = None) -> float:
    """The computed share (of `dense`'s MACs) of one trajectory sampled by `sample(denoiser)` with `setting`."""
    row = CacheDiT(transformer, setting, steps, dense)
    sample(row)
    return row.computed_fraction()


def threshold_search(
    sample: Callable[[nn.Module], object],
    transformer: nn.Module,
    steps: int,
    target: float,
    base: DBCacheSetting = DBCacheSetting(),
    probes: int = SEARCH_PROBES,
    dense: nn.Module | None = None,
    bracket: tuple[float, float] | None = None,
) -> Generator[tuple[float, float], None, tuple[DBCacheSetting, float]]:
    """Search the DBCache threshold whose run by `sample` computes the largest share of the
    dense MACs (`dense`'s; default `transformer`'s) that is ≤ `target`; yields (threshold, share) after each probe and returns
    (`base` with that threshold, its share).

    Bisection on the threshold, geometric in [10⁻³, 1] (a larger threshold skips more; the
    thresholds that matter span decades, cache-dit's default is 0.08), `probes` runs: after k the
    interval spans a factor 1000^(1/2^k) (k = 7: 6 %; 10: 0.7 %). The run's share is a step
    function of the threshold with steps ~1 % apart (0.0703 kept 0.683 of digits-dit's MACs,
    0.071 only 0.667), so fewer probes can land a step below the target. Of equal shares the least threshold wins.
    `bracket` (low, high) narrows the interval, for a second search near a first one's answer.
    When no probe is within the target (the warm-up and the always-run blocks alone exceed
    it, or the bracket is too low), the interval's upper end is returned with its share.
    """
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ValueError(f"target must be a fraction of the dense MACs in (0, 1], got {shown(target)}")
    low, high = SEARCH_RANGE if bracket is None else (float(bracket[0]), float(bracket[1]))
    if not 0 < low < high <= 10:
        raise ValueError(f"bracket must be two thresholds 0 < low < high <= 10, got {shown(bracket)}")
    top = high
    best: tuple[DBCacheSetting, float] | None = None
    for _ in range(max(1, int(probes))):
        middle = math.sqrt(low * high)
        setting = replace(base, threshold=middle)
        fraction = probe_fraction(sample, transformer, setting, steps, dense)
        yield middle, fraction
        if fraction <= target + 1e-12:
            if best is None or fraction > best[1] or (fraction == best[1] and middle < best[0].threshold):
                best = (setting, fraction)
            high = middle
        else:
            low = middle
    if best is None:
        setting = replace(base, threshold=top)
        return setting, probe_fraction(sample, transformer, setting, steps, dense)
    return best


def match_threshold(sample, transformer, steps: int, target: float, base: DBCacheSetting = DBCacheSetting(), probes: int = SEARCH_PROBES,
                    dense: nn.Module | None = None):
    """`threshold_search` run to the end: (setting, share of the dense MACs it computed)."""
    from mosaic_core.jobs import run_to_end

    return run_to_end(threshold_search(sample, transformer, steps, target, base, probes, dense))


def parse_dbcache(text: str | None) -> DBCacheSetting | None:
    """'0.08' or '0.08,1,0,8' (threshold[,fn,bn,warmup]) -> DBCacheSetting; threshold 'auto': matched
    to a MACs target (None); None/'' -> None (the default setting, matched)."""
    if text is None or not str(text).strip():
        return None
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) not in (1, 4):
        raise ValueError(f"--cache-dit takes THRESHOLD or THRESHOLD,FN,BN,WARMUP (THRESHOLD may be auto), got {shown(text)}")
    try:
        threshold = None if parts[0].lower() == "auto" else float(parts[0])
        whole = [int(p) for p in parts[1:]]
    except ValueError:
        raise ValueError(
            f"--cache-dit takes THRESHOLD or THRESHOLD,FN,BN,WARMUP (a number or auto, then whole numbers), got {shown(text)}"
        ) from None
    return DBCacheSetting(threshold, *whole) if whole else DBCacheSetting(threshold)


def cache_dit_macs(dense_macs: float, fraction: float) -> int:
    """Block-linear MACs of a run that computed `fraction` of the dense run's blocks."""
    return int(round(float(dense_macs) * float(fraction)))


__all__: Sequence[str] = (
    "DBCacheSetting", "CacheDiT", "serves_cache_dit", "match_threshold", "threshold_search", "parse_dbcache", "probe_fraction", "sharing_copy", "cache_dit_macs",
)
