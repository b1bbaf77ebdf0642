"""Layer Hessians for structured OBS: H = XᵀX / n at the inputs of the pruned layers.

What is pruned in a transformer block (docs/method.md §3) is the *input* side of the
output projections that the family adapter names (`mosaic_core.models.adapters`):

- `attn1.to_out.0` (D × H·hd), and `attn2.to_out.0` for cross-attention: attention head
  h is the group of input columns [h·hd, (h+1)·hd); removing it also removes rows
  [h·hd, (h+1)·hd) of to_q/to_k/to_v.
- `ff.net.2` (D × F): feed-forward unit j is input column j; removing it also removes
  row j (and bias j) of `ff.net.0.proj` (rows j and j+F for a gated GEGLU).

For a linear layer y = W x the output reconstruction error of a weight change ΔW,
averaged over the n calibration tokens x₁..xₙ (rows of X, n × in), is

    E(ΔW) = (1/n) Σᵢ ‖ΔW xᵢ‖² = tr(ΔW H ΔWᵀ),    H = XᵀX / n   (in × in).

E is exactly quadratic in ΔW, so H is the exact Hessian of the layer-wise objective (up
to a factor 2) and all second-order pruning in `mosaic_core.prune.obs` is exact per layer.

Lifecycle (SparseGPT's add_batch → solve → free): `HessianAccumulator.add_batch` is
called from a forward pre-hook on every calibration batch; `hessian()` hands H to the
solver; `free()` drops the in × in buffer. Accumulation is in float64: the sum runs over
tens of thousands of tokens and float32 would lose the small eigenvalues the OBS inverse
depends on.

Several processes (`mosaic_core.distributed`): each accumulates ΣXᵀX and n over its own
calibration batches; `hessian_steps(..., reduce=...)` sums both over the processes before
dividing, so H = (Σ_r Σ_{x∈shard r} x xᵀ) / (Σ_r n_r) is the one-process H up to the order
of float64 additions.

Where the sums live: on the activations' device when all in × in float64 buffers fit in
`memory_budget` bytes (default: a quarter of the free GPU memory; DiT-XL/2 needs
28 · (1152² + 4608²) · 8 B ≈ 5 GB), else on the CPU (each batch's XᵀX is still formed on the
device, only the running sum moves).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from mosaic_core.jobs import Cancelled

from mosaic_core.divide.shapes import LAYER_KINDS

LayerKind = Literal["attn", "cross_attn", "mlp", "joint_attn", "context_mlp", "dual_attn"]


@dataclass(frozen=True)
class LayerPart:
    """One output projection's share of a prunable layer (docs/method.md §11).

    Group g of the layer owns input columns [offset + g·width, offset + (g+1)·width) of
    the linear layer at `module`; `key` names this part's kept weight (checkpoint, surgery).
    """

    module: str
    offset: int
    width: int
    key: str


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable linear layer of a block, named as in `model.named_modules()`.

    `group_size` input columns form one prunable group (head_dim for attention heads, 1
    for feed-forward units); the layer has `num_groups` groups and `num_groups * group_size`
    inputs. `kind` is "attn" (self-attention), "cross_attn", "mlp", "joint_attn" (image
    and context streams attending together), "context_mlp" (the context stream's
    feed-forward) or "dual_attn" (a second self-attention of the same block).

    `parts` say where the groups' columns live when the layer is not simply all inputs of
    the module `name`: a joint attention head owns hd columns of `to_out.0` and hd of
    `to_add_out` (two parts, group_size 2·hd); a fused projection's attention part starts
    at column 0 and its MLP part at column inner_dim of the same module. The layer's
    weight and Hessian are then the parts' side by side (`layer_weight`, `layer_hessian`).
    """

    block: int
    kind: LayerKind
    name: str
    group_size: int
    num_groups: int
    parts: tuple[LayerPart, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"kind must be one of {', '.join(LAYER_KINDS)}, got {self.kind!r}")
        if self.group_size < 1 or self.num_groups < 1:
            raise ValueError(
                f"group_size and num_groups must be >= 1, got {self.group_size} and {self.num_groups}"
            )
        if not self.parts:
            object.__setattr__(self, "parts", (LayerPart(self.name, 0, self.group_size, self.name),))
        object.__setattr__(self, "parts", tuple(self.parts))
        if sum(part.width for part in self.parts) != self.group_size:
            raise ValueError(f"layer {self.name}: part widths {[p.width for p in self.parts]} must add up to group_size {self.group_size}")

    @property
    def in_features(self) -> int:
        """Input width of the layer (= num_groups * group_size)."""
        return self.num_groups * self.group_size


def _part_positions(layer: PrunableLayer, num_groups: int) -> list[torch.Tensor]:
    """Per part, the positions of its columns in the layer's interleaved order over `num_groups` groups.

    Group g occupies positions [g·group_size, (g+1)·group_size): first part 0's `width`
    columns of group g, then part 1's, and so on.
    """
    positions, start = [], 0
    for part in layer.parts:
        base = torch.arange(num_groups).unsqueeze(1) * layer.group_size + start  # (G, 1)
        positions.append((base + torch.arange(part.width)).reshape(-1))  # (G·width,)
        start += part.width
    return positions


def layer_weight(modules: dict[str, torch.nn.Module], layer: PrunableLayer) -> torch.Tensor:
    """The layer's weight (Σ outᵢ) × (groups·group_size): the parts block-diagonal, columns interleaved by group.

    One part: the module's weight columns [offset, offset + groups·width). Several parts
    (joint attention): part i's rows are its module's outputs, and the weight is zero where
    a part's rows meet another part's columns, so tr(ΔW H ΔWᵀ) with the block-diagonal
    `layer_hessian` is the sum of the parts' errors (docs/method.md §11).
    """
    blocks = [modules[p.module].weight.detach()[:, p.offset : p.offset + layer.num_groups * p.width] for p in layer.parts]
    if len(blocks) == 1:
        return blocks[0]
    out = blocks[0].new_zeros(sum(b.shape[0] for b in blocks), layer.in_features)
    row = 0
    for block, positions in zip(blocks, _part_positions(layer, layer.num_groups)):
        out[row : row + block.shape[0], positions.to(out.device)] = block
        row += block.shape[0]
    return out


def layer_hessian(layer: PrunableLayer, part_hessians: list[torch.Tensor]) -> torch.Tensor:
    """The layer's H from its parts' Hessians: block-diagonal, interleaved like `layer_weight`."""
    if len(part_hessians) == 1:
        return part_hessians[0]
    first = part_hessians[0]
    h = first.new_zeros(layer.in_features, layer.in_features)
    for part_h, positions in zip(part_hessians, _part_positions(layer, layer.num_groups)):
        positions = positions.to(h.device)
        h[positions.unsqueeze(1), positions.unsqueeze(0)] = part_h
    return h


def split_solved_weight(modules: dict[str, torch.nn.Module], layer: PrunableLayer, kept_weight: torch.Tensor, num_kept: int) -> dict[str, torch.Tensor]:
    """`split_layer_weight` with each part's output count read from its module."""
    if len(layer.parts) == 1:
        return {layer.parts[0].key: kept_weight}
    weights, row = {}, 0
    for part, positions in zip(layer.parts, _part_positions(layer, num_kept)):
        rows = modules[part.module].weight.shape[0]
        weights[part.key] = kept_weight[row : row + rows][:, positions.to(kept_weight.device)].contiguous()
        row += rows
    return weights


def prunable_layers(model: torch.nn.Module) -> list[PrunableLayer]:
    """The pruned layers of a denoiser, block by block: self-attention, cross-attention, feed-forward.

    The family adapter finds the blocks by module path; sizes are read from the modules
    themselves (not the config), so it also works on a sliced model.
    """
    from mosaic_core.models.adapters import adapter_for_model

    return adapter_for_model(model).prunable_layers(model)


class HessianAccumulator:
    """Running H = Σ XᵀX (float64) and token count n for one layer input of width `in_features`."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        self.in_features = in_features
        self.device = torch.device(device) if device is not None else None
        self._sum: torch.Tensor | None = None  # in × in, float64, allocated on first batch
        self.count = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Add the tokens of `inputs` (..., in_features): H += XᵀX over all tokens, n += tokens."""
        if inputs.shape[-1] != self.in_features:
            raise ValueError(
                f"inputs must end in {self.in_features} features, got shape {tuple(inputs.shape)}"
            )
        x = inputs.detach().reshape(-1, self.in_features)  # (tokens, in)
        if self._sum is None:
            device = self.device if self.device is not None else x.device
            self._sum = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=device)
        if x.device == self._sum.device:
            x = x.to(dtype=torch.float64)
            self._sum.addmm_(x.T, x)  # in × in
        else:  # sums kept on the CPU (memory budget): form XᵀX where X is, move only the result
            x = x.to(dtype=torch.float64)
            self._sum += (x.T @ x).to(self._sum.device)
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """H = XᵀX / n (in × in, float64, symmetric PSD). Raises if no token was added."""
        if self._sum is None or self.count == 0:
            raise ValueError("no calibration tokens were added; run at least one batch first")
        h = self._sum / self.count
        return (h + h.T) / 2  # exact symmetry despite round-off in the addmm sums

    def reset(self) -> None:
        """Zero the sums, keeping the buffer."""
        if self._sum is not None:
            self._sum.zero_()
        self.count = 0

    def free(self) -> None:
        """Drop the in × in buffer (the solver has taken its copy)."""
        self._sum = None
        self.count = 0

    def reduce(self, reduce: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str = "cpu") -> None:
        """Replace ΣXᵀX and n by their sums over processes (`reduce` = an all-reduce sum).

        A process that saw no batch contributes zeros, so every process must call this.
        """
        if self._sum is None:
            target = self.device if self.device is not None else torch.device(device)
            self._sum = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=target)
        self._sum = reduce(self._sum)
        count = reduce(torch.tensor([float(self.count)], dtype=torch.float64, device=self._sum.device))
        self.count = int(round(float(count.item())))


def run_calibration_batch(model: torch.nn.Module, x_t: torch.Tensor, timestep: torch.Tensor, condition) -> None:
    """One calibration batch through `model` in its family's own input form (packed tokens,
    timestep units, condition kwargs), without gradients; hooks collect what they need."""
    from mosaic_core.models.adapters import adapter_for_model, as_condition

    adapter = adapter_for_model(model)
    with torch.no_grad():
        model(adapter.pack_latents(x_t), timestep=adapter.model_timestep(timestep), **as_condition(condition).model_kwargs())


def hessian_bytes(layers: Iterable[PrunableLayer]) -> int:
    """Bytes of the float64 in × in running sums of `layers`."""
    return sum(8 * layer.in_features**2 for layer in layers)


def hessian_device(model: torch.nn.Module, layers: Iterable[PrunableLayer], memory_budget: int | None = None) -> torch.device | None:
    """Where the running sums live: None (the activations' device) when they fit the budget, else CPU.

    On CPU the answer is always the activations' device. On CUDA the default budget is a
    quarter of the free memory (`torch.cuda.mem_get_info`), leaving room for activations.
    """
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cuda":
        return None
    if memory_budget is None:
        free, _ = torch.cuda.mem_get_info(parameter.device)
        memory_budget = free // 4
    return None if hessian_bytes(list(layers)) <= memory_budget else torch.device("cpu")


def _resolve_layers(model: torch.nn.Module, layers: Iterable[PrunableLayer | str] | None) -> list[PrunableLayer]:
    available = {layer.name: layer for layer in prunable_layers(model)}
    if layers is None:
        return list(available.values())
    chosen = []
    for layer in layers:
        name = layer if isinstance(layer, str) else layer.name
        if name not in available:
            raise ValueError(f"{name!r} is not a prunable layer; choose from {sorted(available)}")
        chosen.append(available[name])
    return chosen


class HessianCollector:
    """Forward pre-hooks that accumulate H at the pruned layers while the model runs.

    A context manager, so that a caller can run one batch at a time (and report progress
    or stop between batches) while the hooks are guaranteed to be removed afterwards::

        with HessianCollector(model) as collector:
            for x_t, t, y in batches:
                collector.run(x_t, t, y)
        hessians = collector.hessians()

    The model runs in eval mode under `torch.no_grad()`; its mode is restored on exit.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: Iterable[PrunableLayer | str] | None = None,
        memory_budget: int | None = None,
    ) -> None:
        self.model = model
        self.layers = _resolve_layers(model, layers)
        self.sum_device = hessian_device(model, self.layers, memory_budget)
        # one running sum per site: a module's input columns [offset, offset + groups·width)
        self.sites = {
            (part.module, part.offset, layer.num_groups * part.width): None for layer in self.layers for part in layer.parts
        }
        self.accumulators = {site: HessianAccumulator(site[2], self.sum_device) for site in self.sites}
        self.batches = 0
        self._handles: list = []
        self._was_training = model.training

    def __enter__(self) -> "HessianCollector":
        modules = dict(self.model.named_modules())
        for (name, offset, width), accumulator in self.accumulators.items():
            if offset == 0 and width == modules[name].in_features:
                hook = lambda module, args, acc=accumulator: acc.add_batch(args[0])  # noqa: E731
            else:  # a share of the input columns (a fused projection's attention or MLP part)
                hook = lambda module, args, acc=accumulator, a=offset, b=offset + width: acc.add_batch(args[0][..., a:b])  # noqa: E731
            self._handles.append(modules[name].register_forward_pre_hook(hook))
        self._was_training = self.model.training
        self.model.eval()
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.model.train(self._was_training)

    def run(self, x_t: torch.Tensor, timestep: torch.Tensor, condition) -> None:
        """One calibration batch through the model: N×C×H×W inputs, (N,) timesteps and the
        condition (class labels (N,), or a family's condition object; `adapters.as_condition`)."""
        if not self._handles:
            raise RuntimeError("HessianCollector.run must be called inside its `with` block")
        run_calibration_batch(self.model, x_t, timestep, condition)
        self.batches += 1

    def hessians(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """H = XᵀX / n per layer name (float64); frees the running sums.

        `reduce` (an all-reduce sum over processes) is applied to ΣXᵀX and n first.
        """
        if reduce is not None:
            for accumulator in self.accumulators.values():
                accumulator.reduce(reduce, self.sum_device)
            if all(acc.count == 0 for acc in self.accumulators.values()):
                raise ValueError("batches was empty in every process; calibration needs at least one batch")
        elif self.batches == 0:
            raise ValueError("batches was empty; calibration needs at least one batch")
        site_hessians = {site: acc.hessian() for site, acc in self.accumulators.items()}
        hessians = {
            layer.name: layer_hessian(
                layer, [site_hessians[(p.module, p.offset, layer.num_groups * p.width)] for p in layer.parts]
            )
            for layer in self.layers
        }
        del site_hessians
        for acc in self.accumulators.values():
            acc.free()
        return hessians


def hessian_steps(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    layers: Iterable[PrunableLayer | str] | None = None,
    should_stop: Callable[[], bool] | None = None,
    total: int | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    memory_budget: int | None = None,
) -> Generator[tuple[int, int | None], None, dict[str, torch.Tensor]]:
    """The one Hessian loop: a generator of (batches done, total) that returns H per layer.

    Each batch is (x_t, t, c): noisy inputs N×C×H×W, model timesteps (N,) and the
    condition (class labels (N,) or a condition object); see `HessianCollector`. `should_stop()` is polled before each batch and raises
    `mosaic_core.jobs.Cancelled`. Hooks are always removed, also on error or cancel.
    `reduce` sums ΣXᵀX and n over processes before H is formed (see the module docstring).
    """
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]
    with HessianCollector(model, layers, memory_budget) as collector:
        for x_t, timestep, condition in batches:
            if should_stop is not None and should_stop():
                raise Cancelled(f"calibration cancelled after {collector.batches} batches")
            collector.run(x_t, timestep, condition)
            yield collector.batches, total
    return collector.hessians(reduce)


def collect_hessians(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    layers: Iterable[PrunableLayer | str] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_progress: Callable[[int, int | None], None] | None = None,
) -> dict[str, torch.Tensor]:
    """H = XᵀX / n (float64) at the input of every prunable layer, over calibration batches.

    Each batch is (x_t, t, y): noisy inputs N×C×H×W, model timesteps (N,) and class
    labels (N,); see `HessianCollector`. `layers` restricts the set (PrunableLayer or
    module names). `on_progress(done, total)` is called after each batch (`total` is None
    for an iterator without a length); `should_stop()` is polled before each batch and
    raises `mosaic_core.jobs.Cancelled`. Hooks are always removed, also on error or cancel.
    Hessians stay on the device the activations were on.
    """
    from mosaic_core.jobs import run_to_end

    steps = hessian_steps(model, batches, layers, should_stop)
    return run_to_end(steps, None if on_progress is None else (lambda event: on_progress(*event)))
