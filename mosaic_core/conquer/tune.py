"""Budget tuner: the best steps × allocation at a MAC budget, and the Pareto front around it.

A budget b is a fraction of the dense model's MACs at the reference step count N₀ (a
speed-up k is b = 1/k). Every sampler step count n of a grid can meet it two ways:

    dense with fewer steps   when n ≤ b·N₀ (MACs n/N₀ of the reference), or
    pruned at sparsity       s̄(n) = 1 − b·N₀/n   (step-weighted, eq. 2.1), when s̄(n) ≤ 0.9,

the pruned one with the paper's allocation or the measured one (`measured_allocation`).
The stage boundaries are τ ranges that do not depend on n, so one set of cached analyses
(Hessians and recorded OBS errors, per stage) serves every candidate: a candidate costs a
re-solve of its kept weights and a short sampling run. Each is scored by its recorded error
(Σ_s n_s Σ_l E_{s,l}) and by PSNR to the dense model at N₀ steps on a few seeded images; the
front is the candidates no other beats in both MACs and PSNR, and the chosen point the best
PSNR within the budget. docs/method.md §4.5 **[ours]**.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional, Sequence

import numpy as np

ALLOCATION_NAMES = {"per-stage": "paper", "measured": "measured"}


@dataclass(frozen=True)
class TunePoint:
    """One candidate: steps, how it meets the budget, its MACs and its quality."""

    steps: int
    allocation: str  # "dense" (fewer steps, no pruning) | "paper" | "measured"
    sparsity: float  # the plan's overall (step-weighted) sparsity
    macs: float  # block-linear sampling MACs of one image
    macs_fraction: float  # of the dense model at the reference steps
    recorded_error: float  # Σ_s n_s Σ_l E_{s,l}(k) (0 for dense)
    psnr: float  # dB to the dense model at the reference steps
    seconds: float  # sampling seconds of the validation images
    stage_sparsity: tuple[float, float, float] = (0.0, 0.0, 0.0)  # early, middle, late as pruned


@dataclass(frozen=True)
class TuneResult:
    """All candidates, the Pareto front (indices, ascending MACs) and the chosen one."""

    budget: float
    reference_steps: int
    images: int
    points: tuple[TunePoint, ...]
    front: tuple[int, ...]
    chosen: Optional[int]
    seconds: float  # wall time of this tuning

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "budget": self.budget, "reference_steps": self.reference_steps, "images": self.images,
            "points": [asdict(p) for p in self.points], "front": list(self.front), "chosen": self.chosen,
            "seconds": round(self.seconds, 3),
        }


def pareto_front(macs: Sequence[float], quality: Sequence[float]) -> list[int]:
    """Indices of the points no other point dominates (≤ MACs and ≥ quality, one strictly), by ascending MACs."""
    order = sorted(range(len(macs)), key=lambda i: (macs[i], -quality[i]))
    front, best = [], -math.inf
    for i in order:
        if quality[i] > best:
            front.append(i)
            best = quality[i]
    return front


def check_budget(budget: float) -> float:
    """`budget` as a float, or ValueError unless it is in (0, 1]."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (0 < budget <= 1):
        raise ValueError(f"budget must be a fraction of the dense MACs in (0, 1] (a speed-up k is 1/k), got {budget!r}")
    return float(budget)


def tune(
    loaded,
    budget: float,
    prune_config,
    reference_steps: int = 50,
    steps_grid: Sequence[int] = (10, 15, 20, 25, 30, 40, 50),
    allocations: Sequence[str] = ("per-stage", "measured"),
    M: float = 0.55,
    lam: float = 0.01,
    scheduler: str = "ddim",
    cx: float = 1.0,
    images: int = 4,
    seed: int = 0,
    guidance_scale: float = 1.5,
    analyses: Optional[dict] = None,
    memo: Optional[dict] = None,
    on_progress: Optional[Callable[[str], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> TuneResult:
    """Search steps × allocation at `budget` (fraction of dense MACs at `reference_steps`); module docstring.

    `analyses` is the prune cache (reused and filled: a second call re-solves, never re-gathers);
    `memo` keeps what does not depend on the budget (the dense reference and the dense
    fewer-steps points) for the next call with another budget.
    """
    from mosaic_core.conquer.metrics import mean_psnr
    from mosaic_core.conquer.sampling import SampleConfig, labels_for, run_to_end, sample_loaded
    from mosaic_core.divide.allocation import MAX_SPARSITY
    from mosaic_core.divide.plan import build_plan
    from mosaic_core.prune.stage_pruning import prune_steps

    start = time.perf_counter()
    budget = check_budget(budget)
    steps_grid = sorted({int(n) for n in steps_grid if 1 <= int(n) <= reference_steps})
    if not steps_grid:
        raise ValueError(f"steps_grid needs a step count in [1, {reference_steps}], got {list(steps_grid)}")
    analyses = {} if analyses is None else analyses
    labels = labels_for(images, loaded.spec.num_classes)
    def say(message: str) -> None:
        if should_stop is not None and should_stop():
            from mosaic_core.jobs import Cancelled

            raise Cancelled("tuning cancelled")
        if on_progress is not None:
            on_progress(message)

    def run(n: int, transformer=None):
        config = SampleConfig(n, guidance_scale, scheduler, seed)
        result = run_to_end(sample_loaded(loaded, labels, config, transformer=transformer))
        return result.images, float(np.sum(result.step_seconds))

    memo = {} if memo is None else memo
    base = (loaded.spec.name, loaded.weights_hash, scheduler, images, seed, float(guidance_scale))
    if (base, "reference", reference_steps) not in memo:
        say(f"dense reference, {reference_steps} steps")
        memo[(base, "reference", reference_steps)] = run(reference_steps)[0]
    reference = memo[(base, "reference", reference_steps)]
    dense_plan = build_plan(loaded.spec, reference_steps, M, lam, scheduler=scheduler, cx=cx)
    dense_macs = float(dense_plan.macs_dense)
    points = []
    for n in steps_grid:
        fraction = n / reference_steps
        key = (base, "dense", reference_steps, n)
        if key not in memo:
            say(f"dense, {n} steps")
            images_n, seconds = run(n)
            memo[key] = TunePoint(n, "dense", 0.0, dense_macs * fraction, fraction, 0.0, mean_psnr(images_n, reference), seconds)
        points.append(memo[key])
        target = 1.0 - budget * reference_steps / n
        if target <= 0 or target > MAX_SPARSITY:
            continue  # dense already fits, or no plan removes that much
        plan = _plan_within(loaded.spec, n, M, lam, scheduler, cx, target, budget * dense_macs)
        if plan is None:
            continue
        for allocation in allocations:
            say(f"{ALLOCATION_NAMES.get(allocation, allocation)}, {n} steps, sparsity {plan.overall_sparsity:.3f}")
            config = replace(prune_config, allocation=allocation)
            result = run_to_end(prune_steps(loaded, plan, config, analyses=analyses, should_stop=should_stop))
            tokens = plan.shape.num_tokens or 1
            if result.measured is not None:
                macs = plan.macs_dense - result.measured.macs_removed * tokens
                error = result.measured.error
                stages = tuple(float(x) for x in result.measured.sparsity)
            else:
                macs = float(plan.macs_staged)
                error = _paper_error(loaded, plan, result)
                stages = tuple(float(x) if c else 0.0 for x, c in zip(plan.allocation.achieved, plan.step_counts))
            images_n, seconds = run(n, result.staged)
            points.append(
                TunePoint(
                    n, ALLOCATION_NAMES.get(allocation, allocation), float(plan.overall_sparsity), float(macs),
                    float(macs) / dense_macs, float(error), mean_psnr(images_n, reference), seconds, stages,
                )
            )
    front = pareto_front([p.macs for p in points], [p.psnr for p in points])
    within = [i for i, p in enumerate(points) if p.macs_fraction <= budget + 1e-12]
    chosen = max(within, key=lambda i: (points[i].psnr, -points[i].macs)) if within else None
    return TuneResult(budget, reference_steps, images, tuple(points), tuple(front), chosen, time.perf_counter() - start)


def _plan_within(spec, steps, M, lam, scheduler, cx, target, budget_macs):
    """The auto plan at `target` sparsity, raised by whole MLP units until its MACs fit the budget."""
    from mosaic_core.divide.allocation import MAX_SPARSITY, sparsity_resolution
    from mosaic_core.divide.plan import build_plan

    sparsity = target
    for _ in range(64):
        plan = build_plan(spec, steps, M, lam, sparsity=min(sparsity, MAX_SPARSITY), scheduler=scheduler, cx=cx)
        if plan.macs_staged <= budget_macs:
            return plan
        if sparsity >= MAX_SPARSITY:
            return None
        sparsity += sparsity_resolution(plan.shape) if not hasattr(plan.shape, "layers") else 0.002
    return None


def _paper_error(loaded, plan, result) -> float:
    """The recorded error of the paper's counts (the measured allocator's objective, for comparison)."""
    from mosaic_core.prune.stage_pruning import measured_stages

    by_stage = {}
    for i in range(3):
        for analysis in result.analyses.values():
            if analysis.t_range is None or tuple(analysis.t_range) == tuple(plan.bounds.ranges[i] or ()):
                by_stage[i] = analysis
    if not by_stage:
        return 0.0
    return measured_stages(loaded.transformer, plan, by_stage).paper_error
