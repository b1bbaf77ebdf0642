"""K ≥ 2 stages: a partition of the T timesteps by K−1 cuts, and its allocation (docs/method.md §12.2–12.5).

The three-stage engine (`stages.py`, `allocation.py`, `plan.py`) stays as it is; this module
generalises its two decisions to any number of stages so that finer stages can be tried
(how close does a staged model come to a per-timestep sparsity?):

    cuts 0 ≤ c₁ ≤ c₂ ≤ … ≤ c_{K−1} ≤ T,   stage ranges in ascending τ:
    [0, c₁−1], [c₁, c₂−1], …, [c_{K−1}, T−1]                                   (eq. 8.2)

Stages are numbered in *sampling order*, like early/middle/late: stage 0 is the noisiest
(the top range), stage K−1 the cleanest. A range with c_i = c_{i+1} is empty. The
three-stage bounds of eq. 1.4 are the cuts (τ_lo, τ_hi + 1).

| code name       | symbol  | meaning                                            |
|-----------------|---------|----------------------------------------------------|
| `cuts`          | cᵢ      | the lowest timestep of each stage but the cleanest |
| `peak_stage`    | k*      | the stage holding τ* = argmax score                |
| `step_counts`   | nᵢ      | sampler steps per stage, sampling order            |
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from mosaic_core.divide.allocation import StageKeep, check_sparsity, round_to_structure, water_fill
from mosaic_core.divide.cost import block_macs_per_step
from mosaic_core.divide.noise_schedule import ScoreCurve
from mosaic_core.divide.shapes import BlockwiseShape, TransformerShape
from mosaic_core.divide.stages import DEFAULT_M, StageBounds, divide_stages
from mosaic_core.limits import shown

MAX_STAGES = 64  # more stages than this is per-timestep sparsity; not what a staged model is for


def check_num_stages(num_stages) -> int:
    """K as an int, or ValueError unless it is a whole number in [2, 64]."""
    if isinstance(num_stages, bool) or not isinstance(num_stages, (int, np.integer)) or not 2 <= num_stages <= MAX_STAGES:
        raise ValueError(f"the number of stages must be a whole number in [2, {MAX_STAGES}], got {shown(num_stages)}")
    return int(num_stages)


@dataclass(frozen=True)
class StagePartition:
    """K stages of the timesteps 0..T−1, given by K−1 ascending cuts (eq. 8.2)."""

    num_train_timesteps: int
    cuts: tuple[int, ...]

    def __post_init__(self) -> None:
        cuts = tuple(self.cuts)
        allowed = f"{len(cuts)} whole numbers with 0 <= c1 <= ... <= T = {self.num_train_timesteps}"
        if not 1 <= len(cuts) < MAX_STAGES:
            raise ValueError(f"a partition needs 1 to {MAX_STAGES - 1} cuts (2 to {MAX_STAGES} stages), got {len(cuts)}")
        if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in cuts):
            raise ValueError(f"stage cuts must be {allowed}, got {shown(cuts)}")
        if not all(0 <= a <= b <= self.num_train_timesteps for a, b in zip((0, *cuts), (*cuts, self.num_train_timesteps))):
            raise ValueError(f"stage cuts must be {allowed}, got {shown(cuts)}")
        object.__setattr__(self, "cuts", tuple(int(c) for c in cuts))

    @classmethod
    def from_bounds(cls, bounds: StageBounds) -> "StagePartition":
        """The three stages of `bounds` (early, middle, late) as a partition: cuts (τ_lo, τ_hi + 1)."""
        low, high = bounds.middle
        return cls(bounds.num_train_timesteps, (low, high + 1))

    @property
    def num_stages(self) -> int:
        """K."""
        return len(self.cuts) + 1

    @property
    def ranges(self) -> tuple[Optional[tuple[int, int]], ...]:
        """Inclusive τ range of each stage in sampling order (noisiest first); None when empty."""
        edges = (0, *self.cuts, self.num_train_timesteps)
        ascending = [(a, b - 1) if b > a else None for a, b in zip(edges[:-1], edges[1:])]
        return tuple(reversed(ascending))

    def stage_of(self, timesteps) -> np.ndarray:
        """Stage (0 = noisiest) of each timestep, rounded half up and clipped to [0, T−1] as in eq. 1.5."""
        values = np.asarray(timesteps, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"timesteps must be finite, got {values[~np.isfinite(values)][:3].tolist()}")
        rounded = np.clip(np.floor(values + 0.5), 0, self.num_train_timesteps - 1)
        ascending = np.searchsorted(np.asarray(self.cuts), rounded, side="right")  # cuts ≤ τ
        return (self.num_stages - 1 - ascending).astype(np.int64)

    def count_steps(self, timesteps) -> tuple[int, ...]:
        """nᵢ: how many of the sampler's timesteps land in each stage (sampling order)."""
        stage = self.stage_of(np.asarray(timesteps, dtype=np.float64).reshape(-1))
        return tuple(int(n) for n in np.bincount(stage, minlength=self.num_stages))

    def indices(self, stage: int) -> np.ndarray:
        """The timesteps of `stage`, ascending; empty when the stage is."""
        bounds = self.ranges[stage]
        return np.zeros(0, dtype=np.int64) if bounds is None else np.arange(bounds[0], bounds[1] + 1)


def _split(low: int, high: int, pieces: int) -> list[int]:
    """The cuts that split [low, high] into `pieces` ranges of (nearly) equal width."""
    width = high - low + 1
    return [low + (width * j) // pieces for j in range(1, pieces)]


def divide_k_stages(curve: ScoreCurve, num_stages: int, M: float = DEFAULT_M) -> StagePartition:
    """K stages from the threshold rule (docs/method.md §12.3, ours).

    K = 3 is eq. 1.4 exactly. For K > 3 the middle stage of eq. 1.4 stays whole (it is the
    fragile run around the peak), and the K − 3 extra stages go to the early and late
    stages in proportion to their widths (largest remainder, at most one stage per
    timestep), each split into ranges of equal width. K = 2 cuts at τ_hi + 1: the early
    stage against the rest (the late stage is the shortest one on DDPM schedules).
    """
    num_stages = check_num_stages(num_stages)
    bounds = divide_stages(curve, M)
    T = bounds.num_train_timesteps
    low, high = bounds.middle
    if num_stages == 2:
        return StagePartition(T, (high + 1,))
    widths = [low, T - 1 - high]  # late, early
    extra = num_stages - 3
    if extra > sum(widths):
        raise ValueError(f"{num_stages} stages need more than the {sum(widths)} timesteps outside the middle stage")
    total = sum(widths)
    shares = [extra * w / total if total else 0.0 for w in widths]
    pieces = [math.floor(s) for s in shares]
    for index in sorted(range(2), key=lambda i: shares[i] - pieces[i], reverse=True)[: extra - sum(pieces)]:
        pieces[index] += 1
    for index in range(2):  # never more pieces than timesteps
        overflow = pieces[index] - widths[index]
        if overflow > 0:
            pieces[index] -= overflow
            pieces[1 - index] += overflow
    late_cuts = _split(0, low - 1, pieces[0] + 1) if low > 0 else []
    early_cuts = _split(high + 1, T - 1, pieces[1] + 1) if high + 1 < T else []
    return StagePartition(T, (*late_cuts, low, high + 1, *early_cuts))


@dataclass(frozen=True)
class StageAllocation:
    """Per-stage sparsity of K stages (sampling order), requested and after rounding; eq. 2.1 means."""

    step_counts: tuple[int, ...]
    requested: tuple[float, ...]
    achieved: tuple[float, ...]
    heads_kept: tuple[int, ...]
    units_kept: tuple[int, ...]
    overall_requested: float
    overall_achieved: float
    peak_stage: int
    peak_capped: bool = False


def _mean(values: Sequence[float], counts: Sequence[int]) -> float:
    return float(sum(n * v for n, v in zip(counts, values)) / sum(counts))


def allocate_k_stages(
    curve: ScoreCurve,
    partition: StagePartition,
    step_counts: Sequence[int],
    target: float,
    shape: TransformerShape,
) -> StageAllocation:
    """Score-weighted sparsity for K stages (docs/method.md §12.4): eqs. 2.2–2.4 with the peak stage for the middle.

    1. rᵢ = 1 − mean ŝ over stage i;  2. the stage holding τ* gets at most the smallest rᵢ
    of the other stages with steps;  3. sᵢ ∝ rᵢ with the step-weighted mean = target,
    water-filled at 0.9;  4. whole heads and units; the peak stage takes the keep counts of
    the least pruned other stage if rounding left it sparser. K = 3 on eq. 1.4's stages
    gives `allocation.allocate_sparsity` exactly.
    """
    target = check_sparsity(target)
    if isinstance(shape, BlockwiseShape):
        raise ValueError("K-stage allocation supports transformer shapes (one head and unit count per stage) only")
    counts = tuple(int(n) for n in step_counts)
    if len(counts) != partition.num_stages or any(n < 0 for n in counts) or sum(counts) < 1:
        raise ValueError(f"step_counts must be {partition.num_stages} whole numbers >= 0 with a positive sum, got {counts}")
    if curve.num_train_timesteps != partition.num_train_timesteps:
        raise ValueError(f"curve has T={curve.num_train_timesteps} timesteps but the partition T={partition.num_train_timesteps}")
    normalised = curve.normalised()
    ratios: list[Optional[float]] = []
    for stage in range(partition.num_stages):  # 1. eq. 2.2
        indices = partition.indices(stage)
        ratios.append(None if indices.size == 0 else float(1.0 - normalised[indices].mean()))
        if counts[stage] > 0 and ratios[-1] is None:
            raise ValueError(f"{counts[stage]} steps land in the empty stage {stage}")
    peak = int(partition.stage_of([int(np.argmax(np.asarray(curve.score)))])[0])
    others = [ratios[i] for i in range(partition.num_stages) if i != peak and counts[i] > 0]
    capped = False
    if counts[peak] > 0 and others and ratios[peak] > min(others):  # 2. the fragile stage is never pruned more
        ratios[peak] = min(others)
        capped = True
    requested = water_fill([0.0 if r is None else r for r in ratios], counts, target)  # 3. eq. 2.3 + 2.4
    keeps: list[StageKeep] = [round_to_structure(s, shape) for s in requested]  # 4. eqs. 2.5–2.7
    with_steps = [i for i in range(partition.num_stages) if i != peak and counts[i] > 0]
    if counts[peak] > 0 and with_steps:
        lowest = min(with_steps, key=lambda i: keeps[i].achieved)
        if keeps[peak].achieved > keeps[lowest].achieved:
            keeps[peak] = keeps[lowest]
    achieved = tuple(k.achieved for k in keeps)
    return StageAllocation(
        step_counts=counts,
        requested=tuple(float(s) for s in requested),
        achieved=achieved,
        heads_kept=tuple(k.heads_kept for k in keeps),
        units_kept=tuple(k.units_kept for k in keeps),
        overall_requested=_mean(requested, counts),
        overall_achieved=_mean(achieved, counts),
        peak_stage=peak,
        peak_capped=capped,
    )


def k_stage_macs(shape: TransformerShape, allocation: StageAllocation) -> int:
    """Σᵢ nᵢ · block-linear MACs of stage i's network: one whole sample (eq. 4.7 for K stages)."""
    return int(
        sum(n * block_macs_per_step(shape, h, u) for n, h, u in zip(allocation.step_counts, allocation.heads_kept, allocation.units_kept))
    )
