"""Sparsity allocation: how much of each stage's network to prune (docs/method.md §2).

The sparsity of a stage is the fraction of the prunable block compute its network
removes (attention heads and MLP hidden units, in every block). The overall sparsity of a
plan is the step-weighted mean over the sampler's steps (eq. 2.1):

    s̄ = Σᵢ nᵢ sᵢ / Σᵢ nᵢ

Auto allocation (docs/method.md §2, bounds ours). With ŝ(τ) the score normalised to [0, 1] over
all T timesteps (0 = lowest score):

    rᵢ = 1 - mean_{τ ∈ stage i} ŝ(τ)                          (eq. 2.2)
    sᵢ = s̄ · rᵢ / (Σⱼ nⱼ rⱼ / Σⱼ nⱼ)                         (eq. 2.3)

then water-filling: a stage whose sᵢ exceeds 0.9 is clipped to 0.9 and eq. 2.3 is solved
again over the remaining stages with what is left of the budget s̄ · Σ nᵢ, until nothing
exceeds 0.9; so the step-weighted mean stays exactly s̄. Stages with nᵢ = 0 cost nothing
and get sᵢ = 0. The middle stage is the fragile one, so it must never be pruned more than
another stage that has steps: when eq. 2.2 would give it a larger rᵢ than one of them, its
rᵢ is set to the smallest rᵢ of the others (`Allocation.middle_capped` records it).

Rounding to whole structures (ours). Per stage, with H heads and F MLP units per block:

    heads_removed = clip(round(sᵢ · H), 0, H - 1)      (at least one head stays)
    units_removed = the integer in [0, F - 1] that brings the removed fraction of
                    block-linear MACs closest to sᵢ

Heads are coarse (1/H of the attention compute each), so the MLP units compensate for
the head rounding: a stage's sparsity is the fraction of block-linear MACs removed, not
equal fractions of heads and units (docs/method.md §2.1). The achieved sparsity, the
removed MAC fraction after rounding, is within half of one MLP unit's MAC fraction (`sparsity_resolution`) of the
request unless a clip binds. If rounding would leave the middle stage sparser than
another stage with steps, the middle stage takes that stage's keep counts (auto only).

| code name        | symbol | meaning                                          |
|------------------|--------|--------------------------------------------------|
| `step_counts`    | nᵢ     | sampler steps landing in stage i                 |
| `target`         | s̄      | requested overall (step-weighted) sparsity       |
| `ratios`         | rᵢ     | eq. 2.2                                          |
| `requested`      | sᵢ     | after eq. 2.3 and water-filling                  |
| `achieved`       | aᵢ     | removed MAC fraction after rounding              |

Heterogeneous networks (a UNet: `shapes.BlockwiseShape`, one cost per prunable layer; ours).
Every attention layer ℓ (self or cross) with Gℓ heads keeps

    heads_keptℓ = Gℓ − clip(round(sᵢ · Gℓ), 0, Gℓ − 1)

and the feed-forward layers give up one common fraction f of their units, chosen so that
the removed MACs come closest to sᵢ of the dense MACs:

    f = clip((sᵢ·C − removed attention MACs) / C_ff, 0, 1),  units_removedℓ = clip(round(f·Fℓ), 0, Fℓ − 1)

`layer_keeps` then holds every layer's kept count; `heads_kept` / `units_kept` hold their
totals over the network (the shape's `num_heads` / `mlp_hidden` are totals too).
"""

from __future__ import annotations

from mosaic_core.limits import shown

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from mosaic_core.divide.cost import block_macs_per_step, head_macs_per_step, unit_macs_per_step
from mosaic_core.divide.shapes import MLP_KINDS, BlockwiseShape, TransformerShape
from mosaic_core.divide.noise_schedule import ScoreCurve
from mosaic_core.divide.stages import EARLY, LATE, MIDDLE, STAGE_NAMES, StageBounds

MAX_SPARSITY = 0.9
MODES = ("auto", "manual", "uniform")


def check_sparsity(value: float, name: str = "sparsity") -> float:
    """Return `value` as a float, or raise ValueError unless it is finite and in [0, 0.9]."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be in [0, {MAX_SPARSITY}], got {shown(value)}") from None
    if not (math.isfinite(number) and 0.0 <= number <= MAX_SPARSITY):
        raise ValueError(f"{name} must be in [0, {MAX_SPARSITY}], got {number}")
    return number


def check_step_counts(step_counts: Sequence[int]) -> tuple[int, int, int]:
    """Return (n_early, n_middle, n_late) as ints, or raise ValueError (3 values >= 0, sum >= 1)."""
    counts = tuple(step_counts)
    if len(counts) != 3 or any(isinstance(n, bool) or int(n) != n or n < 0 for n in counts) or sum(counts) < 1:
        raise ValueError(f"step_counts must be 3 whole numbers >= 0 with a positive sum, got {counts}")
    return tuple(int(n) for n in counts)  # type: ignore[return-value]


def sparsity_resolution(shape: TransformerShape) -> float:
    """One MLP unit's share of the dense block-linear MACs: 2D / (4·D·H·hd + 2·D·F) = 1 / (2D + F)."""
    return unit_macs_per_step(shape) / block_macs_per_step(shape)


def max_achievable_sparsity(shape: TransformerShape) -> float:
    """The removed MAC fraction with one head and one MLP unit kept per block."""
    return 1.0 - block_macs_per_step(shape, 1, 1) / block_macs_per_step(shape)


@dataclass(frozen=True)
class StageKeep:
    """One stage network after rounding: what it keeps per block and the MACs it removes."""

    heads_kept: int
    units_kept: int
    achieved: float
    layer_keeps: tuple[int, ...] | None = None  # per layer of a BlockwiseShape, else None


def round_to_structure(sparsity: float, shape: TransformerShape) -> StageKeep:
    """Whole heads and units for a requested sparsity (see the module docstring, ours).

    1. heads_removed = clip(round(s·H), 0, H-1), rounding half up;
    2. units_removed = clip(round((s·C - heads_removed·C_h) / C_u), 0, F-1), with C, C_h,
       C_u the dense, per-head and per-unit MACs: the closest removed fraction to s;
    3. achieved = 1 - MACs(kept) / MACs(dense).
    """
    sparsity = check_sparsity(sparsity)
    if isinstance(shape, BlockwiseShape):
        return _round_blockwise(sparsity, shape)
    heads_removed = int(np.clip(math.floor(sparsity * shape.num_heads + 0.5), 0, shape.num_heads - 1))
    dense = block_macs_per_step(shape)
    remaining = sparsity * dense - heads_removed * head_macs_per_step(shape)
    units_removed = int(np.clip(math.floor(remaining / unit_macs_per_step(shape) + 0.5), 0, shape.mlp_hidden - 1))
    heads_kept = shape.num_heads - heads_removed
    units_kept = shape.mlp_hidden - units_removed
    achieved = 1.0 - block_macs_per_step(shape, heads_kept, units_kept) / dense
    return StageKeep(heads_kept=heads_kept, units_kept=units_kept, achieved=achieved)


def _round_blockwise(sparsity: float, shape: BlockwiseShape) -> StageKeep:
    """Per-layer kept counts of a heterogeneous network (module docstring, ours)."""
    dense = shape.macs()
    keeps = []
    removed_attention = 0
    for layer in shape.layers:
        if layer.kind in MLP_KINDS:
            keeps.append(layer.num_groups)
            continue
        removed = int(np.clip(math.floor(sparsity * layer.num_groups + 0.5), 0, layer.num_groups - 1))
        removed_attention += removed * layer.macs_per_group
        keeps.append(layer.num_groups - removed)
    ff_dense = sum(layer.num_groups * layer.macs_per_group for layer in shape.layers if layer.kind in MLP_KINDS)
    fraction = float(np.clip((sparsity * dense - removed_attention) / ff_dense, 0.0, 1.0)) if ff_dense else 0.0
    for index, layer in enumerate(shape.layers):
        if layer.kind in MLP_KINDS:
            removed = int(np.clip(math.floor(fraction * layer.num_groups + 0.5), 0, layer.num_groups - 1))
            keeps[index] = layer.num_groups - removed
    keeps = tuple(keeps)
    heads = sum(k for k, layer in zip(keeps, shape.layers) if layer.kind not in MLP_KINDS)
    units = sum(k for k, layer in zip(keeps, shape.layers) if layer.kind in MLP_KINDS)
    return StageKeep(heads, units, 1.0 - shape.macs(keeps) / dense, keeps)


@dataclass(frozen=True)
class Allocation:
    """Per-stage sparsities (early, middle, late) of a plan, requested and after rounding.

    `overall_requested` and `overall_achieved` are step-weighted means (eq. 2.1).
    """

    mode: str
    step_counts: tuple[int, int, int]
    requested: tuple[float, float, float]
    achieved: tuple[float, float, float]
    heads_kept: tuple[int, int, int]
    units_kept: tuple[int, int, int]
    overall_requested: float
    overall_achieved: float
    middle_capped: bool = False
    layer_keeps: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None  # BlockwiseShape only

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"allocation mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.layer_keeps is not None and len(self.layer_keeps) != 3:
            raise ValueError(f"layer_keeps must have 3 entries (early, middle, late), got {len(self.layer_keeps)}")
        for name in ("step_counts", "requested", "achieved", "heads_kept", "units_kept"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} must have 3 values (early, middle, late), got {getattr(self, name)}")


def _step_weighted_mean(values: Sequence[float], counts: Sequence[int]) -> float:
    return float(sum(n * v for n, v in zip(counts, values)) / sum(counts))


def stage_ratios(curve: ScoreCurve, bounds: StageBounds) -> tuple[Optional[float], ...]:
    """rᵢ = 1 - mean of the [0,1]-normalised score over stage i (eq. 2.2); None if empty."""
    normalised = curve.normalised()
    ratios = []
    for stage in (EARLY, MIDDLE, LATE):
        indices = bounds.indices(stage)
        ratios.append(None if indices.size == 0 else float(1.0 - normalised[indices].mean()))
    return tuple(ratios)


def water_fill(weights: Sequence[float], step_counts: Sequence[int], target: float, cap: float = MAX_SPARSITY) -> tuple[float, ...]:
    """sᵢ ∝ weightᵢ with Σ nᵢ sᵢ / Σ nᵢ = target and 0 ≤ sᵢ ≤ cap (eq. 2.3 + clipping).

    Stages at the cap keep it and the rest of the budget is shared over the others in
    proportion to their weights (evenly if those weights are all 0), until none exceeds
    the cap. Stages with nᵢ = 0 get 0. Needs target ≤ cap, so a solution always exists.
    """
    counts = [int(n) for n in step_counts]
    total = sum(counts)
    budget_all = target * total
    result = [0.0] * len(counts)
    capped: set[int] = set()
    active = [i for i, n in enumerate(counts) if n > 0]
    while True:
        free = [i for i in active if i not in capped]
        if not free:
            break
        budget = max(budget_all - cap * sum(counts[i] for i in capped), 0.0)
        mass = sum(counts[i] * max(float(weights[i]), 0.0) for i in free)
        if mass > 0.0:
            values = {i: budget * max(float(weights[i]), 0.0) / mass for i in free}
        else:
            values = {i: budget / sum(counts[j] for j in free) for i in free}
        over = [i for i in free if values[i] > cap]
        if not over:
            for i in free:
                result[i] = values[i]
            break
        for i in over:
            result[i] = cap
            capped.add(i)
    return tuple(min(max(value, 0.0), cap) for value in result)


def _finish(
    mode: str,
    requested: Sequence[float],
    counts: tuple[int, int, int],
    shape: TransformerShape,
    middle_capped: bool = False,
    keep_middle_lowest: bool = False,
) -> Allocation:
    """Round every stage to whole heads/units and build the `Allocation`."""
    keeps = [round_to_structure(s, shape) for s in requested]
    if keep_middle_lowest and counts[MIDDLE] > 0:
        others = [i for i in (EARLY, LATE) if counts[i] > 0]
        if others:
            lowest = min(others, key=lambda i: keeps[i].achieved)
            if keeps[MIDDLE].achieved > keeps[lowest].achieved:
                keeps[MIDDLE] = keeps[lowest]  # rounding must not make the middle sparsest
    achieved = tuple(keep.achieved for keep in keeps)
    return Allocation(
        mode=mode,
        step_counts=counts,
        requested=tuple(float(s) for s in requested),  # type: ignore[arg-type]
        achieved=achieved,  # type: ignore[arg-type]
        heads_kept=tuple(keep.heads_kept for keep in keeps),  # type: ignore[arg-type]
        units_kept=tuple(keep.units_kept for keep in keeps),  # type: ignore[arg-type]
        overall_requested=_step_weighted_mean(requested, counts),
        overall_achieved=_step_weighted_mean(achieved, counts),
        middle_capped=middle_capped,
        layer_keeps=tuple(keep.layer_keeps for keep in keeps) if isinstance(shape, BlockwiseShape) else None,  # type: ignore[arg-type]
    )


def allocate_sparsity(
    curve: ScoreCurve,
    bounds: StageBounds,
    step_counts: Sequence[int],
    target: float,
    shape: TransformerShape,
) -> Allocation:
    """Auto allocation of docs/method.md §2: eq. 2.2 → middle cap → eq. 2.3 with water-filling → rounding.

    Raises ValueError when the target is not finite and in [0, 0.9], or the step counts
    are not 3 whole numbers >= 0 with a positive sum.
    """
    target = check_sparsity(target)
    counts = check_step_counts(step_counts)
    if curve.num_train_timesteps != bounds.num_train_timesteps:
        raise ValueError(
            f"curve has T={curve.num_train_timesteps} timesteps but the stage bounds T={bounds.num_train_timesteps}"
        )
    ratios = list(stage_ratios(curve, bounds))  # 1. eq. 2.2
    for stage, n in enumerate(counts):
        if n > 0 and ratios[stage] is None:
            raise ValueError(f"{n} steps land in the empty {STAGE_NAMES[stage]} stage")
    # 2. The middle stage never gets a larger ratio than another stage that has steps.
    middle_capped = False
    others = [ratios[i] for i in (EARLY, LATE) if counts[i] > 0]
    if counts[MIDDLE] > 0 and others and ratios[MIDDLE] > min(others):
        ratios[MIDDLE] = min(others)
        middle_capped = True
    weights = [0.0 if r is None else r for r in ratios]
    requested = water_fill(weights, counts, target)  # 3. eq. 2.3 + clip to [0, 0.9]
    return _finish("auto", requested, counts, shape, middle_capped, keep_middle_lowest=True)  # 4. rounding


def manual_sparsity(values: Sequence[float], step_counts: Sequence[int], shape: TransformerShape) -> Allocation:
    """Per-stage sparsities given by the user (early, middle, late), rounded to the structure.

    Values are used as given, also for stages without steps (they then cost nothing).
    Raises ValueError unless there are exactly 3 finite values in [0, 0.9].
    """
    values = tuple(values)
    if len(values) != 3:
        raise ValueError(f"stage sparsity needs exactly 3 values (early, middle, late), got {len(values)}: {values}")
    requested = tuple(check_sparsity(v, f"{name} sparsity") for v, name in zip(values, STAGE_NAMES))
    return _finish("manual", requested, check_step_counts(step_counts), shape)


def uniform_sparsity(target: float, step_counts: Sequence[int], shape: TransformerShape) -> Allocation:
    """One network at `target` for every step: all three stages get the same sparsity."""
    target = check_sparsity(target)
    return _finish("uniform", (target, target, target), check_step_counts(step_counts), shape)
