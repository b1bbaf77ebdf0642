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

import functools

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
    multiple: int = 1  # the kept groups must be a multiple of this (GEMM-friendly widths), or all of them
    num_groups: int = 0  # G_l: needed when `multiple` > 1

    def allowed(self) -> np.ndarray:
        """The removal counts k this curve may take: 0…K_l, or those leaving a multiple of `multiple` kept."""
        k = np.arange(self.max_remove + 1, dtype=np.int64)
        if self.multiple <= 1:
            return k
        return k[(k == 0) | ((self.num_groups - k) % self.multiple == 0)]

    def __post_init__(self) -> None:
        errors = np.asarray(self.errors, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(errors)):
            raise ValueError(f"{self.layer}: removal errors must be finite")
        if not self.cost > 0:
            raise ValueError(f"{self.layer}: the cost of a group must be > 0 MACs, got {self.cost}")
        if not 0 <= self.max_remove <= errors.size:
            raise ValueError(f"{self.layer}: max_remove must be in [0, {errors.size}], got {self.max_remove}")
        if self.multiple > 1 and self.num_groups <= self.max_remove:
            raise ValueError(f"{self.layer}: a multiple of {self.multiple} needs num_groups (> max_remove), got {self.num_groups}")
        object.__setattr__(self, "errors", errors)


@dataclass(frozen=True)
class MeasuredAllocation:
    """Groups removed per (stage, layer), the MACs removed and the weighted error they cost."""

    removals: Mapping[tuple[int, str], int]
    macs_removed: float  # Σ_s n_s Σ_l c_l k_{s,l}
    budget: float  # B
    error: float  # Σ_s n_s Σ_l E_{s,l}(k_{s,l})
    price: float  # μ: the error per MAC saved at the margin


def _hull_choices(errors: np.ndarray, max_remove: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The prefixes k on the lower convex hull of (k, E(k)), k in `allowed` (default 0…max_remove), and E there.

    Remembered by content: the tuner allocates many plans from the same recorded errors.
    """
    errors = np.ascontiguousarray(errors, dtype=np.float64)
    allowed_key = None if allowed is None else np.ascontiguousarray(allowed, dtype=np.int64).tobytes()
    points, values = _hull_remembered(errors.tobytes(), int(max_remove), allowed_key)
    return points.copy(), values.copy()


@functools.lru_cache(maxsize=4096)
def _hull_remembered(errors_bytes: bytes, max_remove: int, allowed_bytes: bytes | None) -> tuple[np.ndarray, np.ndarray]:
    errors = np.frombuffer(errors_bytes, dtype=np.float64)
    allowed = None if allowed_bytes is None else np.frombuffer(allowed_bytes, dtype=np.int64)
    cumulative = np.concatenate([[0.0], np.cumsum(np.maximum(errors[:max_remove], 0.0))])
    hull: list[int] = [0]
    for k in (range(1, cumulative.size) if allowed is None else (int(a) for a in allowed if a > 0)):
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
    exact: bool = False,
) -> MeasuredAllocation:
    """Minimise the step-weighted recorded error subject to removing ≥ `budget_macs` MACs.

    `steps_per_stage[s]` is n_s; `budget_macs` is B over the whole trajectory (one image,
    no CFG doubling: the same convention as `cost.sampling_macs`). Raises ValueError when
    even removing everything allowed does not reach the budget. `exact`: fill the budget
    one group at a time from the price just below μ (see `_fill`), so the MACs removed
    exceed B by less than one group (docs/method.md §3.11).
    """
    steps = np.asarray(steps_per_stage, dtype=np.float64)
    if steps.ndim != 1 or np.any(steps < 0):
        raise ValueError(f"steps_per_stage must be non-negative counts, got {list(steps_per_stage)}")
    if not np.isfinite(budget_macs) or budget_macs < 0:
        raise ValueError(f"budget_macs must be a finite number >= 0, got {budget_macs!r}")
    usable = [c for c in curves if steps[c.stage] > 0 and c.max_remove > 0]
    hulls = [_hull_choices(c.errors, c.max_remove, c.allowed()) for c in usable]
    weights = np.asarray([steps[c.stage] * c.cost for c in usable])  # MACs saved per group, whole trajectory
    most = float(sum(w * h[0][-1] for w, h in zip(weights, hulls)))
    if budget_macs > most * (1 + 1e-12):
        raise ValueError(
            f"the budget of {budget_macs:.4g} MACs is more than the {most:.4g} that pruning every layer "
            "to its last group removes: lower the sparsity"
        )

    # the hulls side by side, padded with E = +inf (never a minimum)
    width = max((points.size for points, _ in hulls), default=1)
    hull_points = np.zeros((len(hulls), width), dtype=np.int64)
    hull_values = np.full((len(hulls), width), np.inf)
    for row, (points, values) in enumerate(hulls):
        hull_points[row, : points.size], hull_values[row, : values.size] = points, values
    hull_costs = np.asarray([c.cost for c in usable], dtype=np.float64)[:, None]
    rows = np.arange(len(hulls))

    def choose(price: float, more: bool = True) -> np.ndarray:
        # per curve: the hull point minimising E(k) − price·c·k (ties: the larger k, or the smaller)
        objective = hull_values - price * hull_costs * hull_points
        index = width - 1 - np.argmin(objective[:, ::-1], axis=1) if more else np.argmin(objective, axis=1)
        return hull_points[rows, index]

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
        if exact:
            choice = _fill(choose(low, more=False), choice, usable, weights, budget_macs)
    removals = {(c.stage, c.layer): 0 for c in curves}
    error = 0.0
    for k, c in zip(choice, usable):
        removals[(c.stage, c.layer)] = int(k)
        error += steps[c.stage] * float(np.maximum(c.errors[:k], 0.0).sum())
    return MeasuredAllocation(removals, removed(choice), float(budget_macs), error, float(price))


def _fill(below: np.ndarray, above: np.ndarray, curves, weights: np.ndarray, budget: float) -> np.ndarray:
    """From the allocation just under the budget, add single groups until it is met.

    Between the prices `low` and `high` of the bisection only the marginal curves change
    (their hull segment of slope ≈ μ); this walks those segments one group at a time, the
    next group always the one with the smallest recorded ε per MAC, and stops as soon as
    the budget is reached, so the overshoot is less than one group's MACs. The result is
    the Lagrangian optimum up to the non-convexity of one hull segment.
    """
    choice = below.copy()
    done = float(np.dot(weights, choice))
    if done >= budget:
        return choice
    open_curves = [i for i in range(len(curves)) if above[i] > below[i]]
    allowed = {i: curves[i].allowed() for i in open_curves}

    def step(i: int) -> int:  # groups to the next allowed count (1 unless kept widths are rounded)
        return int(allowed[i][allowed[i] > choice[i]][0] - choice[i])

    def price(i: int) -> float:  # recorded ε per MAC of that step
        k, n = choice[i], step(i)
        return float(np.maximum(curves[i].errors[k : k + n], 0.0).sum()) / (curves[i].cost * n)

    while done < budget and open_curves:
        best = min(open_curves, key=price)
        n = step(best)
        choice[best] += n
        done += weights[best] * n
        if choice[best] >= above[best]:
            open_curves.remove(best)
    return choice


@dataclass(frozen=True)
class StageLayer:
    """One prunable layer as the stage allocator sees it: name, groups, MACs of one group."""

    name: str
    num_groups: int
    cost: float  # MACs of one group per model call (any unit common to all layers)
    multiple: int = 1  # kept groups rounded to a multiple of this (MLP units: GEMM-friendly widths)


@dataclass(frozen=True)
class MeasuredStages:
    """The measured allocation of a plan beside the paper's: removals, sparsities, errors.

    Errors are Σ_s n_s Σ_l E_{s,l}(k) in the units of the recorded ε; sparsity of a stage
    is its removed share of the prunable MACs Σ_l c_l k_l / Σ_l c_l G_l.
    """

    removals: tuple[Mapping[str, int], ...]  # per stage: layer name → groups removed
    paper_removals: tuple[Mapping[str, int], ...]
    sparsity: tuple[float, ...]
    paper_sparsity: tuple[float, ...]
    stage_errors: tuple[float, ...]  # n_s Σ_l E_{s,l}(k_{s,l})
    paper_stage_errors: tuple[float, ...]
    macs_removed: float
    budget: float
    price: float

    @property
    def error(self) -> float:
        """The measured allocation's objective: the step-weighted summed recorded error."""
        return float(sum(self.stage_errors))

    @property
    def paper_error(self) -> float:
        """The same objective for the paper's per-stage counts."""
        return float(sum(self.paper_stage_errors))

    def to_dict(self) -> dict:
        """JSON-ready summary (no per-layer removals: the checkpoint's networks hold those)."""
        return {
            "rule": "measured",
            "sparsity": [round(float(s), 6) for s in self.sparsity],
            "paper_sparsity": [round(float(s), 6) for s in self.paper_sparsity],
            "stage_errors": [float(e) for e in self.stage_errors],
            "paper_stage_errors": [float(e) for e in self.paper_stage_errors],
            "error": self.error,
            "paper_error": self.paper_error,
            "macs_removed": float(self.macs_removed),
            "budget": float(self.budget),
            "price": float(self.price),
        }


def _prefix_error(errors: np.ndarray, k: int) -> float:
    return float(np.maximum(np.asarray(errors, dtype=np.float64)[:k], 0.0).sum())


def allocate_stages(
    layers: Sequence[StageLayer],
    errors_by_stage: Sequence[Mapping[str, Sequence[float]] | None],
    step_counts: Sequence[int],
    paper_removals: Sequence[Mapping[str, int]],
) -> MeasuredStages:
    """Spread the paper plan's removed MACs over stages × layers by recorded error (ours).

    The budget B is what the paper's counts remove, Σ_s n_s Σ_l c_l k^paper_{s,l}; the
    measured rule removes B (within one group) at the least Σ_s n_s Σ_l E_{s,l}(k), via
    `allocate_measured(exact=True)`. `errors_by_stage[s]` maps layer names to ε_1…ε_K of
    stage s (None: a stage without an analysis, never pruned). docs/method.md §3.11.
    """
    if not (len(errors_by_stage) == len(step_counts) == len(paper_removals)):
        raise ValueError(
            f"errors_by_stage, step_counts and paper_removals need one entry per stage, got "
            f"{len(errors_by_stage)}, {len(step_counts)}, {len(paper_removals)}"
        )
    steps = [int(n) for n in step_counts]
    curves = []
    for stage, errors in enumerate(errors_by_stage):
        if errors is None or steps[stage] == 0:
            continue
        for layer in layers:
            recorded = np.asarray(errors[layer.name], dtype=np.float64)
            curves.append(LayerCurve(
                stage, layer.name, recorded, float(layer.cost), min(layer.num_groups - 1, recorded.size),
                layer.multiple if layer.multiple < layer.num_groups else 1, layer.num_groups,
            ))
    budget = float(sum(steps[s] * layer.cost * int(paper_removals[s].get(layer.name, 0)) for s in range(len(steps)) for layer in layers))
    allocation = allocate_measured(curves, steps, budget, exact=True)
    dense = float(sum(layer.cost * layer.num_groups for layer in layers))
    removals, sparsity, stage_errors, paper_sparsity, paper_errors = [], [], [], [], []
    for stage, errors in enumerate(errors_by_stage):
        chosen = {layer.name: int(allocation.removals.get((stage, layer.name), 0)) for layer in layers}
        paper = {layer.name: int(paper_removals[stage].get(layer.name, 0)) for layer in layers}
        removals.append(chosen)
        sparsity.append(sum(layer.cost * chosen[layer.name] for layer in layers) / dense)
        paper_sparsity.append(sum(layer.cost * paper[layer.name] for layer in layers) / dense if steps[stage] else 0.0)
        if errors is None:
            stage_errors.append(0.0)
            paper_errors.append(0.0)
            continue
        stage_errors.append(steps[stage] * sum(_prefix_error(errors[layer.name], chosen[layer.name]) for layer in layers))
        paper_errors.append(steps[stage] * sum(_prefix_error(errors[layer.name], paper[layer.name]) for layer in layers))
    return MeasuredStages(
        tuple(removals), tuple({layer.name: int(paper_removals[s].get(layer.name, 0)) for layer in layers} for s in range(len(steps))),
        tuple(sparsity), tuple(paper_sparsity), tuple(stage_errors), tuple(paper_errors),
        allocation.macs_removed, budget, allocation.price,
    )


def merge_stage_allocations(parts: Sequence[MeasuredStages], stages: Sequence[int], num_stages: int = 3) -> MeasuredStages:
    """One `MeasuredStages` from allocations made stage by stage (`parts[j]` allocated stage `stages[j]` alone)."""
    empty = {}
    removals, paper, sparsity, paper_sparsity, errors, paper_errors = [], [], [], [], [], []
    for index in range(num_stages):
        part = next((p for p, s in zip(parts, stages) if s == index), None)
        removals.append(part.removals[index] if part else empty)
        paper.append(part.paper_removals[index] if part else empty)
        sparsity.append(part.sparsity[index] if part else 0.0)
        paper_sparsity.append(part.paper_sparsity[index] if part else 0.0)
        errors.append(part.stage_errors[index] if part else 0.0)
        paper_errors.append(part.paper_stage_errors[index] if part else 0.0)
    return MeasuredStages(
        tuple(removals), tuple(paper), tuple(sparsity), tuple(paper_sparsity), tuple(errors), tuple(paper_errors),
        float(sum(p.macs_removed for p in parts)), float(sum(p.budget for p in parts)),
        max((p.price for p in parts), default=0.0),
    )
