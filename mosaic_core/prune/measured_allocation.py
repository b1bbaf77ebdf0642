"""Measured allocation: spread a MAC budget over stages × layers by the recorded OBS errors.

Every greedy OBS pass (`obs.obs_prune_order`) records ε_k, the increase of the layer's output
error tr(ΔW H ΔWᵀ) caused by its k-th removal, for every removal of every layer of every
stage. So the error of removing the first k groups of layer l in stage s is known exactly,

    E_{s,l}(k) = ε_1 + … + ε_k          (the layer's reconstruction error, docs/method.md §3)

and one can choose how many groups each (stage, layer) loses by minimising the total error
the sampler will see, subject to the compute it must save (SPDY / ZipLM style):

    minimise   Σ_s n_s Σ_l E_{s,l}(k_{s,l})
    subject to Σ_s n_s Σ_l c_l · k_{s,l}  ≥  B,      0 ≤ k_{s,l} ≤ K_l,

where n_s is the number of sampler steps stage s serves (each step is one model call that
carries the stage's error once), c_l the MACs of one group of layer l per model call
(`cost.group_macs_per_token` × tokens) and B the MACs the plan removes over the whole
trajectory. **[ours]**: the paper fixes each stage's sparsity from the importance score and
cuts every block alike; this allocator lets the measured errors decide both.

Lagrangian relaxation. For a multiplier μ ≥ 0 the problem separates per (stage, layer):

    k*_{s,l}(μ) = argmin_k  n_s (E_{s,l}(k) − μ c_l k)  =  argmin_k  E_{s,l}(k) − μ c_l k,

(n_s cancels: a stage that serves more steps pays more error *and* saves more MACs per
group, so one price μ — error per MAC saved — holds across stages), and the MACs removed
grow monotonically with μ. A bisection on μ finds the smallest price whose removals meet
the budget; the argmin is taken over the lower convex hull of E, so a layer whose errors
are not increasing still gets its best prefix. The removals overshoot B by at most the
groups that become worth removing at exactly that price. Everything is vectorised numpy:
a DiT-XL/2 plan (3 stages × 56 layers, ≤ 4608 groups each) allocates in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class LayerCurve:
    """One (stage, layer): its recorded removal errors, MACs per group per call, and limit."""

    stage: int
    layer: str
    errors: np.ndarray  # ε_1 … ε_K (float64), in greedy removal order
    cost: float  # MACs of one group per model call (c_l)
    max_remove: int  # K_l: groups that may go (a layer keeps at least one)

    def __post_init__(self) -> None:
        errors = np.asarray(self.errors, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(errors)):
            raise ValueError(f"{self.layer}: removal errors must be finite")
        if not self.cost > 0:
            raise ValueError(f"{self.layer}: the cost of a group must be > 0 MACs, got {self.cost}")
        if not 0 <= self.max_remove <= errors.size:
            raise ValueError(f"{self.layer}: max_remove must be in [0, {errors.size}], got {self.max_remove}")
        object.__setattr__(self, "errors", errors)


@dataclass(frozen=True)
class MeasuredAllocation:
    """Groups removed per (stage, layer), the MACs removed and the weighted error they cost."""

    removals: Mapping[tuple[int, str], int]
    macs_removed: float  # Σ_s n_s Σ_l c_l k_{s,l}
    budget: float  # B
    error: float  # Σ_s n_s Σ_l E_{s,l}(k_{s,l})
    price: float  # μ: the error per MAC saved at the margin


def _hull_choices(errors: np.ndarray, max_remove: int) -> tuple[np.ndarray, np.ndarray]:
    """The prefixes k on the lower convex hull of (k, E(k)), k = 0…max_remove, and E there."""
    cumulative = np.concatenate([[0.0], np.cumsum(np.maximum(errors[:max_remove], 0.0))])
    hull: list[int] = [0]
    for k in range(1, cumulative.size):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or above the segment a → k
            if (cumulative[b] - cumulative[a]) * (k - a) >= (cumulative[k] - cumulative[a]) * (b - a):
                hull.pop()
            else:
                break
        hull.append(k)
    points = np.asarray(hull, dtype=np.int64)
    return points, cumulative[points]


def allocate_measured(
    curves: Sequence[LayerCurve],
    steps_per_stage: Sequence[int],
    budget_macs: float,
    iterations: int = 100,
) -> MeasuredAllocation:
    """Minimise the step-weighted recorded error subject to removing ≥ `budget_macs` MACs.

    `steps_per_stage[s]` is n_s; `budget_macs` is B over the whole trajectory (one image,
    no CFG doubling: the same convention as `cost.sampling_macs`). Raises ValueError when
    even removing everything allowed does not reach the budget.
    """
    steps = np.asarray(steps_per_stage, dtype=np.float64)
    if steps.ndim != 1 or np.any(steps < 0):
        raise ValueError(f"steps_per_stage must be non-negative counts, got {list(steps_per_stage)}")
    if not np.isfinite(budget_macs) or budget_macs < 0:
        raise ValueError(f"budget_macs must be a finite number >= 0, got {budget_macs!r}")
    usable = [c for c in curves if steps[c.stage] > 0 and c.max_remove > 0]
    hulls = [_hull_choices(c.errors, c.max_remove) for c in usable]
    weights = np.asarray([steps[c.stage] * c.cost for c in usable])  # MACs saved per group, whole trajectory
    most = float(sum(w * h[0][-1] for w, h in zip(weights, hulls)))
    if budget_macs > most * (1 + 1e-12):
        raise ValueError(
            f"the budget of {budget_macs:.4g} MACs is more than the {most:.4g} that pruning every layer "
            "to its last group removes: lower the sparsity"
        )

    def choose(price: float) -> np.ndarray:
        # per curve: the hull point minimising E(k) − price·c·k (ties: the larger k)
        return np.asarray(
            [int(points[_argmin_last(values - price * c.cost * points)]) for (points, values), c in zip(hulls, usable)],
            dtype=np.int64,
        )

    def removed(choice: np.ndarray) -> float:
        return float(np.dot(weights, choice))

    if budget_macs <= 0 or not usable:
        choice = np.zeros(len(usable), dtype=np.int64)
        price = 0.0
    else:
        low, high = 0.0, 1.0
        while removed(choose(high)) < budget_macs:
            high *= 4.0
            if high > 1e300:
                break
        for _ in range(iterations):
            middle = 0.5 * (low + high)
            if removed(choose(middle)) >= budget_macs:
                high = middle
            else:
                low = middle
        price = high
        choice = choose(price)
    removals = {(c.stage, c.layer): 0 for c in curves}
    error = 0.0
    for k, c in zip(choice, usable):
        removals[(c.stage, c.layer)] = int(k)
        error += steps[c.stage] * float(np.maximum(c.errors[:k], 0.0).sum())
    return MeasuredAllocation(removals, removed(choice), float(budget_macs), error, float(price))


def _argmin_last(values: np.ndarray) -> int:
    """Index of the minimum, the last one on ties (prefer removing more at equal cost)."""
    reversed_index = int(np.argmin(values[::-1]))
    return values.size - 1 - reversed_index
