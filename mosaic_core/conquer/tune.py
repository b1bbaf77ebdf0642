"""Budget tuner: the best steps × pruning × caching × CFG at a MAC budget, and the Pareto front.

A budget b is a fraction of the dense model's MACs at the reference step count N₀ (a
speed-up k is b = 1/k). Every sampler step count n of a grid can meet it several ways
(`methods`):

    dense            fewer steps alone, when n ≤ b·N₀ (MACs n/N₀ of the reference)
    cache            the dense network with DeepCache-style block reuse (conquer/caching.py),
                     the setting closest to b from below
    paper, measured  pruned at sparsity s̄(n) = 1 − b·N₀/n (step-weighted, eq. 2.1) when
                     s̄(n) ≤ 0.9, with the paper's allocation or the measured one
    measured+cache   pruned (measured) at half of s̄(n), block reuse spending the rest

The stage boundaries are τ ranges that do not depend on n, so one set of cached analyses
(Hessians and recorded OBS errors, per stage) serves every candidate: a candidate costs a
re-solve of its kept weights and a short sampling run. Each is scored by its recorded error
(Σ_s n_s Σ_l E_{s,l}) and by PSNR to the dense model at N₀ steps (at the asked CFG) on a few
seeded images. Last, the best `cfg_top` candidates within the budget are sampled again at
every guidance scale of `cfg_grid` (the paper reports that the best CFG rises with
sparsity). The front is the candidates no other beats in both MACs and PSNR, the chosen
point the best PSNR within the budget. docs/method.md §4.5 **[ours]**.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional, Sequence

import numpy as np

ALLOCATION_NAMES = {"per-stage": "paper", "measured": "measured"}
METHODS = ("dense", "cache", "paper", "measured", "measured+cache")
GRID_FRACTIONS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def default_steps_grid(reference_steps: int) -> list[int]:
    """Step counts tried by default: 20 %, 30 %, …, 100 % of the reference (10, 15, …, 50 of 50).

    The 90 % point matters: at 0.7 of the MACs, 45 steps pruned at s̄ = 0.22 keep closer to
    dense than 50 steps at 0.3 on digits-dit (docs/method.md §4.5).
    """
    return sorted({max(1, round(f * int(reference_steps))) for f in GRID_FRACTIONS})


_PRUNE_ALLOCATION = {"paper": "per-stage", "measured": "measured", "measured+cache": "measured"}


@dataclass(frozen=True)
class TunePoint:
    """One candidate: steps, how it meets the budget, its MACs and its quality.

    `allocation` names the method (for JSON readers of earlier versions the field keeps its
    name): "dense" (fewer steps), "cache", "paper", "measured" or "measured+cache".
    """

    steps: int
    allocation: str
    sparsity: float  # the plan's overall (step-weighted) sparsity
    macs: float  # block-linear sampling MACs of one image
    macs_fraction: float  # of the dense model at the reference steps
    recorded_error: float  # Σ_s n_s Σ_l E_{s,l}(k) (0 for dense)
    psnr: float  # dB to the dense model at the reference steps
    seconds: float  # sampling seconds of the validation images
    stage_sparsity: tuple[float, float, float] = (0.0, 0.0, 0.0)  # early, middle, late as pruned
    guidance_scale: Optional[float] = None  # the CFG this point was sampled at
    cache: Optional[tuple[int, int, int]] = None  # block reuse: (interval, keep_first, keep_last)
    target_sparsity: float = 0.0  # the sparsity its plan was asked for (rebuilds it: `candidate_denoiser`)


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
    guidance_scale: Optional[float] = None  # the CFG of the dense reference

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "budget": self.budget, "reference_steps": self.reference_steps, "images": self.images,
            "guidance_scale": self.guidance_scale,
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


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """`methods` as a tuple in `METHODS` order, or ValueError naming the unknown ones."""
    if isinstance(methods, str):
        methods = [part.strip() for part in methods.split(",") if part.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"tuner methods must be some of {', '.join(METHODS)}, got {', '.join(map(str, methods)) or 'none'}")
    return tuple(m for m in METHODS if m in methods)


def tune(
    loaded,
    budget: float,
    prune_config,
    reference_steps: int = 50,
    steps_grid: Optional[Sequence[int]] = None,
    allocations: Optional[Sequence[str]] = None,
    M: float = 0.55,
    lam: float = 0.01,
    scheduler: str = "ddim",
    cx: float = 1.0,
    images: int = 4,
    seed: int = 0,
    guidance_scale: Optional[float] = None,
    analyses: Optional[dict] = None,
    memo: Optional[dict] = None,
    on_progress: Optional[Callable[[str], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    methods: Sequence[str] = METHODS,
    cfg_grid: Sequence[float] = (),
    cfg_top: int = 2,
) -> TuneResult:
    """Search steps × method (× CFG) at `budget` (fraction of dense MACs at `reference_steps`); module docstring.

    `guidance_scale` None is the model's default CFG. `analyses` is the prune cache (reused
    and filled: a second call re-solves, never re-gathers); `memo` keeps what does not depend
    on the budget (the dense reference and the dense fewer-steps points) for the next call
    with another budget. `allocations` (older callers: "per-stage"/"measured") narrows the
    pruned methods as `methods` does.
    """
    from mosaic_core.conquer.caching import BlockReuse, match_cache_to_macs
    from mosaic_core.conquer.conditions import conditions_for, default_values
    from mosaic_core.conquer.metrics import mean_psnr
    from mosaic_core.conquer.sampling import SampleConfig, run_to_end, sample_loaded
    from mosaic_core.divide.allocation import MAX_SPARSITY
    from mosaic_core.divide.plan import build_plan
    from mosaic_core.models.adapters import adapter_for_model

    start = time.perf_counter()
    budget = check_budget(budget)
    methods = check_methods(methods)
    if allocations is not None:
        wanted = {ALLOCATION_NAMES.get(a, a) for a in allocations}
        methods = tuple(m for m in methods if m in ("dense", "cache") or m.split("+")[0] in wanted)
    steps_grid = default_steps_grid(reference_steps) if steps_grid is None else steps_grid
    steps_grid = sorted({int(n) for n in steps_grid if 1 <= int(n) <= reference_steps})
    if not steps_grid:
        raise ValueError(f"steps_grid needs a step count in [1, {reference_steps}], got {list(steps_grid)}")
    cfg = float(loaded.spec.default_cfg if guidance_scale is None else guidance_scale)
    grid_cfgs = sorted({float(g) for g in cfg_grid} - {cfg})
    analyses = {} if analyses is None else analyses
    labels = conditions_for(loaded, default_values(loaded.spec, images))
    dense = loaded.transformer
    num_blocks = len(adapter_for_model(dense).block_paths(dense))

    def say(message: str) -> None:
        if should_stop is not None and should_stop():
            from mosaic_core.jobs import Cancelled

            raise Cancelled("tuning cancelled")
        if on_progress is not None:
            on_progress(message)

    def run(n: int, transformer=None, scale: float = cfg):
        config = SampleConfig(n, scale, scheduler, seed)
        result = run_to_end(sample_loaded(loaded, labels, config, transformer=transformer))
        return result.images, float(np.sum(result.step_seconds))

    memo = {} if memo is None else memo
    base = (loaded.spec.name, loaded.weights_hash, scheduler, images, seed, cfg)
    if (base, "reference", reference_steps) not in memo:
        say(f"dense reference, {reference_steps} steps")
        memo[(base, "reference", reference_steps)] = run(reference_steps)[0]
    reference = memo[(base, "reference", reference_steps)]
    dense_plan = build_plan(loaded.spec, reference_steps, M, lam, scheduler=scheduler, cx=cx)
    dense_macs = float(dense_plan.macs_dense)
    dense_step = dense_macs / reference_steps
    budget_macs = budget * dense_macs
    common = dict(M=M, lam=lam, scheduler=scheduler, cx=cx, analyses=analyses, should_stop=should_stop)

    def scored(point: TunePoint, transformer, scale: float = cfg) -> TunePoint:
        images_n, seconds = run(point.steps, transformer, scale)
        return replace(point, psnr=mean_psnr(images_n, reference), seconds=seconds, guidance_scale=scale)

    points = []
    for n in steps_grid:
        fraction = n / reference_steps
        key = (base, "dense", reference_steps, n)
        if key not in memo:
            say(f"dense, {n} steps")
            memo[key] = scored(TunePoint(n, "dense", 0.0, dense_step * n, fraction, 0.0, 0.0, 0.0), None)
        if "dense" in methods or n == reference_steps:
            points.append(memo[key])
        target = 1.0 - budget * reference_steps / n
        if target <= 0:
            continue  # dense already fits
        if "cache" in methods:
            fit = match_cache_to_macs(num_blocks, [dense_step] * n, budget_macs, within=True)
            if fit is not None:
                say(f"cache, {n} steps, full every {fit[0].interval}")
                point = TunePoint(n, "cache", 0.0, float(fit[1]), fit[1] / dense_macs, 0.0, 0.0, 0.0, cache=_cache_tuple(fit[0]))
                points.append(scored(point, BlockReuse(dense, fit[0])))
        for method in ("paper", "measured", "measured+cache"):
            if method not in methods:
                continue
            stacked = method == "measured+cache"
            asked = target / 2 if stacked else target
            if asked > MAX_SPARSITY:
                continue  # no plan removes that much
            if not stacked:  # raised until the plan's own MACs fit
                asked = _sparsity_within(loaded.spec, n, M, lam, scheduler, cx, asked, budget_macs)
                if asked is None:
                    continue
            plan = build_plan(loaded.spec, n, M, lam, sparsity=asked, scheduler=scheduler, cx=cx)
            say(f"{method}, {n} steps, sparsity {plan.overall_sparsity:.3f}")
            result = run_to_end(_prune(loaded, plan, prune_config, _PRUNE_ALLOCATION[method], analyses, should_stop))
            step_macs = staged_step_macs(plan, result)
            error, stages = _recorded(loaded, plan, result)
            point = TunePoint(
                n, method, float(plan.overall_sparsity), float(sum(step_macs)), float(sum(step_macs)) / dense_macs, float(error),
                0.0, 0.0, stages, target_sparsity=float(asked),
            )
            transformer = result.staged
            if stacked:
                networks = [id(result.staged.networks()[s]) for s in plan.step_stages]
                fit = match_cache_to_macs(num_blocks, step_macs, budget_macs, networks, within=True)
                if fit is None:
                    continue
                point = replace(point, macs=float(fit[1]), macs_fraction=fit[1] / dense_macs, cache=_cache_tuple(fit[0]))
                transformer = BlockReuse(result.staged, fit[0])
            points.append(scored(point, transformer))
    # the best few within the budget again at every other guidance scale of the grid
    within = [p for p in points if p.macs_fraction <= budget + 1e-12 and not (p.allocation == "dense" and p.steps == reference_steps)]
    for point in sorted(within, key=lambda p: -p.psnr)[: max(0, int(cfg_top))] if grid_cfgs else []:
        transformer = None
        for scale in grid_cfgs:
            say(f"{point.allocation}, {point.steps} steps, cfg {scale:g}")
            if transformer is None:
                transformer = candidate_denoiser(loaded, point, prune_config, **common)
            points.append(scored(point, transformer, scale))
    front = pareto_front([p.macs for p in points], [p.psnr for p in points])
    fits = [i for i, p in enumerate(points) if p.macs_fraction <= budget + 1e-12]
    chosen = max(fits, key=lambda i: (points[i].psnr, -points[i].macs)) if fits else None
    return TuneResult(budget, reference_steps, images, tuple(points), tuple(front), chosen, time.perf_counter() - start, cfg)


def candidate_denoiser(loaded, point: TunePoint, prune_config, M: float = 0.55, lam: float = 0.01, scheduler: str = "ddim",
                       cx: float = 1.0, analyses: Optional[dict] = None, should_stop=None):
    """The denoiser that realises `point` (None: the dense model), rebuilt from (cached) analyses.

    Sample it at `point.steps` steps and `point.guidance_scale`; the same plan, pruning and
    reuse setting as when the point was tuned, so its images are the tuned ones.
    """
    from mosaic_core.conquer.caching import BlockReuse, CacheConfig
    from mosaic_core.conquer.sampling import run_to_end
    from mosaic_core.divide.plan import build_plan

    transformer = None
    if point.allocation in _PRUNE_ALLOCATION:
        plan = build_plan(loaded.spec, point.steps, M, lam, sparsity=point.target_sparsity, scheduler=scheduler, cx=cx)
        analyses = {} if analyses is None else analyses
        result = run_to_end(_prune(loaded, plan, prune_config, _PRUNE_ALLOCATION[point.allocation], analyses, should_stop))
        transformer = result.staged
    elif point.allocation not in ("dense", "cache"):
        raise ValueError(f"unknown tuner method {point.allocation!r}: expected one of {', '.join(METHODS)}")
    if point.cache is not None:
        transformer = BlockReuse(loaded.transformer if transformer is None else transformer, CacheConfig(*point.cache))
    return transformer


def staged_step_macs(plan, result) -> list[float]:
    """Block-linear MACs of each sampler step of a pruned `result` of `plan` (its stage network's).

    The measured rule moves sparsity between stages, so its networks are costed from each
    stage's removed share of the prunable MACs (`MeasuredStages.sparsity`); every
    block-linear MAC is prunable, so a stage's step costs (1 − share) of a dense step. The
    paper's networks are costed from the plan's allocation.
    """
    from mosaic_core.conquer.bench import _stage_step_macs

    measured = getattr(result, "measured", None)
    if measured is None:
        return [float(m) for m in _stage_step_macs(plan)]
    dense_step = plan.macs_dense / plan.num_inference_steps
    per_stage = [dense_step * (1.0 - float(s)) for s in measured.sparsity]
    return [per_stage[s] for s in plan.step_stages]


def _prune(loaded, plan, prune_config, allocation, analyses, should_stop):
    from mosaic_core.prune.stage_pruning import prune_steps

    return prune_steps(loaded, plan, replace(prune_config, allocation=allocation), analyses=analyses, should_stop=should_stop)


def _recorded(loaded, plan, result) -> tuple[float, tuple[float, float, float]]:
    """The recorded error of the pruned networks and their stage sparsities (as pruned)."""
    if result.measured is not None:
        return float(result.measured.error), tuple(float(x) for x in result.measured.sparsity)
    stages = tuple(float(x) if c else 0.0 for x, c in zip(plan.allocation.achieved, plan.step_counts))
    return _paper_error(loaded, plan, result), stages


def _cache_tuple(config) -> tuple[int, int, int]:
    return (int(config.interval), int(config.keep_first), int(config.keep_last))


def _sparsity_within(spec, steps, M, lam, scheduler, cx, target, budget_macs) -> Optional[float]:
    """The sparsity whose auto plan fits the budget: `target`, raised by whole MLP units until it does."""
    from mosaic_core.divide.allocation import MAX_SPARSITY, sparsity_resolution
    from mosaic_core.divide.plan import build_plan

    sparsity = target
    for _ in range(64):
        sparsity = min(sparsity, MAX_SPARSITY)
        plan = build_plan(spec, steps, M, lam, sparsity=sparsity, scheduler=scheduler, cx=cx)
        if plan.macs_staged <= budget_macs:
            return float(sparsity)
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
