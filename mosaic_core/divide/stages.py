"""Divide: cut the T model timesteps into early / middle / late stages (docs/method.md §1).

The middle stage is the fast-learning, fragile part of the trajectory:

    τ* = argmax_τ score(τ),   middle = the largest contiguous run [τ_lo, τ_hi] ∋ τ*
    with score(τ) ≥ M · max score for every τ in it.

Early = every τ > τ_hi (the noisiest, sampled first), late = every τ < τ_lo (almost
clean, sampled last). Either of those may be empty (a cosine schedule's middle stage runs
to τ = T-1, so its early stage is empty); the middle stage never is (it holds τ*).

| code name       | symbol    | meaning                                          |
|-----------------|-----------|--------------------------------------------------|
| `M`             | M         | threshold, as a fraction of the maximum score    |
| `curve.argmax`  | τ*        | timestep of the highest score                    |
| `middle`        | [τ_lo, τ_hi] | inclusive bounds of the middle stage          |
| `stage_of`      |           | 0 = early, 1 = middle, 2 = late                  |
"""

from __future__ import annotations

from mosaic_core.limits import shown

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from mosaic_core.divide.noise_schedule import ScoreCurve

STAGE_NAMES = ("early", "middle", "late")
EARLY, MIDDLE, LATE = 0, 1, 2

StageRange = Optional[tuple[int, int]]

# M: the default (the paper's DiT-XL/2 setting), the range the studio and its API offer
# (the engine itself accepts any M in (0, 1)) and the step both the slider and a drag snap to.
DEFAULT_M = 0.55
M_RANGE = (0.05, 0.95)
M_STEP = 0.005


def snap_M(value: float) -> float:
    """M clamped to `M_RANGE` and rounded to a multiple of `M_STEP` (slider and drag agree)."""
    low, high = M_RANGE
    return round(round(min(max(float(value), low), high) / M_STEP) * M_STEP, 6)


def stage_of_timesteps(timesteps, middle: tuple[int, int], num_train_timesteps: int | None = None) -> np.ndarray:
    """Stage index (0 early, 1 middle, 2 late) of each timestep: the one rule for every caller.

    Fractional timesteps (DPM-Solver, Euler) are rounded half up to the nearest integer and
    clipped to [0, T-1] (to [0, ∞) when T is not given), then compared with the inclusive
    middle bounds: above → early, below → late.
    """
    values = np.asarray(timesteps, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"timesteps must be finite, got {values[~np.isfinite(values)][:3].tolist()}")
    upper = np.inf if num_train_timesteps is None else num_train_timesteps - 1
    rounded = np.clip(np.floor(values + 0.5), 0, upper)
    low, high = middle
    stage = np.full(rounded.shape, MIDDLE, dtype=np.int64)
    stage[rounded > high] = EARLY
    stage[rounded < low] = LATE
    return stage


EDGE_SOURCES = ("M", "manual")  # where a plan's stage edges came from: the threshold rule, or set by hand


def check_edges(edges, num_train_timesteps: int | None) -> tuple[int, int]:
    """(τ_lo, τ_hi) as ints, the inclusive middle stage set by hand (docs/method.md §12.1).

    Raises ValueError unless `edges` is two whole numbers with 0 <= τ_lo <= τ_hi < T. When
    `num_train_timesteps` is None (the model is not known yet) only the form is checked: the
    range is checked once T is known (`build_plan`), so its message can give T's value.
    """
    if num_train_timesteps is None:
        allowed = "2 whole numbers LO,HI with 0 <= LO <= HI < the model's training timesteps"
    else:
        allowed = f"2 whole numbers LO,HI with 0 <= LO <= HI < {num_train_timesteps} (training timesteps)"
    if isinstance(edges, (str, bytes, dict, set)) or not hasattr(edges, "__len__") or len(edges) != 2:
        raise ValueError(f"stage edges must be {allowed}, got {shown(edges)}")
    values = []
    for value in edges:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"stage edges must be {allowed}, got {shown(edges)}")
        if isinstance(value, (int, np.integer)):
            values.append(int(value))
            continue
        number = float(value)
        if not (math.isfinite(number) and number.is_integer()):
            raise ValueError(f"stage edges must be {allowed}, got {shown(edges)}")
        values.append(int(number))
    low, high = values
    if num_train_timesteps is not None and not 0 <= low <= high < num_train_timesteps:
        raise ValueError(f"stage edges must be {allowed}, got {low},{high}")
    return low, high


def check_M(M: float) -> float:
    """Return M as a float, or raise ValueError when it is not in the open interval (0, 1)."""
    try:
        value = float(M)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"M must be in (0, 1), got {shown(M)}") from None
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise ValueError(f"M must be in (0, 1), got {value}")
    return value


@dataclass(frozen=True)
class StageBounds:
    """Inclusive model-timestep ranges of the three stages; `None` for an empty stage.

    Together the ranges cover 0..T-1 exactly once: late = [0, τ_lo-1], middle =
    [τ_lo, τ_hi], early = [τ_hi+1, T-1].
    """

    num_train_timesteps: int
    early: StageRange
    middle: tuple[int, int]
    late: StageRange
    M: float

    def __post_init__(self) -> None:
        low, high = self.middle
        if not 0 <= low <= high < self.num_train_timesteps:
            raise ValueError(
                f"middle stage must satisfy 0 <= t_min <= t_max < {self.num_train_timesteps}, got {self.middle}"
            )
        expected_early = (high + 1, self.num_train_timesteps - 1) if high + 1 < self.num_train_timesteps else None
        expected_late = (0, low - 1) if low > 0 else None
        if self.early != expected_early or self.late != expected_late:
            raise ValueError(
                f"early/late stages must be the timesteps above/below the middle {self.middle}: "
                f"expected early={expected_early}, late={expected_late}, got early={self.early}, late={self.late}"
            )

    @classmethod
    def from_middle(cls, middle: tuple[int, int], num_train_timesteps: int, M: float) -> "StageBounds":
        """The bounds whose middle stage is `middle` (inclusive); early/late fill the rest."""
        low, high = int(middle[0]), int(middle[1])
        return cls(
            num_train_timesteps=int(num_train_timesteps),
            early=(high + 1, num_train_timesteps - 1) if high + 1 < num_train_timesteps else None,
            middle=(low, high),
            late=(0, low - 1) if low > 0 else None,
            M=float(M),
        )

    @property
    def ranges(self) -> tuple[StageRange, StageRange, StageRange]:
        """(early, middle, late) inclusive ranges, in `STAGE_NAMES` order."""
        return (self.early, self.middle, self.late)

    def sizes(self) -> tuple[int, int, int]:
        """How many model timesteps each stage holds (sums to T)."""
        return tuple(0 if r is None else r[1] - r[0] + 1 for r in self.ranges)  # type: ignore[return-value]

    def stage_of(self, timesteps) -> np.ndarray:
        """Stage index (0 early, 1 middle, 2 late) of each timestep; same shape as input.

        Fractional timesteps (DPM-Solver, Euler) are rounded half up to the nearest
        integer, then clipped to [0, T-1].
        """
        return stage_of_timesteps(timesteps, self.middle, self.num_train_timesteps)

    def count_steps(self, timesteps) -> tuple[int, int, int]:
        """(n_early, n_middle, n_late): how many of the sampler's timesteps land in each stage."""
        stage = self.stage_of(np.asarray(timesteps, dtype=np.float64).reshape(-1))
        counts = np.bincount(stage, minlength=3)
        return (int(counts[EARLY]), int(counts[MIDDLE]), int(counts[LATE]))

    def indices(self, stage: int) -> np.ndarray:
        """The model timesteps of stage `stage` (0, 1 or 2), ascending; empty if the stage is."""
        bounds = self.ranges[stage]
        if bounds is None:
            return np.zeros(0, dtype=np.int64)
        return np.arange(bounds[0], bounds[1] + 1)


def divide_stages(curve: ScoreCurve, M: float = DEFAULT_M) -> StageBounds:
    """Split 0..T-1 into early / middle / late from the importance score (docs/method.md §1).

    1. τ* = argmax score;  2. grow [τ_lo, τ_hi] from τ* while score ≥ M · max score;
    3. early = τ > τ_hi, late = τ < τ_lo. Raises ValueError when M ∉ (0, 1), or when the
    maximum score is not positive (then M · max is no threshold: lower |λ|).
    """
    M = check_M(M)
    score = np.asarray(curve.score, dtype=np.float64)
    peak = int(np.argmax(score))
    max_score = float(score[peak])
    if not max_score > 0.0:
        raise ValueError(
            f"the maximum importance score is {max_score:.4g} <= 0, so M * max score is no threshold: "
            f"lower |lam| (got lam={curve.lam})"
        )
    above = score >= M * max_score
    # The run is bounded by the nearest timestep below the threshold on each side.
    below_left = np.flatnonzero(~above[:peak])
    below_right = np.flatnonzero(~above[peak + 1 :])
    low = int(below_left[-1]) + 1 if below_left.size else 0
    high = peak + int(below_right[0]) if below_right.size else score.size - 1
    return StageBounds.from_middle((low, high), score.size, M)
