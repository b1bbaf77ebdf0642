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
    measured+cache-dit  pruned (measured) at half of s̄(n), cache-dit's DBCache spending the
                     rest: its threshold bisected on the validation images until the run's
                     MACs fit (conquer/cache_dit_row.py; diffusers' DiT only)
    drop             fewer steps as a subset of the reference's own: n of the N₀ reference
                     timesteps kept evenly, DDIM jumping over the rest (ddim only; method §4.6)
    measured+drop    pruned (measured) for those n kept reference steps, at the s̄ that fits

The stage boundaries are τ ranges that do not depend on n, so one set of cached analyses
(Hessians and recorded OBS errors, per stage) serves every candidate: a candidate costs a
re-solve of its kept weights and a short sampling run. Each is scored by its recorded error
(Σ_s n_s Σ_l E_{s,l}) and by PSNR to the dense model at N₀ steps (at the asked CFG) on a few
seeded images. Last, the best `cfg_top` candidates within the budget are sampled again at
every guidance scale of `cfg_grid` (the paper reports that the best CFG rises with
sparsity). The front is the candidates no other beats in both MACs and PSNR, the chosen
point the best PSNR within the budget.

Re-tuning at another budget predicts instead of sampling: per pruned method a
`QualityModel` (MSE = MSE_dense(n) + κ·E^α, plus a term for how the two errors interact) is fit
to the points sampled so far (`memo`), and for the two reuse methods one `ReuseModel` adds the
error of the reuse setting to the measured one; every candidate's E, MACs and reuse setting come
from the cached analyses in milliseconds, and only the best predicted ones that can still win
are pruned and sampled (`check`). docs/method.md §4.5 **[ours]**.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional, Sequence

import numpy as np

ALLOCATION_NAMES = {"per-stage": "paper", "measured": "measured"}
METHODS = ("dense", "cache", "paper", "measured", "measured+cache", "measured+cache-dit", "drop", "measured+drop")
# what `tune` tries unless told: measured+cache-dit only when named. Each of its candidates costs
# 6 sampling runs, and its choice is the least reliable: on 8 validation images at budget 0.5
# it won with 39.8 dB and kept 37.9 on 64 held-out images, below the default choice's 39.5
# (cache-dit's skips follow the images; docs/method.md §4.5).
DEFAULT_METHODS = ("dense", "cache", "paper", "measured", "measured+cache", "drop", "measured+drop")
DROP_METHODS = ("drop", "measured+drop")  # ddim only: other samplers leave them out unless named
CACHE_DIT_PROBES = 6  # threshold bisection runs per measured+cache-dit candidate (geometric: steps of 12 %)
CACHE_DIT_WARMUP = 0.16  # full steps first, as a share of the steps: cache-dit's default 8 of 50
# predicted candidates sampled at most per tuning (`tune(check=...)`): with the drop methods a budget has
# about twice the candidates, and 2 looks left 0.95 dB at 0.6 where 4 found the exhaustive choice (method §4.5)
DEFAULT_CHECK = 4
MIN_MARGIN_DB = 1.0  # a predicted candidate is sampled while prediction + max(residual, this) reaches the best sampled
GRID_FRACTIONS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def default_steps_grid(reference_steps: int) -> list[int]:
    """Step counts tried by default: 20 %, 30 %, …, 100 % of the reference (10, 15, …, 50 of 50).

    The 90 % point matters: at 0.7 of the MACs, 45 steps pruned at s̄ = 0.22 keep closer to
    dense than 50 steps at 0.3 on digits-dit (docs/method.md §4.5).
    """
    return sorted({max(1, round(f * int(reference_steps))) for f in GRID_FRACTIONS})


_PRUNE_ALLOCATION = {"paper": "per-stage", "measured": "measured", "measured+cache": "measured", "measured+cache-dit": "measured",
                     "measured+drop": "measured"}


def _candidate_config(prune_config, allocation: str, refit: bool):
    """`prune_config` for one candidate: its allocation and refit; a unit multiple rounds only the measured one."""
    unit_multiple = prune_config.unit_multiple if allocation == "measured" else 1
    return replace(prune_config, allocation=allocation, refit=refit, unit_multiple=unit_multiple)


@dataclass(frozen=True)
class TunePoint:
    """One candidate: steps, how it meets the budget, its MACs and its quality.

    `allocation` names the method (for JSON readers of earlier versions the field keeps its
    name): "dense" (fewer steps), "cache", "paper", "measured", "measured+cache" or
    "measured+cache-dit".
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
    predicted: bool = False  # psnr is the quality model's prediction from recorded_error; never sampled
    cache_dit: Optional[tuple[float, int, int, int]] = None  # cache-dit's DBCache: (threshold, fn, bn, warmup)
    drop_steps: int = 0  # reference steps dropped (drop methods): `steps` of the steps + drop_steps reference ones run

    @property
    def steps_label(self) -> str:
        """"45", or "45/50" when 45 of the 50 reference steps run (the rest dropped)."""
        return f"{self.steps}/{self.steps + self.drop_steps}" if self.drop_steps else str(self.steps)


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
    quality_models: Optional[dict] = None  # method -> `QualityModel` fields, fit to every point sampled so far (predicted points use it)
    unchecked: int = 0  # predicted candidates that still promised to win but were left unsampled by `check_seconds`
    edges: Optional[tuple[int, int]] = None  # the middle stage every plan kept, set by hand; None: from M

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "budget": self.budget, "reference_steps": self.reference_steps, "images": self.images,
            "guidance_scale": self.guidance_scale,
            "points": [asdict(p) for p in self.points], "front": list(self.front), "chosen": self.chosen,
            "seconds": round(self.seconds, 3), "quality_models": dict(self.quality_models or {}),
            "unchecked": self.unchecked, "edges": None if self.edges is None else list(self.edges),
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


def methods_for_sampler(methods: Sequence[str], scheduler: str, named: bool) -> tuple[str, ...]:
    """The tuner methods `scheduler` can run: the drop methods jump DDIM, so with another sampler they
    are an error when `named` (asked for by name), else left out (a default set)."""
    if scheduler == "ddim" or not any(m in DROP_METHODS for m in methods):
        return tuple(methods)
    if named:
        raise ValueError(
            f"tuner methods {', '.join(DROP_METHODS)} jump DDIM over dropped steps: they need the ddim sampler, got '{scheduler}'"
        )
    return tuple(m for m in methods if m not in DROP_METHODS)


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
    methods: Sequence[str] = DEFAULT_METHODS,
    cfg_grid: Sequence[float] = (),
    cfg_top: int = 2,
    check: int = DEFAULT_CHECK,
    check_seconds: Optional[float] = None,
    edges: Optional[Sequence[int]] = None,
) -> TuneResult:
    """Search steps × method (× CFG) at `budget` (fraction of dense MACs at `reference_steps`); module docstring.

    `guidance_scale` None is the model's default CFG. `analyses` is the prune cache (reused
    and filled: a second call re-solves, never re-gathers); `memo` keeps what does not depend
    on the budget (the dense reference, the dense fewer-steps points, every scored candidate)
    for the next call with another budget. `allocations` (older callers: "per-stage"/"measured")
    narrows the pruned methods as `methods` does. `check` K > 0: a pruned method whose quality
    model can be fit from the memo's earlier points is predicted, and at most its K best
    candidates, only while one still promises to beat the best sampled, are pruned and sampled;
    0 samples every candidate. `check_seconds` bounds that checking in time: after the first
    predicted candidate, the next is sampled only if it should finish (at the cost of the
    slowest one checked so far) within `check_seconds` of the call's start; the rest stay
    predicted and `TuneResult.unchecked` counts the ones the time bound left out.
    """
    from mosaic_core.conquer.caching import BlockReuse, block_macs, match_cache_to_macs
    from mosaic_core.conquer.conditions import conditions_for, default_values
    from mosaic_core.conquer.metrics import mean_psnr
    from mosaic_core.conquer.sampling import SampleConfig, run_to_end, sample_loaded
    from mosaic_core.divide.allocation import MAX_SPARSITY
    from mosaic_core.divide.plan import build_plan
    from mosaic_core.models.adapters import adapter_for_model

    start = time.perf_counter()
    budget = check_budget(budget)
    methods = check_methods(methods)
    check = check_count(check)
    if check_seconds is not None and (isinstance(check_seconds, bool) or not isinstance(check_seconds, (int, float))
                                      or not math.isfinite(check_seconds) or not 0 < check_seconds <= 3600):
        raise ValueError(f"check_seconds must be a number of seconds in (0, 3600], got {check_seconds!r}")
    if allocations is not None:
        wanted = {ALLOCATION_NAMES.get(a, a) for a in allocations}
        methods = tuple(m for m in methods if m in ("dense", "cache", "drop") or m.split("+")[0] in wanted)
    methods = methods_for_sampler(methods, scheduler, named=methods != DEFAULT_METHODS)
    steps_grid = default_steps_grid(reference_steps) if steps_grid is None else steps_grid
    steps_grid = sorted({int(n) for n in steps_grid if 1 <= int(n) <= reference_steps})
    if not steps_grid:
        raise ValueError(f"steps_grid needs a step count in [1, {reference_steps}], got {list(steps_grid)}")
    cfg = float(loaded.spec.default_cfg if guidance_scale is None else guidance_scale)
    grid_cfgs = sorted({float(g) for g in cfg_grid} - {cfg})
    analyses = {} if analyses is None else analyses
    labels = conditions_for(loaded, default_values(loaded.spec, images))
    if not getattr(labels, "unconditional", True) and (cfg != 1.0 or grid_cfgs):
        raise ValueError(
            f"'{loaded.spec.name}' is guidance-distilled (Flux): it samples at cfg 1 only, so there is no guidance "
            f"scale to tune; drop --cfg-grid and --cfg (got cfg {cfg:g}, grid {[*grid_cfgs]})"
        )
    dense = loaded.transformer
    num_blocks = len(adapter_for_model(dense).block_paths(dense))
    dense_blocks = block_macs(dense, loaded.spec.shape)  # what a cached step of each block saves

    def say(message: str) -> None:
        if should_stop is not None and should_stop():
            from mosaic_core.jobs import Cancelled

            raise Cancelled("tuning cancelled")
        if on_progress is not None:
            on_progress(message)

    def run(n: int, transformer=None, scale: float = cfg, drop: int = 0):
        config = SampleConfig(n + drop, scale, scheduler, seed, drop_steps=drop)
        result = run_to_end(sample_loaded(loaded, labels, config, transformer=transformer))
        return result.images, float(np.sum(result.step_seconds))

    memo = {} if memo is None else memo
    base = (loaded.spec.name, loaded.weights_hash, scheduler, images, seed, cfg)
    if (base, "reference", reference_steps) not in memo:
        say(f"dense reference, {reference_steps} steps")
        memo[(base, "reference", reference_steps)] = run(reference_steps)[0]
    reference = memo[(base, "reference", reference_steps)]
    dense_plan = build_plan(loaded.spec, reference_steps, M, lam, scheduler=scheduler, cx=cx, edges=edges)
    dense_macs = float(dense_plan.macs_dense)
    dense_step = dense_macs / reference_steps
    budget_macs = budget * dense_macs
    common = dict(M=M, lam=lam, scheduler=scheduler, cx=cx, analyses=analyses, should_stop=should_stop, edges=edges)
    # what a scored candidate's quality depends on besides its steps and method
    setting = (reference_steps, M, lam, cx, json.dumps({**prune_config.to_dict(), "allocation": None}, sort_keys=True))
    if edges is not None:  # hand-set stage edges make other candidates (keys without them stay as they were)
        setting = (*setting, "edges", *map(int, edges))

    def scored(point: TunePoint, transformer, scale: float = cfg) -> TunePoint:
        images_n, seconds = run(point.steps, transformer, scale, point.drop_steps)
        return replace(point, psnr=mean_psnr(images_n, reference), seconds=seconds, guidance_scale=scale)

    def point_key(identity: tuple, scale: float = cfg) -> tuple:
        return (base, "point", setting, *identity, scale)

    def recalled(identity, point: TunePoint, build: Callable[[], object], scale: float = cfg) -> TunePoint:
        """The memo's point for `identity`, or `point` built and sampled now (and remembered)."""
        key = point_key(identity, scale)
        if key not in memo:
            memo[key] = scored(point, build(), scale)
        return memo[key]

    from mosaic_core.conquer.cache_dit_row import serves_cache_dit

    cache_dit_served = "measured+cache-dit" in methods and serves_cache_dit(dense, methods != METHODS, "measured+cache-dit")

    def cache_dit_point(n: int, asked: float) -> list[TunePoint]:
        """The measured+cache-dit candidate at n steps: pruned at `asked`, the DBCache threshold
        bisected on the validation images until the run fits the budget; [] when none fits."""
        from mosaic_core.conquer.cache_dit_row import DBCacheSetting, threshold_search

        identity = (n, "measured+cache-dit", round(float(asked), 9), round(budget, 9))
        if point_key(identity) in memo:
            return [memo[point_key(identity)]]
        plan = build_plan(loaded.spec, n, M, lam, sparsity=asked, scheduler=scheduler, cx=cx, edges=edges)
        say(f"measured+cache-dit, {n} steps, sparsity {plan.overall_sparsity:.3f}")
        config = _candidate_config(prune_config, "measured", False)
        point, result = _pruned_point(loaded, plan, config, "measured+cache-dit", float(asked), analyses, should_stop, dense_macs)
        runs = {}

        def probe(row) -> None:
            runs[row.setting.threshold] = run(n, row)

        base = DBCacheSetting(None, warmup=max(1, round(CACHE_DIT_WARMUP * n)))
        search = threshold_search(probe, result.staged, n, budget * reference_steps / n, base, CACHE_DIT_PROBES, dense=dense)
        setting, share = run_to_end(search, lambda probed: say(
            f"measured+cache-dit, {n} steps, threshold {probed[0]:.3g}: {probed[1] * n / reference_steps:.3f} of the MACs"))
        macs = share * dense_step * n
        if macs > budget_macs * (1 + 1e-9):
            return []  # the warm-up and the always-run blocks alone exceed the budget
        images_n, seconds = runs[setting.threshold]
        point = replace(point, macs=float(macs), macs_fraction=float(macs / dense_macs), psnr=mean_psnr(images_n, reference),
                        seconds=seconds, guidance_scale=cfg, cache_dit=(float(setting.threshold), setting.fn, setting.bn, setting.warmup))
        memo[point_key(identity)] = point
        return [point]

    dense_psnr = {}
    points, pending = [], []
    fitted: dict[int, dict] = {}

    def fit_models() -> dict:
        """The quality models of the memo's points, fit once per memo size (within a call the memo only grows)."""
        if len(memo) not in fitted:
            fitted[len(memo)] = _fit_methods(memo, base, setting, cfg, check, num_blocks)
        return fitted[len(memo)]

    fits = fit_models()
    for n in steps_grid:
        fraction = n / reference_steps
        key = (base, "dense", reference_steps, n)
        if key not in memo:
            say(f"dense, {n} steps")
            memo[key] = scored(TunePoint(n, "dense", 0.0, dense_step * n, fraction, 0.0, 0.0, 0.0), None)
        dense_psnr[(n, 0)] = memo[key].psnr
        if "dense" in methods or n == reference_steps:
            points.append(memo[key])
        drop = reference_steps - n
        if drop and any(m in DROP_METHODS for m in methods):  # the same n steps as a subset of the reference's
            key = (base, "dense-drop", reference_steps, n)
            if key not in memo:
                say(f"drop, {n} of {reference_steps} steps")
                memo[key] = scored(TunePoint(n, "drop", 0.0, dense_step * n, fraction, 0.0, 0.0, 0.0, drop_steps=drop), None)
            dense_psnr[(n, drop)] = memo[key].psnr
            if "drop" in methods and memo[key].macs_fraction <= budget + 1e-12:  # listed where it competes
                points.append(memo[key])
        target = 1.0 - budget * reference_steps / n
        if target <= 0:
            continue  # dense already fits
        if "cache" in methods:
            fit = match_cache_to_macs(num_blocks, [dense_step] * n, budget_macs, within=True, macs_by_block=dense_blocks)
            if fit is not None:
                point = TunePoint(n, "cache", 0.0, float(fit[1]), fit[1] / dense_macs, 0.0, 0.0, 0.0, cache=_cache_tuple(fit[0]))
                if fits.get("cache") is not None and point_key(_identity(point, budget)) not in memo:
                    pending.append(replace(point, guidance_scale=cfg, predicted=True))  # predicted; sampled if it ranks
                else:
                    say(f"cache, {n} steps, full every {fit[0].interval}")
                    points.append(recalled(_identity(point, budget), point, lambda config=fit[0]: BlockReuse(dense, config)))
        if cache_dit_served and target / 2 <= MAX_SPARSITY:
            points.extend(cache_dit_point(n, target / 2))
        for method in ("paper", "measured", "measured+cache", "measured+drop"):
            if method not in methods:
                continue
            stacked = method == "measured+cache"
            dropping = method == "measured+drop"
            if dropping and not drop:
                continue  # at every reference step it is `measured`
            # a dropping plan keeps n of the reference steps; the others plan n steps of their own
            plan_steps, plan_drop = (reference_steps, drop) if dropping else (n, 0)
            asked = target / 2 if stacked else target
            if asked > MAX_SPARSITY:
                continue  # no plan removes that much
            if not stacked:  # raised until the plan's own MACs fit
                asked = _sparsity_within(loaded.spec, plan_steps, M, lam, scheduler, cx, asked, budget_macs, edges, plan_drop)
                if asked is None:
                    continue
            plan = build_plan(loaded.spec, plan_steps, M, lam, sparsity=asked, scheduler=scheduler, cx=cx, edges=edges, drop_steps=plan_drop)
            identity = (n, method, round(float(asked), 9)) + ((round(budget, 9),) if stacked else ())
            if point_key(identity) in memo:
                points.append(memo[point_key(identity)])
                continue
            config = _candidate_config(prune_config, _PRUNE_ALLOCATION[method], False)  # candidates: OBS alone (a refit costs a pass)
            recorded = _recorded_allocation(loaded, plan, config, analyses) if fits.get(method) else None
            if recorded is not None:  # predicted now, sampled only if it ranks among the best
                measured = recorded if _PRUNE_ALLOCATION[method] == "measured" else None  # measured+drop too
                error = recorded.error if measured is not None else recorded.paper_error
                step_macs = _step_macs(plan, measured)
                stages = _stage_sparsity(plan, measured)
                point = TunePoint(
                    n, method, float(plan.overall_sparsity), float(sum(step_macs)), float(sum(step_macs)) / dense_macs,
                    float(error), 0.0, 0.0, stages, cfg, target_sparsity=float(asked), predicted=True, drop_steps=plan_drop,
                )
                if stacked:  # the reuse setting its networks' block MACs give, without building them
                    fit = _stacked_reuse(dense, plan, recorded, step_macs, budget_macs, num_blocks)
                    if fit is None:
                        continue
                    point = replace(point, macs=float(fit[1]), macs_fraction=fit[1] / dense_macs, cache=_cache_tuple(fit[0]))
                pending.append(point)
                continue
            say(f"{method}, {n} steps, sparsity {plan.overall_sparsity:.3f}")
            point = _pruned_point(loaded, plan, config, method, float(asked), analyses, should_stop, dense_macs)
            if stacked:
                result = point[1]
                step_macs = _step_macs(plan, result.measured)
                networks = [id(result.staged.networks()[s]) for s in plan.step_stages]
                by_network = {id(network): block_macs(network, plan.shape) for network in result.staged.networks()}
                fit = match_cache_to_macs(num_blocks, step_macs, budget_macs, networks, within=True, macs_by_block=by_network)
                if fit is None:
                    continue
                cached = replace(point[0], macs=float(fit[1]), macs_fraction=fit[1] / dense_macs, cache=_cache_tuple(fit[0]))
                points.append(recalled(identity, cached, lambda staged=result.staged, config=fit[0]: BlockReuse(staged, config)))
            else:
                points.append(recalled(identity, point[0], lambda staged=point[1].staged: staged))
    checked, unchecked = _check_predicted(
        pending, points, check, budget, fit_models, dense_psnr,
        lambda p: recalled(
            _identity(p, budget), replace(p, predicted=False),
            lambda: candidate_denoiser(loaded, p, prune_config, **common),
        ),
        say, None if check_seconds is None else start + float(check_seconds),
    )
    points.extend(checked)
    order = {m: i for i, m in enumerate(METHODS)}
    points.sort(key=lambda p: (p.steps, order[p.allocation]))
    # the best few sampled within the budget again at every other guidance scale of the grid
    within = [
        p for p in points
        if not p.predicted and p.macs_fraction <= budget + 1e-12 and not (p.allocation == "dense" and p.steps == reference_steps)
    ]
    for point in sorted(within, key=lambda p: -p.psnr)[: max(0, int(cfg_top))] if grid_cfgs else []:
        transformer = None
        for scale in grid_cfgs:
            say(f"{point.allocation}, {point.steps} steps, cfg {scale:g}")
            if transformer is None:
                transformer = candidate_denoiser(loaded, point, prune_config, **common)
            points.append(scored(point, transformer, scale))
    sampled = [i for i, p in enumerate(points) if not p.predicted]
    front = [sampled[i] for i in pareto_front([points[i].macs for i in sampled], [points[i].psnr for i in sampled])]
    fits_budget = [i for i in sampled if points[i].macs_fraction <= budget + 1e-12]
    chosen = max(fits_budget, key=lambda i: (points[i].psnr, -points[i].macs)) if fits_budget else None
    models = {m: asdict(f) for m, f in fit_models().items() if f is not None and m in methods}
    return TuneResult(budget, reference_steps, images, tuple(points), tuple(front), chosen, time.perf_counter() - start, cfg, models, unchecked,
                      None if edges is None else (int(edges[0]), int(edges[1])))


def check_count(check) -> int:
    """`check` as an int, or ValueError unless it is a whole number in [0, 64]."""
    if isinstance(check, bool) or not isinstance(check, int) or not 0 <= check <= 64:
        raise ValueError(f"check must be a whole number of candidates to sample in [0, 64] (0: every one), got {check!r}")
    return check


def _check_predicted(pending, points, check, budget, fit, dense_psnr, sample, say, deadline=None) -> tuple[list[TunePoint], int]:
    """Sample the predicted candidates best first, at most `check` of them, while the next one
    could still beat the best PSNR sampled within the budget: its prediction plus the quality
    model's residual (at least `MIN_MARGIN_DB`) reaches it. The models are refit after each
    sample; the rest stay predicted. With a `deadline` (perf_counter seconds), a candidate after
    the first is sampled only if it should end by then at the cost of the slowest one so far.
    Returns the points and how many candidates the deadline left unchecked."""
    def predicted(models) -> list[TunePoint]:
        return [replace(p, psnr=_predicted_psnr(models[p.allocation], p, dense_psnr[(p.steps, p.drop_steps)])) for p in pending]

    done: list[TunePoint] = []
    slowest = 0.0
    unchecked = 0
    while pending and len(done) < check:
        models = fit()
        pending = sorted(predicted(models), key=lambda p: -p.psnr)
        best = max((p.psnr for p in [*points, *done] if not p.predicted and p.macs_fraction <= budget + 1e-12), default=-math.inf)
        head = pending[0]
        if head.psnr + max(models[head.allocation].rmse, MIN_MARGIN_DB) < best:
            break  # nothing left promises to beat what was sampled
        if done and deadline is not None and time.perf_counter() + slowest > deadline:
            unchecked = sum(1 for p in pending if p.psnr + max(models[p.allocation].rmse, MIN_MARGIN_DB) >= best)
            unchecked = min(unchecked, check - len(done))
            break  # out of time: the rest stay predicted
        say(f"{head.allocation}, {head.steps} steps, sparsity {head.sparsity:.3f} (predicted {head.psnr:.1f} dB)")
        began = time.perf_counter()
        done.append(sample(pending.pop(0)))
        slowest = max(slowest, time.perf_counter() - began)
    if pending:  # the rest as predicted by the models of every point sampled
        pending = predicted(fit())
    return done + pending, unchecked


def _fit_methods(memo, base, setting, cfg, check, num_blocks: int) -> dict:
    """A quality model per predicted method with enough sampled points in `memo` (None: too few), if `check` > 0:
    a `QualityModel` per pruned method, and one `ReuseModel` shared by `cache` and `measured+cache` (it
    builds on the measured model, so it needs that one too)."""
    if not check:
        return {}
    samples: dict[str, list] = {"paper": [], "measured": [], "measured+drop": []}
    reused: list = []
    for key, point in memo.items():
        if key[:3] == (base, "point", setting) and key[-1] == cfg and (point.allocation in samples or point.allocation in REUSE_METHODS):
            # D: the dense model over the same steps (re-spaced, or the same subset of the reference's)
            dense = memo.get((base, "dense-drop" if point.drop_steps else "dense", setting[0], point.steps))
            if dense is None:
                continue
            if point.allocation in samples:
                samples[point.allocation].append((point.steps, dense.psnr, point.recorded_error, point.psnr))
            elif point.cache is not None:
                reused.append((point.steps, dense.psnr, point.recorded_error, point.cache, point.psnr))
    fits = {method: fit_quality(rows) for method, rows in samples.items()}
    reuse = fit_reuse(reused, fits["measured"], num_blocks, setting[0])
    return {**fits, **{method: reuse for method in REUSE_METHODS}}


def _identity(point: TunePoint, budget: float) -> tuple:
    """What the memo knows a sampled candidate by (with the setting and CFG, `point_key`): its steps and
    method, the sparsity its plan was asked for, and what else makes it this candidate (a reuse setting; the
    budget for `measured+cache`, whose setting spends what is left of that budget)."""
    if point.allocation == "cache":
        return (point.steps, "cache", point.cache)
    identity = (point.steps, point.allocation, round(float(point.target_sparsity), 9))
    return identity + ((round(budget, 9),) if point.allocation == "measured+cache" else ())


def _stacked_reuse(dense, plan, measured, step_macs, budget_macs, num_blocks):
    """The reuse setting `measured+cache` gives the networks of `measured` (and their MACs), from the
    recorded removals alone: what `match_cache_to_macs` picks for the built networks. A stage the rule
    leaves dense runs the base network itself, so all such stages count as one network."""
    from mosaic_core.conquer.caching import block_macs, match_cache_to_macs

    stage_network = ["dense" if not any(measured.removals[s].values()) else s for s in range(len(measured.removals))]
    by_network = {stage_network[s]: block_macs(dense, plan.shape, measured.removals[s]) for s in range(len(measured.removals))}
    networks = [stage_network[s] for s in plan.step_stages]
    return match_cache_to_macs(num_blocks, step_macs, budget_macs, networks, within=True, macs_by_block=by_network)


def _predicted_psnr(model, point: TunePoint, dense_psnr: float) -> float:
    """`model`'s PSNR for a predicted `point` where the dense model at its steps scores `dense_psnr`."""
    if isinstance(model, ReuseModel):
        return model.psnr(dense_psnr, point.recorded_error, point.cache, point.steps)
    return model.psnr(dense_psnr, point.recorded_error)


def _pruned_point(loaded, plan, config, method, asked, analyses, should_stop, dense_macs):
    """(the unsampled TunePoint, the PruneResult) of `plan` pruned with `method`."""
    from mosaic_core.conquer.sampling import run_to_end
    from mosaic_core.prune.stage_pruning import prune_steps

    result = run_to_end(prune_steps(loaded, plan, config, analyses=analyses, should_stop=should_stop))
    step_macs = _step_macs(plan, result.measured)
    if result.measured is not None:
        error = result.measured.error
    else:
        recorded = _recorded_allocation(loaded, plan, config, analyses)
        error = 0.0 if recorded is None else recorded.paper_error
    point = TunePoint(
        len(plan.timesteps), method, float(plan.overall_sparsity), float(sum(step_macs)), float(sum(step_macs)) / dense_macs,
        float(error), 0.0, 0.0, _stage_sparsity(plan, result.measured), target_sparsity=asked, drop_steps=plan.drop_steps,
    )
    return point, result


def _recorded_allocation(loaded, plan, config, analyses):
    from mosaic_core.prune.stage_pruning import recorded_allocation

    return recorded_allocation(loaded, plan, config, analyses)


def _stage_sparsity(plan, measured) -> tuple[float, float, float]:
    """The stage sparsities as pruned: the measured rule's shares, or the plan's (0 for a stage without steps)."""
    if measured is not None:
        return tuple(float(x) for x in measured.sparsity)
    return tuple(float(x) if c else 0.0 for x, c in zip(plan.allocation.achieved, plan.step_counts))


@dataclass(frozen=True)
class QualityModel:
    """PSNR of a pruned candidate from its recorded error E: MSE = D + P + 2ρ·√(D·P), P = κ·E^α.

    MSE = 10^(−PSNR/10) on [0, 1] images; D = MSE_dense(n) is the dense model's at the same
    steps (fewer steps alone), so the model only has to explain what pruning adds, P. The
    two errors are not independent: ρ ∈ [−0.9, 0.9] is how far they add (ρ > 0) or partly
    cancel (ρ < 0; on digits-dit a pruned 30-step run can sit 1.5 dB closer to the 50-step
    images than the dense 30-step run). ρ = 0 adds them as independent errors; at the
    reference steps D = 0 and ρ has no effect. α, log₁₀ κ and ρ are fit to sampled points by
    least squares in dB over a grid; `rmse` (dB) is that fit's residual. docs/method.md §4.5
    **[ours]**.
    """

    alpha: float
    log_kappa: float
    rmse: float
    count: int
    rho: float = 0.0  # added after the first version: a model saved without it adds the errors independently

    def psnr(self, dense_psnr: float, error: float) -> float:
        """The predicted PSNR (dB) at recorded error `error` where the dense model at the same steps has `dense_psnr`."""
        return float(_model_psnr(np.asarray(dense_psnr, float), np.asarray(error, float), self.alpha, self.log_kappa, self.rho))


ALPHAS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
LOG_KAPPAS = np.arange(-16.0, 4.0 + 1e-9, 0.05)
# |ρ| < 1 keeps the MSE positive; tried from 0 outwards, so a tie keeps the independent errors
RHOS = tuple(sorted((round(k / 10, 1) for k in range(-9, 10)), key=lambda r: (abs(r), r)))


def _model_psnr(dense_psnr, error, alpha, log_kappa, rho=0.0):
    dense_mse = 10.0 ** (-np.asarray(dense_psnr) / 10.0)
    pruning_mse = 10.0 ** log_kappa * np.maximum(error, 0.0) ** alpha
    return -10.0 * np.log10(dense_mse + pruning_mse + 2.0 * rho * np.sqrt(dense_mse * pruning_mse))


def fit_quality(rows: Sequence[tuple[int, float, float, float]], min_points: int = 4) -> Optional[QualityModel]:
    """Fit a `QualityModel` to (steps, dense PSNR at those steps, recorded error, sampled PSNR) rows.

    None with fewer than `min_points` rows, or when they span only one step count (κ and α
    would then trade off freely).
    """
    rows = [r for r in rows if math.isfinite(r[2]) and math.isfinite(r[3])]
    if len(rows) < min_points or len({r[0] for r in rows}) < 2:
        return None
    dense, error, measured = (np.asarray([r[i] for r in rows], float) for i in (1, 2, 3))
    best = None
    for alpha in ALPHAS:
        for rho in RHOS:
            predicted = _model_psnr(dense[None, :], error[None, :], alpha, LOG_KAPPAS[:, None], rho)  # κ × rows
            sse = ((predicted - measured[None, :]) ** 2).sum(1)
            i = int(np.argmin(sse))
            if best is None or sse[i] < best[0] - 1e-12:  # ties: the smaller α, then the smaller |ρ|
                best = (float(sse[i]), alpha, float(LOG_KAPPAS[i]), rho)
    return QualityModel(best[1], round(best[2], 4), math.sqrt(best[0] / len(rows)), len(rows), best[3])


REUSE_METHODS = ("cache", "measured+cache")  # predicted by one `ReuseModel`
REUSE_SHARE_EXPONENTS = np.arange(0.0, 3.0 + 1e-9, 0.5)
REUSE_INTERVAL_EXPONENTS = np.arange(0.0, 4.0 + 1e-9, 0.5)
REUSE_STEPS_EXPONENTS = np.arange(-2.0, 2.0 + 1e-9, 0.5)
LOG_REUSE = np.arange(-10.0, 0.0 + 1e-9, 0.05)


@dataclass(frozen=True)
class ReuseModel:
    """PSNR of a candidate with block reuse (`cache`, `measured+cache`): the measured method's model plus
    the error the reuse adds, MSE = D + P + 2ρ·√(D·P) + R with

        R = 10^λ · (c/L)^a · (I − 1)^b · (n/N₀)^g

    for a setting that caches c of the L blocks and runs every block on every I-th step, at n of the
    reference's N₀ steps. D, P, α, κ and ρ are the measured model's (`QualityModel`), fit to the measured
    points; λ, a, b and g are fit to the sampled reuse points by least squares in dB over a grid. On
    digits-dit a full step every 5 instead of every 2 costs 3–8 dB at the same MACs, far more than the
    share of blocks cached, hence the interval's own exponent. docs/method.md §4.5 **[ours]**.
    """

    alpha: float
    log_kappa: float
    rho: float
    log_reuse: float
    share_exponent: float
    interval_exponent: float
    steps_exponent: float
    rmse: float
    count: int
    num_blocks: int
    reference_steps: int

    def psnr(self, dense_psnr: float, error: float, cache: Sequence[int], steps: int) -> float:
        """The predicted PSNR (dB) with reuse setting `cache` = (interval, keep_first, keep_last) at `steps` steps."""
        reuse = _reuse_mse(np.asarray([_cached_share(cache, self.num_blocks)]), np.asarray([float(cache[0])]),
                           np.asarray([steps / self.reference_steps]), self.share_exponent, self.interval_exponent,
                           self.steps_exponent, self.log_reuse)
        return float(-10.0 * np.log10(_mse(dense_psnr, error, self.alpha, self.log_kappa, self.rho) + reuse[0]))


def _mse(dense_psnr, error, alpha, log_kappa, rho):
    return 10.0 ** (-_model_psnr(dense_psnr, error, alpha, log_kappa, rho) / 10.0)


def _cached_share(cache: Sequence[int], num_blocks: int) -> float:
    return (num_blocks - int(cache[1]) - int(cache[2])) / num_blocks


def _reuse_mse(share, interval, steps_fraction, a, b, g, log_reuse):
    return 10.0 ** log_reuse * share ** a * (interval - 1.0) ** b * steps_fraction ** g


def fit_reuse(rows: Sequence[tuple], measured: Optional[QualityModel], num_blocks: int, reference_steps: int,
              min_points: int = 4) -> Optional[ReuseModel]:
    """Fit a `ReuseModel` to (steps, dense PSNR at those steps, recorded error (0: dense), reuse setting,
    sampled PSNR) rows on top of the `measured` model. None without that model, with fewer than
    `min_points` rows, or when they span one step count or one interval (their exponents would trade off
    freely with λ)."""
    rows = [r for r in rows if math.isfinite(r[2]) and math.isfinite(r[4])]
    if measured is None or len(rows) < min_points or len({r[0] for r in rows}) < 2 or len({int(r[3][0]) for r in rows}) < 2:
        return None
    dense, error, sampled = (np.asarray([r[i] for r in rows], float) for i in (1, 2, 4))
    base = _mse(dense, error, measured.alpha, measured.log_kappa, measured.rho)
    share = np.asarray([_cached_share(r[3], num_blocks) for r in rows])
    interval = np.asarray([float(r[3][0]) for r in rows])
    steps = np.asarray([r[0] / reference_steps for r in rows], float)
    scales = 10.0 ** LOG_REUSE[:, None, None]  # λ × g × rows
    best = None
    for a in REUSE_SHARE_EXPONENTS:
        for b in REUSE_INTERVAL_EXPONENTS:
            shape = share ** a * (interval - 1.0) ** b  # rows
            terms = shape[None, :] * steps[None, :] ** REUSE_STEPS_EXPONENTS[:, None]  # g × rows
            predicted = -10.0 * np.log10(base[None, None, :] + scales * terms[None, :, :])
            sse = ((predicted - sampled) ** 2).sum(-1)  # λ × g
            i, j = np.unravel_index(int(np.argmin(sse)), sse.shape)
            if best is None or sse[i, j] < best[0] - 1e-12:  # ties: the smaller exponents
                best = (float(sse[i, j]), float(a), float(b), float(REUSE_STEPS_EXPONENTS[j]), float(LOG_REUSE[i]))
    return ReuseModel(measured.alpha, measured.log_kappa, measured.rho, round(best[4], 4), best[1], best[2], best[3],
                      math.sqrt(best[0] / len(rows)), len(rows), int(num_blocks), int(reference_steps))


def candidate_denoiser(loaded, point: TunePoint, prune_config, M: float = 0.55, lam: float = 0.01, scheduler: str = "ddim",
                       cx: float = 1.0, analyses: Optional[dict] = None, should_stop=None, refit: bool = False,
                       edges: Optional[Sequence[int]] = None):
    """The denoiser that realises `point` (None: the dense model), rebuilt from (cached) analyses.

    Sample it at `point.steps` steps (`point.steps + point.drop_steps` with `drop_steps`) and `point.guidance_scale`; the same plan, pruning and
    reuse setting as when the point was tuned, so its images are the tuned ones. `refit`
    adds what `prune` does by default after OBS (prune/refit.py): the networks `prune`
    would write at this point, one calibration pass per network dearer.
    """
    from mosaic_core.conquer.caching import BlockReuse, CacheConfig
    from mosaic_core.conquer.sampling import run_to_end
    from mosaic_core.divide.plan import build_plan
    from mosaic_core.prune.stage_pruning import prune_steps

    transformer = None
    if point.allocation in _PRUNE_ALLOCATION:
        plan = build_plan(loaded.spec, point.steps + point.drop_steps, M, lam, sparsity=point.target_sparsity, scheduler=scheduler, cx=cx,
                          edges=edges, drop_steps=point.drop_steps)
        analyses = {} if analyses is None else analyses
        config = _candidate_config(prune_config, _PRUNE_ALLOCATION[point.allocation], bool(refit))
        transformer = run_to_end(prune_steps(loaded, plan, config, analyses=analyses, should_stop=should_stop)).staged
    elif point.allocation not in ("dense", "cache", "drop"):
        raise ValueError(f"unknown tuner method {point.allocation!r}: expected one of {', '.join(METHODS)}")
    if point.cache is not None:
        transformer = BlockReuse(loaded.transformer if transformer is None else transformer, CacheConfig(*point.cache))
    if point.cache_dit is not None:
        from mosaic_core.conquer.cache_dit_row import CacheDiT, DBCacheSetting

        transformer = CacheDiT(loaded.transformer if transformer is None else transformer, DBCacheSetting(*point.cache_dit),
                               point.steps, dense=loaded.transformer)
    return transformer


def staged_step_macs(plan, result) -> list[float]:
    """Block-linear MACs of each sampler step of a pruned `result` of `plan` (its stage network's)."""
    return _step_macs(plan, getattr(result, "measured", None))


def _step_macs(plan, measured) -> list[float]:
    """Block-linear MACs of each sampler step of `plan` pruned with the `measured` allocation (None: the plan's own).

    The measured rule moves sparsity between stages, so its networks are costed from each
    stage's removed share of the prunable MACs (`MeasuredStages.sparsity`); every
    block-linear MAC is prunable, so a stage's step costs (1 − share) of a dense step. The
    paper's networks are costed from the plan's allocation.
    """
    from mosaic_core.conquer.bench import _stage_step_macs

    if measured is None:
        return [float(m) for m in _stage_step_macs(plan)]
    dense_step = plan.macs_dense / len(plan.step_stages)  # macs_dense counts the steps that run
    per_stage = [dense_step * (1.0 - float(s)) for s in measured.sparsity]
    return [per_stage[s] for s in plan.step_stages]


def _cache_tuple(config) -> tuple[int, int, int]:
    return (int(config.interval), int(config.keep_first), int(config.keep_last))


def _sparsity_within(spec, steps, M, lam, scheduler, cx, target, budget_macs, edges=None, drop_steps=0) -> Optional[float]:
    """The sparsity whose auto plan fits the budget: `target`, raised by whole MLP units until it does."""
    from mosaic_core.divide.allocation import MAX_SPARSITY, sparsity_resolution
    from mosaic_core.divide.plan import build_plan

    sparsity = target
    for _ in range(64):
        sparsity = min(sparsity, MAX_SPARSITY)
        plan = build_plan(spec, steps, M, lam, sparsity=sparsity, scheduler=scheduler, cx=cx, edges=edges, drop_steps=drop_steps)
        if plan.macs_staged <= budget_macs:
            return float(sparsity)
        if sparsity >= MAX_SPARSITY:
            return None
        sparsity += sparsity_resolution(plan.shape) if not hasattr(plan.shape, "layers") else 0.002
    return None


MEMO_FORMAT = 1  # version of the sampled points a `tune` memo is saved as (`save_memo_points`)


def memo_path(cache_root, model_name: str, weights_hash: str):
    """Where a cache root keeps one model's sampled tuner points: `tune/<16 hex of name and weights>.json`."""
    import hashlib
    from pathlib import Path

    return Path(cache_root) / "tune" / f"{hashlib.sha256(f'{model_name}|{weights_hash}'.encode()).hexdigest()[:16]}.json"


def save_memo_points(memo: dict, path) -> int:
    """Write the memo's sampled points (fewer-steps and candidates; not the reference images) as JSON,
    atomically; returns how many. Keys hash the model's weights, so a file only ever serves that model."""
    from mosaic_core.atomic import write_json

    entries = [
        {"key": _jsonable(key), "point": asdict(point)}
        for key, point in memo.items()
        if isinstance(point, TunePoint) and key[1] in ("dense", "dense-drop", "point")
    ]
    write_json(path, {"format": MEMO_FORMAT, "entries": entries})
    return len(entries)


def load_memo_points(path) -> dict:
    """The points `save_memo_points` wrote, as memo entries; {} for a missing, unreadable or other-format file
    (the tuner then samples them again)."""
    import logging

    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        if not isinstance(data, dict) or data.get("format") != MEMO_FORMAT:
            return {}
        memo = {}
        for entry in data["entries"]:
            point = dict(entry["point"])
            for name in ("stage_sparsity", "cache", "cache_dit"):
                if point.get(name) is not None:
                    point[name] = tuple(point[name])
            memo[_tupled(entry["key"])] = TunePoint(**point)
        return memo
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as error:
        logging.getLogger(__name__).warning("ignoring the tuner's saved points in %s: %s", path, error)
        return {}


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, tuple) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value
