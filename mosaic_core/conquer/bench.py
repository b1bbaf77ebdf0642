"""The benchmark: MosaicDiff against its baselines and ablations at the same steps and seeds.

| method                | what it is                                                        |
|-----------------------|-------------------------------------------------------------------|
| `dense`               | the unpruned model (reference for speed-up and PSNR)             |
| `fewer-steps`         | dense with the step count whose MACs match `mosaic`'s            |
| `uniform`             | one OBS-pruned network at S for every step (no stage division)   |
| `mosaic`              | staged, SNR-aware calibration, OBS — the method                  |
| `mosaic-random-calib` | ablation: calibration τ uniform over all T                        |
| `mosaic-clean-calib`  | ablation: calibration on clean inputs (τ = 0)                     |
| `mosaic-magnitude`    | ablation: magnitude scoring, no weight update                     |
| `mosaic-per-block`    | `mosaic` with each stage's MACs spread over blocks by OBS error   |
| `mosaic-measured`     | `mosaic`'s MACs spread over stages × blocks by recorded OBS error, then refit (the CLI's default prune) |
| `mosaic-measured-no-refit` | ablation: `mosaic-measured` with OBS weights alone (`prune --no-refit`); only when named |
| `mosaic-measured-gemm`| `mosaic-measured` with kept MLP units in multiples of 16 (`--unit-multiple`); only when named |
| `mosaic-measured-drop`| the default prune planned for 10 % of the reference steps dropped evenly (`--drop-steps K`), sparsity raised until it fits `mosaic`'s MACs, sampled jumping DDIM over them (method §4.6); only when named |
| `mosaic-<K>-steps`    | `mosaic` at K < N steps: pruning stacked with step reduction      |
| `cache`               | dense with DeepCache-style block-output reuse at `mosaic`'s MACs  |
| `mosaic+cache`        | `mosaic` with the same block-output reuse: the two stacked        |
| `cache-dit`           | dense with cache-dit's DBCache (the library), threshold matched to `mosaic`'s MACs; DiT only |

`--methods a,b` runs only the named rows (and `dense`, the reference, always).
Quality is judged on `n` images; time on `time_n` (fewer) images, `repeats` interleaved
runs; speed-ups use the min on a CPU, the median on a GPU, and a row whose timing is not
plausible is flagged instead of reported (`timing_statistics`, `timing_flags`).

All methods share labels, seeds and initial noise; PSNR/SSIM compare each image with the
dense image of the same seed. The Hessians of one calibration setting are computed once
and reused by every method that needs them.
"""

from __future__ import annotations

import itertools
import math
import os
import platform
from dataclasses import dataclass, field, replace
from typing import Callable, Generator, Sequence

import numpy as np
import torch

from mosaic_core.prune.calibration import CalibrationConfig
from mosaic_core.conquer.compare import Contender, MethodResult, compare_steps, floor_seconds, timing_statistic
from mosaic_core.jobs import relay
from mosaic_core.limits import shown
from mosaic_core.units import format_count
from mosaic_core.divide.plan import Plan, build_plan
from mosaic_core.divide.stages import DEFAULT_M, STAGE_NAMES
from mosaic_core.prune.stage_pruning import PruneConfig, prune_steps
from mosaic_core.conquer.conditions import conditions_for, default_values
from mosaic_core.conquer.sampling import SampleConfig
from mosaic_core.conquer.staged_denoiser import param_count

METHODS = (
    "dense", "fewer-steps", "uniform", "mosaic", "mosaic-random-calib", "mosaic-clean-calib", "mosaic-magnitude",
    "mosaic-per-block", "mosaic-measured", "mosaic-measured-no-refit", "mosaic-measured-gemm", "mosaic-K-steps", "cache",
    "mosaic+cache", "cache-dit", "mosaic-measured-drop",
)
OPT_IN_METHODS = ("mosaic-measured-gemm", "mosaic-measured-no-refit", "mosaic-measured-drop")  # run only when --methods names them (the default bench is long already)
# Plausibility of a timed row: measured/ideal outside [0.5, 1.1], or its typical run (the
# median) more than 20 % above its best (the min). Not max − min: one run of five hit by a
# background job says nothing against the min; most runs far above it do.
PLAUSIBLE_RATIO = (0.5, 1.1)
MAX_SPREAD = 0.20
# On a CPU the speed-up uses the floor (Σ over steps of each step's least time over the runs):
# a 50-step run of seconds is rarely untouched from end to end on a shared machine, each of
# its steps often is. The floor is trusted when the floors of the even and the odd runs,
# two independent halves, agree within MAX_FLOOR_SPLIT.
MAX_FLOOR_SPLIT = 0.10


def parse_methods(text: str | None) -> tuple[str, ...] | None:
    """'mosaic,cache' -> ('mosaic', 'cache'); None/'' -> None (all). `mosaic-K-steps` matches mosaic-<K>-steps."""
    if text is None or not str(text).strip():
        return None
    names = tuple(part.strip() for part in str(text).split(",") if part.strip())
    for name in names:
        if method_key(name) not in METHODS:
            raise ValueError(f"unknown bench method {shown(name)}: choose from {', '.join(METHODS)}")
    return names


def method_key(name: str) -> str:
    """The METHODS entry of a row name (mosaic-20-steps -> mosaic-K-steps)."""
    parts = name.split("-")
    if len(parts) == 3 and parts[0] == "mosaic" and parts[2] == "steps" and parts[1].isdigit():
        return "mosaic-K-steps"
    return name


@dataclass(frozen=True)
class TimingStats:
    """Seconds of the timed runs of one row: min, median, max, spread = (max − min) / min,
    `excess` = (median − min) / min (what the GPU's median flags judge), `floor` = Σ over
    steps of each step's least time, and `floor_split` = |floor(even runs) − floor(odd
    runs)| / floor (what the CPU's floor flags judge; 0 with one run)."""

    min: float
    median: float
    max: float
    spread: float
    runs: int
    excess: float = 0.0
    floor: float | None = None  # None: no per-step times were given (then the min stands in)
    floor_split: float = 0.0


def timing_statistics(seconds: Sequence[float], step_runs: np.ndarray | Sequence[Sequence[float]] | None = None) -> TimingStats:
    """Min, median, max and relative spread of a row's timed runs, and with `step_runs`
    (runs × steps seconds) their floor and its split-half agreement (ValueError when none)."""
    values = np.asarray(list(seconds), dtype=np.float64)
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"timed runs must be positive finite seconds, at least one; got {list(seconds)}")
    low, high, median = float(values.min()), float(values.max()), float(np.median(values))
    floor, split = None, 0.0
    if step_runs is not None:
        steps = np.asarray(step_runs, dtype=np.float64)
        if steps.ndim != 2 or steps.shape[0] != values.size or not np.all(np.isfinite(steps)) or np.any(steps < 0):
            raise ValueError(f"per-step times must be runs × steps non-negative seconds, one row per run; got shape {steps.shape}")
        floor = floor_seconds(steps)
        if steps.shape[0] >= 2 and floor > 0:
            split = abs(floor_seconds(steps[0::2]) - floor_seconds(steps[1::2])) / floor
    return TimingStats(low, median, high, (high - low) / low, int(values.size), (median - low) / low, floor, split)


def _beyond(value: float, limit: float, percent: bool = True) -> str:
    """`value` with the fewest decimals that still show it past `limit` (10.4 % is "10.4%", not
    "10%", beside "> 10%"; 1.104 is "1.104", not "1.10", beside a bound of 1.1)."""
    for digits in range(0, 5) if percent else range(2, 6):
        text = f"{value:.{digits}%}" if percent else f"{value:.{digits}f}"
        shown = float(text.rstrip("%")) / (100 if percent else 1)
        if shown != limit and (shown > limit) == (value > limit):
            return text
    return f"{value:.4%}" if percent else f"{value:.6f}"


def timing_flags(measured_over_ideal: float, excess: float, reference_excess: float = 0.0) -> tuple[str, ...]:
    """Why a row's speed-up is not a result: ratio outside PLAUSIBLE_RATIO, or its (or dense's) median
    more than MAX_SPREAD above its min (`TimingStats.excess`)."""
    flags = []
    low, high = PLAUSIBLE_RATIO
    if not low <= measured_over_ideal <= high:
        bound = low if measured_over_ideal < low else high
        flags.append(f"measured/ideal {_beyond(measured_over_ideal, bound, percent=False)} outside [{low}, {high}]")
    if excess > MAX_SPREAD:
        flags.append(f"median {_beyond(excess, MAX_SPREAD)} above min > {MAX_SPREAD:.0%}")
    if reference_excess > MAX_SPREAD:
        flags.append(f"dense median {_beyond(reference_excess, MAX_SPREAD)} above min > {MAX_SPREAD:.0%}")
    return tuple(flags)


def floor_flags(measured_over_ideal: float, split: float, reference_split: float = 0.0) -> tuple[str, ...]:
    """Why a CPU row's floor speed-up is not a result: ratio outside PLAUSIBLE_RATIO, or the
    floors of its (or dense's) even and odd runs more than MAX_FLOOR_SPLIT apart."""
    flags = list(timing_flags(measured_over_ideal, 0.0))
    if split > MAX_FLOOR_SPLIT:
        flags.append(f"floors of even/odd runs {_beyond(split, MAX_FLOOR_SPLIT)} apart > {MAX_FLOOR_SPLIT:.0%}")
    if reference_split > MAX_FLOOR_SPLIT:
        flags.append(f"dense floors of even/odd runs {_beyond(reference_split, MAX_FLOOR_SPLIT)} apart > {MAX_FLOOR_SPLIT:.0%}")
    return tuple(flags)


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark: sparsity S, steps N, images n, timing repeats, reduced steps K."""

    sparsity: float = 0.3
    num_inference_steps: int = 50
    num_images: int = 200
    repeats: int = 3
    reduced_steps: int | None = 20
    guidance_scale: float | None = None
    scheduler: str = "ddim"
    seed: int = 0
    M: float = DEFAULT_M
    lam: float = 0.01
    calibration: CalibrationConfig = CalibrationConfig()
    methods: tuple[str, ...] | None = None  # None: every method; dense always runs
    time_images: int = 8  # images per timed run (quality uses num_images)
    threads: int | None = None  # torch.set_num_threads before timing (None: leave as is)
    cache: "CacheConfig | None" = None  # None: matched to mosaic's MACs
    cache_dit: "DBCacheSetting | None" = None  # the cache-dit row's DBCache; None (or threshold None): threshold matched to mosaic's MACs
    unit_multiple: int = 16  # kept MLP units of the mosaic-measured-gemm row are multiples of this
    drop_steps: int | None = None  # reference steps the mosaic-measured-drop row drops (None: 10 % of them)

    def __post_init__(self) -> None:
        if not 1 <= int(self.num_images) <= 4096:
            raise ValueError(f"--n must be in [1, 4096], got {self.num_images}")
        if not 1 <= int(self.time_images) <= 4096:
            raise ValueError(f"--time-n must be in [1, 4096], got {self.time_images}")
        if self.threads is not None and not 1 <= int(self.threads) <= 1024:
            raise ValueError(f"--threads must be in [1, 1024], got {self.threads}")
        if self.methods is not None:
            parse_methods(",".join(self.methods))
        if self.reduced_steps is not None and not 1 <= self.reduced_steps < self.num_inference_steps:
            raise ValueError(f"reduced steps must be in [1, {self.num_inference_steps - 1}], got {self.reduced_steps}")
        if self.wants("mosaic-measured-drop"):
            from mosaic_core.models.samplers import check_drop_steps

            if self.scheduler != "ddim":
                raise ValueError(f"the mosaic-measured-drop row jumps DDIM over dropped steps: it needs the ddim sampler, got '{self.scheduler}'")
            check_drop_steps(self.row_drop_steps, self.num_inference_steps, self.scheduler)

    @property
    def row_drop_steps(self) -> int:
        """Reference steps the mosaic-measured-drop row drops: `drop_steps`, or 10 % of the steps (at least 1)."""
        return max(1, round(0.1 * self.num_inference_steps)) if self.drop_steps is None else int(self.drop_steps)

    def wants(self, name: str) -> bool:
        """Whether row `name` runs (dense always does; the opt-in rows only when named)."""
        if name == "dense":
            return True
        if self.methods is None:
            return method_key(name) not in OPT_IN_METHODS
        return method_key(name) in {method_key(m) for m in self.methods}


@dataclass(frozen=True)
class BenchEvent:
    """Progress: `phase` is prune | match (the cache-dit threshold search) | sample | time, with the method and a fraction of the phase."""

    phase: str
    method: str
    fraction: float


@dataclass
class BenchResult:
    plan: Plan
    config: BenchConfig
    results: list[MethodResult]
    timing: dict[str, TimingStats] = field(default_factory=dict)
    statistic: str = "floor"  # which timing statistic the speed-ups use: floor on CPU (min without per-step times), median on GPU
    flags: dict[str, tuple[str, ...]] = field(default_factory=dict)
    command: str | None = None

    def to_dict(self, loaded) -> dict:
        """bench.json: the setup, the machine, and one row per method."""
        rows = []
        for r in self.results:
            row = r.row()
            stats = self.timing.get(r.name)
            if stats is not None:
                row["timing"] = {
                    "images": self.config.time_images, "runs": stats.runs, "min": round(stats.min, 4),
                    "median": round(stats.median, 4), "max": round(stats.max, 4), "spread": round(stats.spread, 4),
                    "median_excess": round(stats.excess, 4),
                    "floor": None if stats.floor is None else round(stats.floor, 4),
                    "floor_split": round(stats.floor_split, 4),
                    "statistic": self.statistic,
                }
            row["budget"] = round(r.macs / self.plan.macs_dense, 4)
            row["flags"] = list(self.flags.get(r.name, ()))
            rows.append(row)
        return {
            "model": loaded.spec.name,
            "command": self.command,
            "sparsity": self.config.sparsity,
            "steps": self.config.num_inference_steps,
            "n": self.config.num_images,
            "time_n": self.config.time_images,
            "repeats": self.config.repeats,
            "cfg": self.config.guidance_scale,
            "scheduler": self.config.scheduler,
            "seed": self.config.seed,
            "calibration": self.config.calibration.to_dict(),
            "plan": self.plan.to_dict(),
            "speedup_statistic": self.statistic,
            "machine": machine_info(str(loaded.device), str(loaded.dtype).replace("torch.", "")),
            "methods": rows,
        }


def _stage_step_macs(plan: Plan) -> list[int]:
    """MACs of each step of `plan`'s staged sampler (its stage network's block-linear MACs)."""
    from mosaic_core.divide.cost import sampling_macs

    per_stage = [sampling_macs(plan.shape, plan.allocation, [int(i == s) for i in range(3)]) for s in range(3)]
    return [per_stage[s] for s in plan.step_stages]


def bench_steps(
    loaded, config: BenchConfig, should_stop: Callable[[], bool] | None = None
) -> Generator[BenchEvent, None, BenchResult]:
    """Prune the chosen methods, sample them for quality and time them apart; returns a `BenchResult`.

    Quality: one run of every method on `num_images` images. Timing: a warm-up and
    `repeats` runs on `time_images` images, interleaved round-robin across methods (a slow
    phase of a shared machine hits all alike). Speed-up = t_dense / t_method with t the min
    of the runs on a CPU (other processes only ever add time), the median on a GPU.
    """
    from mosaic_core.conquer.cache_dit_row import cache_dit_macs, serves_cache_dit
    from mosaic_core.conquer.caching import (
        BlockReuse, block_macs, cache_schedule, cached_sampling_macs, computed_share, match_cache_to_macs,
    )
    from mosaic_core.models.adapters import adapter_for_model

    if config.threads is not None:
        torch.set_num_threads(int(config.threads))
    spec = loaded.spec
    cfg = spec.default_cfg if config.guidance_scale is None else config.guidance_scale
    config = replace(config, guidance_scale=cfg)
    n_steps = config.num_inference_steps

    def plan_for(steps: int, uniform: bool = False) -> Plan:
        return build_plan(spec, steps, config.M, config.lam, sparsity=config.sparsity, uniform=uniform, scheduler=config.scheduler)

    mosaic_plan = plan_for(n_steps)
    dense_macs_per_step = mosaic_plan.macs_dense // n_steps
    calibration = config.calibration
    want_cache = config.wants("cache") or config.wants("mosaic+cache")
    variants = [
        ("uniform", plan_for(n_steps, uniform=True), PruneConfig(calibration)),
        ("mosaic", mosaic_plan, PruneConfig(calibration)),
        ("mosaic-random-calib", mosaic_plan, PruneConfig(replace(calibration, mode="random"))),
        ("mosaic-clean-calib", mosaic_plan, PruneConfig(replace(calibration, mode="clean"))),
        ("mosaic-magnitude", mosaic_plan, PruneConfig(calibration, scorer="magnitude")),
        ("mosaic-per-block", mosaic_plan, PruneConfig(calibration, allocation="per-block")),
        # the same MACs as `mosaic` (within one group), placed by measured_allocation, then refit:
        # `prune`'s defaults; and the same without the refit (OBS weights alone)
        ("mosaic-measured", mosaic_plan, PruneConfig(calibration, allocation="measured", refit=True)),
        ("mosaic-measured-no-refit", mosaic_plan, PruneConfig(calibration, allocation="measured")),
        # the same, its kept MLP widths rounded to multiples the GEMM kernels tile evenly
        ("mosaic-measured-gemm", mosaic_plan,
         PruneConfig(calibration, allocation="measured", unit_multiple=config.unit_multiple, refit=True)),
    ]
    if config.reduced_steps:
        variants.append((f"mosaic-{config.reduced_steps}-steps", plan_for(config.reduced_steps), PruneConfig(calibration)))
    if config.wants("mosaic-measured-drop"):  # the default prune for the kept steps, at mosaic's MACs (docs/method.md §4.6)
        from mosaic_core.conquer.tune import _sparsity_within

        drop = config.row_drop_steps
        budget = mosaic_plan.macs_staged / mosaic_plan.macs_dense
        target = max(0.0, 1.0 - budget * n_steps / (n_steps - drop))  # eq. 4.14 for the kept steps, raised until it fits
        sparsity = _sparsity_within(spec, n_steps, config.M, config.lam, config.scheduler, 1.0, target,
                                    mosaic_plan.macs_staged, None, drop)
        if sparsity is None:
            raise ValueError(f"no sparsity up to the limit fits mosaic's MACs with {drop} of the {n_steps} steps dropped")
        drop_plan = build_plan(spec, n_steps, config.M, config.lam, sparsity=sparsity, scheduler=config.scheduler, drop_steps=drop)
        variants.append(("mosaic-measured-drop", drop_plan, PruneConfig(calibration, allocation="measured", refit=True)))
    variants = [v for v in variants if config.wants(v[0]) or (v[0] == "mosaic" and config.wants("mosaic+cache"))]

    dense = loaded.transformer
    fewer = max(1, round(n_steps * mosaic_plan.macs_staged / mosaic_plan.macs_dense))
    contenders = [Contender("dense", dense, n_steps, mosaic_plan.macs_dense, param_count(dense))]
    if config.wants("fewer-steps"):
        contenders.append(
            Contender("fewer-steps", dense, fewer, dense_macs_per_step * fewer, param_count(dense), info={"note": f"{fewer} steps"})
        )
    num_blocks = len(adapter_for_model(dense).block_paths(dense))
    dense_blocks = block_macs(dense, mosaic_plan.shape)  # what a cached step of each block saves
    cache_config = config.cache
    if want_cache and cache_config is None:  # matched to mosaic's MACs with the dense network
        cache_config, _ = match_cache_to_macs(
            num_blocks, [dense_macs_per_step] * n_steps, mosaic_plan.macs_staged, macs_by_block=dense_blocks
        )
    if config.wants("cache"):
        computed = computed_share(cache_config, dense_blocks)
        macs = cached_sampling_macs([dense_macs_per_step] * n_steps, cache_schedule(n_steps, cache_config.interval), computed)
        contenders.append(
            Contender("cache", BlockReuse(dense, cache_config), n_steps, macs, param_count(dense), info={"note": cache_config.label()})
        )
    cache_dit_row = None
    if config.wants("cache-dit") and serves_cache_dit(dense, config.methods is not None, "the cache-dit row"):
        cache_dit_row, contender = yield from _cache_dit_contender(loaded, config, mosaic_plan, should_stop)
        contenders.append(contender)
    analyses: dict = {}
    for index, (name, plan, prune_config) in enumerate(variants):
        result = yield from relay(
            prune_steps(loaded, plan, prune_config, should_stop=should_stop, analyses=analyses),
            lambda event, name=name, index=index: BenchEvent("prune", name, (index + event.fraction) / len(variants)),
        )
        measured = getattr(result, "measured", None)  # the measured rule moves sparsity between stages
        info = {
            "stage_sparsity": [round(a, 4) for a in (measured.sparsity if measured is not None else plan.allocation.achieved)],
            "overall_sparsity": round(plan.overall_sparsity, 4),
            "prune_seconds": round(sum(result.seconds.values()), 2),
            "prune_seconds_by_phase": {k: round(v, 2) for k, v in result.seconds.items()},
        }
        staged_params = param_count(result.staged)
        if plan.drop_steps:
            info["note"] = f"{len(plan.step_stages)} of {plan.num_inference_steps} steps, {plan.drop_steps} dropped evenly"
        if config.wants(name):
            contenders.append(
                Contender(name, result.staged, len(plan.step_stages), plan.macs_staged, staged_params, step_stages=plan.step_stages,
                          info=info, drop_steps=plan.drop_steps)
            )
        if name == "mosaic" and config.wants("mosaic+cache"):
            stage_networks = result.staged.networks()
            shares = [computed_share(cache_config, block_macs(network, plan.shape)) for network in stage_networks]
            networks = [id(stage_networks[s]) for s in plan.step_stages]
            full = cache_schedule(plan.num_inference_steps, cache_config.interval, networks)
            macs = cached_sampling_macs(_stage_step_macs(plan), full, [shares[s] for s in plan.step_stages])
            contenders.append(
                Contender(
                    "mosaic+cache", BlockReuse(result.staged, cache_config), plan.num_inference_steps, macs, staged_params,
                    step_stages=plan.step_stages, info={**info, "note": cache_config.label()},
                )
            )
    labels = conditions_for(loaded, default_values(spec, config.num_images))  # class i mod classes, or prompt i mod assets/prompts.txt
    sample_config = SampleConfig(n_steps, cfg, config.scheduler, config.seed)
    # 1. Quality: one untimed run of each method on all images.
    results = yield from relay(
        compare_steps(loaded, contenders, labels, sample_config, repeats=1, warmup=False, should_stop=should_stop),
        lambda event: BenchEvent("sample", event.contender, 0.5 * event.fraction),
    )
    if cache_dit_row is not None:  # its cost is decided per run: the quality run's MACs rank it
        row = next(r for r in results if r.name == "cache-dit")
        row.macs = cache_dit_macs(mosaic_plan.macs_dense, cache_dit_row.computed_fraction())
        row.info["computed_share"] = round(cache_dit_row.computed_fraction(), 4)
    # 2. Timing: warm-up + `repeats` interleaved runs on a few images.
    timed = yield from relay(
        compare_steps(
            loaded, contenders, conditions_for(loaded, default_values(spec, config.time_images)), sample_config,
            repeats=config.repeats, should_stop=should_stop,
        ),
        lambda event: BenchEvent("time", event.contender, 0.5 + 0.5 * event.fraction),
    )
    return summarise_timing(mosaic_plan, config, results, timed, timing_statistic(loaded.device) == "floor")


def _cache_dit_contender(loaded, config: BenchConfig, plan: Plan, should_stop):
    """(the `CacheDiT`, its Contender), unless `config.cache_dit` fixes the setting: the DBCache
    threshold whose quality run computes the largest share of the dense blocks within
    `mosaic`'s MACs. cache-dit decides its skips per batch from the batch's residuals, so
    the share depends on the images: a search on the timing images (cheap; the same noise as
    the timed runs) finds the neighbourhood, a second one on the quality images themselves
    (`REFINE_PROBES` runs within a factor `REFINE_SPAN`) sets the threshold, so the row is
    ranked at the MACs it was matched to. Its ideal speed-up is the timed runs' share."""
    from mosaic_core.conquer.cache_dit_row import (
        REFINE_PROBES, REFINE_SPAN, SEARCH_PROBES, CacheDiT, DBCacheSetting, cache_dit_macs, probe_fraction, threshold_search,
    )
    from mosaic_core.conquer.sampling import run_to_end, sample_loaded

    sample_config = SampleConfig(config.num_inference_steps, config.guidance_scale, config.scheduler, config.seed)
    dense = loaded.transformer
    steps = config.num_inference_steps

    def sampler(images: int):
        labels = conditions_for(loaded, default_values(loaded.spec, images))
        return lambda row: run_to_end(sample_loaded(loaded, labels, sample_config, transformer=row, should_stop=should_stop))

    timing, quality = sampler(config.time_images), sampler(config.num_images)
    info = {}
    if config.cache_dit is None or config.cache_dit.threshold is None:
        base = config.cache_dit or DBCacheSetting()
        target = plan.macs_staged / plan.macs_dense
        refine = config.num_images != config.time_images  # the same images: the first search already ran them
        total = SEARCH_PROBES + (REFINE_PROBES if refine else 0)
        done = itertools.count(1)
        progress = lambda probe: BenchEvent("match", "cache-dit", min(1.0, next(done) / total))  # noqa: E731
        setting, share = yield from relay(threshold_search(timing, dense, steps, target, base, SEARCH_PROBES), progress)
        if refine:
            first = setting.threshold
            bracket = (first / REFINE_SPAN, min(10.0, first * REFINE_SPAN))
            setting, quality_share = yield from relay(
                threshold_search(quality, dense, steps, target, base, REFINE_PROBES, bracket=bracket), progress
            )
            info["threshold_timing_images"] = first
            info["computed_share_matched"] = round(quality_share, 4)
            share = probe_fraction(timing, dense, setting, steps)
    else:
        setting = config.cache_dit
        share = probe_fraction(timing, dense, setting, steps)
    row = CacheDiT(dense, setting, steps)
    macs = cache_dit_macs(plan.macs_dense, share)
    info = {"note": setting.label(), "threshold": setting.threshold, "computed_share_timing": round(share, 4), **info}
    return row, Contender("cache-dit", row, steps, macs, param_count(dense), info=info)


def summarise_timing(plan: Plan, config: BenchConfig, results: list[MethodResult], timed: list[MethodResult], cpu: bool) -> BenchResult:
    """Put the timed runs' statistics and flags on the quality results: speed-up from the floor
    on a CPU (Σ of each step's least time; the min of whole runs when no per-step times were
    kept), from the median on a GPU."""
    timing = {r.name: timing_statistics(r.seconds_all, r.step_runs) for r in timed}
    statistic = "median" if not cpu else "floor" if all(t.floor is not None for t in timing.values()) else "min"
    by_name = {r.name: r for r in timed}
    reference = timing["dense"]
    flags = {}
    for r in results:
        stats = timing[r.name]
        r.seconds_all = list(by_name[r.name].seconds_all)
        r.step_seconds = by_name[r.name].step_seconds
        r.step_runs = by_name[r.name].step_runs
        r.stage_seconds = by_name[r.name].stage_seconds
        r.seconds = getattr(stats, statistic)
        r.statistic = statistic
        r.speedup = getattr(reference, statistic) / getattr(stats, statistic)
        flags[r.name] = row_flags(r, stats, reference, statistic)
    return BenchResult(plan, config, results, timing, statistic, flags)


def row_flags(result: MethodResult, stats: TimingStats, reference: TimingStats, statistic: str) -> tuple[str, ...]:
    """Why `result`'s speed-up (taken by `statistic`) is not a result: `floor_flags` for the
    floor, `timing_flags` otherwise; the reference row `dense` is judged on its own spread only."""
    dense = result.name == "dense"
    ratio = 1.0 if dense else result.speedup / result.ideal_speedup
    if statistic == "floor":
        return floor_flags(ratio, stats.floor_split, 0.0 if dense else reference.floor_split)
    return timing_flags(ratio, stats.excess, 0.0 if dense else reference.excess)


def comparison_flags(results: Sequence[MethodResult]) -> dict[str, tuple[str, ...]]:
    """`row_flags` of every row of a `compare_steps` run (whose first row, `dense`, is the
    reference), from each row's own timed runs and statistic: what `bench` flags, for a
    comparison made elsewhere (the studio's Compare)."""
    reference = next(r for r in results if r.name == "dense")
    reference_stats = timing_statistics(reference.seconds_all, reference.step_runs)
    return {
        r.name: row_flags(r, timing_statistics(r.seconds_all, r.step_runs), reference_stats, r.statistic) for r in results
    }


def budget_of(macs_fraction: float) -> float:
    """The MACs budget a row competes in: the least multiple of 0.05 it does not exceed by more than 0.01.

    A budget is a ceiling ("at most this much of dense"), so a row that spends less competes
    with those that spend up to the budget: a cache-dit threshold matched to 0.70 that lands
    on 0.667 is ranked against mosaic's 0.70, not against the 0.65 rows. The 0.01 of slack
    absorbs rounding of whole steps and cache intervals (0.705 -> 0.70); a row that spends
    0.717 spent more than 0.70 and competes at 0.75.
    """
    return math.ceil(round(20 * (macs_fraction - 0.01), 6)) / 20


def rank_by_budget(rows: Sequence[MethodResult], macs_dense: int) -> list[tuple[float, list[MethodResult]]]:
    """Rows grouped by MACs budget (`budget_of`), largest first; within one, best PSNR first."""
    groups: dict[float, list[MethodResult]] = {}
    for r in rows:
        groups.setdefault(budget_of(r.macs / macs_dense), []).append(r)
    ordered = []
    for budget in sorted(groups, reverse=True):
        ordered.append((budget, sorted(groups[budget], key=lambda r: (r.name != "dense", -(r.psnr if r.psnr is not None else -1e9)))))
    return ordered


STATISTIC_WORDS = {"floor": "floor (Σ of each step's least time over the runs)"}


def markdown_table(result: BenchResult, loaded) -> str:
    """bench.md: every method ranked by PSNR to dense within its MACs budget, with timing statistics and flags."""
    cfg = result.config
    lines = [
        f"**{loaded.spec.name}**, {cfg.scheduler.upper()}-{cfg.num_inference_steps}, cfg {cfg.guidance_scale}, "
        f"S = {cfg.sparsity}, quality on {cfg.num_images} images, seed {cfg.seed}; time on {cfg.time_images} images, "
        f"{cfg.repeats} interleaved runs, speed-up from the {STATISTIC_WORDS.get(result.statistic, result.statistic)}; {loaded.device} "
        f"({torch.get_num_threads()} threads, pinned). Ranked by PSNR to dense within each MACs budget.",
        "",
    ]
    if result.command:
        lines += [f"command: `{result.command}`", ""]
    lines += [
        "| budget | rank | method | steps | MACs (of dense) | params | s floor / min / median (spread) | speed-up (ideal) | measured/ideal | accuracy | FD | PSNR (dB) | SSIM |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    for budget, rows in rank_by_budget(result.results, result.plan.macs_dense):
        for rank, r in enumerate(rows, 1):
            macs = f"{format_count(r.macs)} ({r.macs / result.plan.macs_dense:.2f})"
            psnr = "ref" if r.name == "dense" else fmt(r.psnr, ".1f")
            stats = result.timing.get(r.name)
            floor = "—" if stats is None or stats.floor is None else f"{stats.floor:.2f}"
            seconds = "—" if stats is None else f"{floor} / {stats.min:.2f} / {stats.median:.2f} ({stats.spread:.0%})"
            flags = result.flags.get(r.name, ())
            if flags:
                speed = f"flagged: {'; '.join(flags)}"
                ratio = "—"
            else:
                speed = f"{r.speedup:.2f}× ({r.ideal_speedup:.2f}×)"
                ratio = f"{r.speedup / r.ideal_speedup:.2f}"
            lines.append(
                f"| {budget:.2f} | {'ref' if r.name == 'dense' else rank} | {r.name} | {r.num_inference_steps} | {macs} | "
                f"{format_count(r.params)} | {seconds} | {speed} | {ratio} | {fmt(r.accuracy, '.3f')} | "
                f"{fmt(r.fd, '.1f')} | {psnr} | {fmt(r.ssim, '.3f')} |"
            )
    allocation = result.plan.allocation
    lines += [
        "",
        f"mosaic stages: steps {'/'.join(map(str, allocation.step_counts))}, sparsity "
        f"{'/'.join(f'{a:.2f}' for a in allocation.achieved)} (early/middle/late).",
    ]
    notes = sorted({r.info["note"] for r in result.results if r.name in ("cache", "mosaic+cache") and "note" in r.info})
    if notes:
        lines.append(f"cache rows: {'; '.join(notes)} (written here).")
    for r in result.results:
        if r.name == "mosaic-measured-drop":
            lines.append(f"mosaic-measured-drop row: {r.info['note']} (a subset of the reference steps, DDIM jumping over "
                         f"the rest), stage sparsity {'/'.join(f'{a:.2f}' for a in r.info['stage_sparsity'])}.")
        if r.name == "cache-dit":
            matched = (
                f" Threshold matched on the quality images (the search on the timing images gave {r.info['threshold_timing_images']:.3g})."
                if "threshold_timing_images" in r.info else ""
            )
            lines.append(
                f"cache-dit row: {r.info['note']}. MACs of the quality run ({r.info.get('computed_share', 0):.3f} of the dense "
                f"blocks ran); its ideal speed-up is the timed runs' ({r.info.get('computed_share_timing', 0):.3f}).{matched}"
            )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# Timing at real size without real weights (`bench --random-weights`)
# ---------------------------------------------------------------------------------------
#
# Speed depends on shapes, not on weight values, so a model of the registry entry's real
# shapes with random weights times like the real one. The staged networks are sliced from
# it with *random* keep sets of the plan's sizes (no calibration: which heads are kept
# does not change the cost). Quality columns are left out: random weights draw noise.
#
# Protocol: for each sparsity, the dense network and the plan's distinct stage networks
# are timed together — one warm-up call each (with `compile`, this call compiles), then
# `repeats` rounds, interleaved round-robin, each timing `calls` consecutive calls of a
# network between two device synchronisations. Seconds per call are reported as min and
# median over the rounds. A plan's sampling time is Σ_stage steps_stage · seconds/call_stage
# (guidance is inside the call's batch), so
#
#     measured speed-up = N · t_dense / Σ_i n_i · t_i,     ideal = MACs_dense / MACs_staged.
#
# On a CPU the speed-up uses the **min** (the least-disturbed round: other processes only
# ever add time); on a GPU the median.


@dataclass(frozen=True)
class RandomBenchConfig:
    """Random-weights timing: sparsities, plan steps N, rows per call, timed calls and rounds."""

    sparsities: tuple[float, ...] = (0.3, 0.5)
    num_inference_steps: int = 50
    batch: int = 2  # rows per model call (classifier-free guidance: 2 rows = 1 image)
    calls: int = 2
    repeats: int = 5
    seed: int = 0
    M: float = DEFAULT_M
    lam: float = 0.01
    scheduler: str = "ddim"
    compile: bool = False
    unit_multiple: int = 1  # kept MLP units rounded to multiples of this (`plan_with_unit_multiple`; 1: the plan's)

    def __post_init__(self) -> None:
        if not self.sparsities:
            raise ValueError("give at least one sparsity to time (e.g. --sparsities 0.3,0.5)")
        for value in self.sparsities:
            if not 0.0 <= float(value) <= 0.9:
                raise ValueError(f"each sparsity must be in [0, 0.9], got {value}")
        for name, low, high in (("batch", 1, 1024), ("calls", 1, 100), ("repeats", 1, 50), ("unit_multiple", 1, 256)):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or not low <= value <= high:
                raise ValueError(f"--{name.replace('_', '-')} must be a whole number in [{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class NetworkTiming:
    """Seconds per model call of one network (all rounds), its size and peak memory."""

    name: str
    heads_kept: int
    units_kept: int
    params: int
    seconds: tuple[float, ...]
    warmup_seconds: float
    peak_memory: int | None  # bytes: CUDA max_memory_allocated; None on CPU

    @property
    def min(self) -> float:
        return float(np.min(self.seconds))

    @property
    def median(self) -> float:
        return float(np.median(self.seconds))


@dataclass(frozen=True)
class RandomPlanTiming:
    """One sparsity: its plan, the dense timing of the same rounds and each stage's network."""

    sparsity: float
    plan: Plan
    dense: NetworkTiming
    stages: tuple[NetworkTiming | None, ...]  # None: the stage runs the dense network (or has no steps)

    def stage_timing(self, index: int) -> NetworkTiming:
        return self.stages[index] or self.dense

    def speedup(self, statistic: str) -> float:
        """N · t_dense / Σ n_i · t_i with t = the `statistic` ("min" or "median") of each network."""
        steps = self.plan.step_counts
        dense = sum(steps) * getattr(self.dense, statistic)
        staged = sum(n * getattr(self.stage_timing(i), statistic) for i, n in enumerate(steps))
        return dense / staged

    def flags(self, statistic: str) -> tuple[str, ...]:
        """`timing_flags` of this plan: measured/ideal, the widest stage-network excess, the dense excess."""
        spread = lambda t: timing_statistics(t.seconds).excess  # noqa: E731
        stages = [spread(self.stage_timing(i)) for i in range(3) if self.plan.step_counts[i] > 0]
        return timing_flags(self.speedup(statistic) / self.plan.ideal_speedup, max(stages, default=0.0), spread(self.dense))

    def stage_ideal(self, index: int) -> float:
        """MACs per step of the dense blocks over those of stage `index`'s blocks."""
        from mosaic_core.divide.cost import block_macs_per_step

        shape, allocation = self.plan.shape, self.plan.allocation
        return block_macs_per_step(shape) / block_macs_per_step(shape, allocation.heads_kept[index], allocation.units_kept[index])


@dataclass
class RandomBenchResult:
    """Everything `bench --random-weights` measured."""

    model: str
    exact_config: bool
    config: RandomBenchConfig
    device: str
    dtype: str
    timings: list[RandomPlanTiming]
    build_seconds: float

    @property
    def statistic(self) -> str:
        """Which per-call statistic the speed-ups use: min on CPU, median on GPU."""
        return "min" if self.device.startswith("cpu") else "median"

    def to_dict(self) -> dict:
        """bench.json of the random-weights mode."""
        def network(t: NetworkTiming) -> dict:
            return {
                "name": t.name, "heads_kept": t.heads_kept, "units_kept": t.units_kept, "params": t.params,
                "seconds_per_call_min": round(t.min, 6), "seconds_per_call_median": round(t.median, 6),
                "seconds_per_call_all": [round(s, 6) for s in t.seconds], "warmup_seconds": round(t.warmup_seconds, 4),
                "peak_memory_bytes": t.peak_memory,
            }

        return {
            "mode": "random-weights",
            "model": self.model,
            "exact_config": self.exact_config,
            "quality": "left out: random weights produce noise, so accuracy, FD, PSNR and SSIM would measure nothing",
            "speedup_statistic": self.statistic,
            "batch": self.config.batch, "calls": self.config.calls, "repeats": self.config.repeats,
            "steps": self.config.num_inference_steps, "compile": self.config.compile,
            "machine": machine_info(self.device, self.dtype),
            "build_seconds": round(self.build_seconds, 2),
            "plans": [
                {
                    "sparsity": t.sparsity,
                    "stage_steps": list(t.plan.step_counts),
                    "stage_sparsity": [round(a, 4) for a in t.plan.allocation.achieved],
                    "ideal_speedup": round(t.plan.ideal_speedup, 4),
                    "measured_speedup_min": round(t.speedup("min"), 4),
                    "measured_speedup_median": round(t.speedup("median"), 4),
                    "measured_over_ideal": round(t.speedup(self.statistic) / t.plan.ideal_speedup, 4),
                    "flags": list(t.flags(self.statistic)),
                    "dense": network(t.dense),
                    "stages": [
                        {"stage": STAGE_NAMES[i], "ideal_speedup": round(t.stage_ideal(i), 4), **network(t.stage_timing(i))}
                        for i in range(3)
                    ],
                }
                for t in self.timings
            ],
        }


def machine_info(device: str, dtype: str) -> dict:
    """Device, threads, GPU name, platform and versions, for every bench report."""
    return {
        "device": device,
        "dtype": dtype,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def random_weights_model(spec, device: torch.device, dtype: torch.dtype, seed: int = 0) -> tuple[torch.nn.Module, bool]:
    """A DiTTransformer2DModel of the entry's real shapes with random weights, and whether its config is exact.

    The config is `parameters.transformer_config` (the real config.json when present, else
    the one the registry's shape implies). Built directly on `device`: nothing is read.
    """
    from diffusers import DiTTransformer2DModel

    from mosaic_core.models.parameters import transformer_config

    config, exact = transformer_config(spec)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(seed)
    with torch.device(device):
        model = DiTTransformer2DModel(**config)
    if dtype != torch.float32:
        model = model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model, exact


def plan_with_unit_multiple(plan: Plan, multiple: int) -> Plan:
    """`plan` with each stage's kept MLP units rounded to the nearest multiple of `multiple` (at
    least one multiple; a stage that keeps all keeps all), its achieved sparsities and staged MACs
    recounted: what a prune with that unit multiple builds (§3.11), for timing by shapes."""
    from mosaic_core.divide.allocation import _step_weighted_mean
    from mosaic_core.divide.cost import block_macs_per_step, sampling_macs

    if multiple == 1:
        return plan
    shape, allocation = plan.shape, plan.allocation
    units = tuple(
        u if u >= shape.mlp_hidden else min(shape.mlp_hidden, max(multiple, multiple * round(u / multiple)))
        for u in allocation.units_kept
    )
    dense = block_macs_per_step(shape)
    achieved = tuple(1.0 - block_macs_per_step(shape, h, u) / dense for h, u in zip(allocation.heads_kept, units))
    counts = allocation.step_counts
    rounded = replace(allocation, units_kept=units, achieved=achieved, overall_achieved=_step_weighted_mean(achieved, counts))
    return replace(plan, allocation=rounded, macs_staged=sampling_macs(shape, list(zip(allocation.heads_kept, units)), counts))


def random_keeps(num_blocks: int, num_heads: int, num_units: int, heads_kept: int, units_kept: int, generator: torch.Generator):
    """Per block, a random sorted set of `heads_kept` heads and `units_kept` MLP units."""
    from mosaic_core.prune.surgery import BlockKeep

    keeps = []
    for _ in range(num_blocks):
        heads = torch.randperm(num_heads, generator=generator)[:heads_kept].sort().values.tolist()
        units = torch.randperm(num_units, generator=generator)[:units_kept].sort().values.tolist()
        keeps.append(BlockKeep(heads=tuple(heads), units=tuple(units)))
    return keeps


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels are asynchronous); no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(model: torch.nn.Module, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], calls: int) -> float:
    """Seconds per call of `model(x, timestep=t, class_labels=y)`, between two device synchronisations."""
    import time

    x, t, y = inputs
    synchronize(x.device)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(calls):
            model(x, timestep=t, class_labels=y)
    synchronize(x.device)
    return (time.perf_counter() - start) / calls


def _peak_memory_start(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def random_bench_steps(
    spec,
    config: RandomBenchConfig = RandomBenchConfig(),
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    should_stop: Callable[[], bool] | None = None,
) -> Generator[BenchEvent, None, RandomBenchResult]:
    """Time dense against staged plans of `config.sparsities` on a random-weights model of `spec`'s shapes."""
    import time

    from mosaic_core.jobs import Cancelled
    from mosaic_core.prune.surgery import sliced_model

    device = torch.device(device)
    start = time.perf_counter()
    dense, exact = random_weights_model(spec, device, dtype, config.seed)
    build_seconds = time.perf_counter() - start
    shape = spec.shape
    generator = torch.Generator().manual_seed(config.seed)
    x = torch.randn((config.batch, spec.in_channels, spec.sample_size, spec.sample_size), generator=generator).to(device, dtype)
    t = torch.full((config.batch,), 500, device=device, dtype=torch.long)
    y = torch.randint(0, spec.num_classes, (config.batch,), generator=generator).to(device)
    maybe_compile = (lambda m: torch.compile(m)) if config.compile else (lambda m: m)
    timings = []
    for index, sparsity in enumerate(config.sparsities):
        plan = build_plan(spec, config.num_inference_steps, config.M, config.lam, sparsity=sparsity, scheduler=config.scheduler)
        plan = plan_with_unit_multiple(plan, config.unit_multiple)
        allocation = plan.allocation
        # The distinct stage networks of this plan (equal sizes share one network, as build_staged does).
        networks: dict[tuple[int, int], torch.nn.Module] = {}
        stage_keys: list[tuple[int, int] | None] = []
        for i in range(3):
            key = (allocation.heads_kept[i], allocation.units_kept[i])
            if plan.step_counts[i] == 0 or key == (shape.num_heads, shape.mlp_hidden):
                stage_keys.append(None)
                continue
            if key not in networks:
                keeps = random_keeps(shape.num_layers, shape.num_heads, shape.mlp_hidden, key[0], key[1], generator)
                networks[key] = sliced_model(dense, keeps)
            stage_keys.append(key)
        contenders = [("dense", None, dense)] + [(f"{key[0]}h/{key[1]}u", key, net) for key, net in networks.items()]
        compiled = {name: maybe_compile(net) for name, _, net in contenders}
        seconds: dict[str, list[float]] = {name: [] for name, _, _ in contenders}
        warmup: dict[str, float] = {}
        peaks: dict[str, int | None] = {}
        total = len(contenders) * (config.repeats + 1)
        done = 0
        for round_index in range(config.repeats + 1):  # round 0: warm-up (and compilation)
            for name, _, _ in contenders:
                if should_stop is not None and should_stop():
                    raise Cancelled("benchmark cancelled")
                if round_index == 0:
                    _peak_memory_start(device)
                    warmup[name] = time_calls(compiled[name], (x, t, y), 1)
                    peaks[name] = _peak_memory(device)
                else:
                    seconds[name].append(time_calls(compiled[name], (x, t, y), config.calls))
                done += 1
                yield BenchEvent("time", f"S={sparsity:g} {name}", (index + done / total) / len(config.sparsities))
        by_key = {}
        for name, key, net in contenders:
            heads, units = key if key is not None else (shape.num_heads, shape.mlp_hidden)
            by_key[key] = NetworkTiming(
                name, heads, units, param_count(net), tuple(seconds[name]), warmup[name], peaks[name]
            )
        timings.append(
            RandomPlanTiming(sparsity, plan, by_key[None], tuple(None if key is None else by_key[key] for key in stage_keys))
        )
        del networks, compiled, contenders
    return RandomBenchResult(
        spec.name, exact, config, str(device), str(dtype).replace("torch.", ""), timings, build_seconds
    )


def random_markdown_table(result: RandomBenchResult) -> str:
    """bench.md of the random-weights mode: one row per plan, one per stage network."""
    cfg = result.config
    statistic = result.statistic
    why = "min of the rounds (CPU: other processes only add time)" if statistic == "min" else "median of the rounds"
    lines = [
        f"**{result.model}** with random weights ({'its real config' if result.exact_config else 'shapes from the registry'}), "
        f"{result.device} {result.dtype}, {torch.get_num_threads()} threads, batch {cfg.batch} rows per call, "
        f"{cfg.calls} calls × {cfg.repeats} interleaved rounds{', torch.compile' if cfg.compile else ''}"
        f"{f', kept MLP units rounded to multiples of {cfg.unit_multiple}' if cfg.unit_multiple > 1 else ''}; "
        f"speed-ups from the {why}. Plans at {cfg.scheduler.upper()}-{cfg.num_inference_steps}.",
        "",
        "Quality columns are left out: the weights are random, so accuracy, FD, PSNR and SSIM would measure nothing.",
        "",
        "| sparsity | steps E/M/L | stage sparsity | ideal speed-up | measured (min) | measured (median) | measured/ideal | flags |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in result.timings:
        flags = t.flags(statistic)
        lines.append(
            f"| {t.sparsity:g} | {'/'.join(map(str, t.plan.step_counts))} | "
            f"{'/'.join(f'{a:.2f}' for a in t.plan.allocation.achieved)} | {t.plan.ideal_speedup:.3f}× | "
            f"{t.speedup('min'):.3f}× | {t.speedup('median'):.3f}× | {t.speedup(statistic) / t.plan.ideal_speedup:.3f} | "
            f"{'flagged: ' + '; '.join(flags) if flags else '—'} |"
        )
    memory = lambda b: "— (CPU)" if b is None else f"{b / 2**30:.2f} GiB"  # noqa: E731
    lines += [
        "",
        "| sparsity | network | heads/units kept | params | s/call min | s/call median | ideal | measured (min) | warm-up s | peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in result.timings:
        rows = [("dense", t.dense, 1.0)] + [
            (STAGE_NAMES[i], t.stage_timing(i), t.stage_ideal(i)) for i in range(3) if t.plan.step_counts[i] > 0
        ]
        for label, timing, ideal in rows:
            lines.append(
                f"| {t.sparsity:g} | {label} | {timing.heads_kept}/{timing.units_kept} | {format_count(timing.params)} | "
                f"{timing.min:.4f} | {timing.median:.4f} | {ideal:.3f}× | {t.dense.min / timing.min:.3f}× | "
                f"{timing.warmup_seconds:.2f} | {memory(timing.peak_memory)} |"
            )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# Where a step's time goes (`bench --random-weights --profile-stages`)
# ---------------------------------------------------------------------------------------
#
# Pruning shrinks only the attention modules (heads) and the MLPs (units); the patch and
# timestep/class embeddings, adaLN modulation, norms, residual adds and the final layer run
# at full size in every network. Timing those modules apart says how much of a step pruning
# can touch at all: with a fraction p of a dense call in the prunable modules, a network
# that shrinks them by the MAC ratio r runs at best in (1 − p) + p / r of the dense time.
# Each module is timed by a pre-hook and a hook around its call (with a device
# synchronisation on CUDA); the rest is the call's time minus both. Hooks cost a little
# time themselves, so the split is for reading, and the s/call of `bench` is the figure.


@dataclass(frozen=True)
class NetworkProfile:
    """Seconds per call of one network (min over rounds), split into attention, MLP and the rest."""

    sparsity: float
    name: str
    heads_kept: int
    units_kept: int
    total: float
    attention: float
    mlp: float

    @property
    def unprunable(self) -> float:
        """Seconds outside the attention and MLP modules (embeddings, adaLN, norms, residuals, final layer)."""
        return max(0.0, self.total - self.attention - self.mlp)

    def to_dict(self) -> dict:
        """profile.json row."""
        return {
            "sparsity": self.sparsity, "network": self.name, "heads_kept": self.heads_kept, "units_kept": self.units_kept,
            "seconds_per_call": round(self.total, 6), "attention": round(self.attention, 6), "mlp": round(self.mlp, 6),
            "unprunable": round(self.unprunable, 6), "unprunable_fraction": round(self.unprunable / self.total, 4),
        }


def prunable_modules(model: torch.nn.Module) -> dict[str, list[str]]:
    """Paths of the attention and feed-forward modules that pruning shrinks, from the family adapter."""
    from mosaic_core.models.adapters import adapter_for_model

    found: dict[str, list[str]] = {"attention": [], "mlp": []}
    for layer in adapter_for_model(model).prunable_layers(model):
        # the output projection's module path ends in to_out.0 (Attention) or net.2 (FeedForward)
        parts = layer.name.split(".")
        path = ".".join(parts[:-2])
        found["mlp" if layer.kind == "mlp" else "attention"].append(path)
    return {kind: sorted(set(paths)) for kind, paths in found.items()}


def profile_network(model: torch.nn.Module, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], calls: int, repeats: int) -> tuple[float, float, float]:
    """(total, attention, MLP) seconds per call, each the min over `repeats` rounds of `calls` calls."""
    import time

    device = inputs[0].device
    modules = dict(model.named_modules())
    spent = {"attention": 0.0, "mlp": 0.0}
    starts: dict[int, float] = {}
    handles = []
    for kind, paths in prunable_modules(model).items():
        for path in paths:
            module = modules[path]

            def before(m, args, kind=kind):
                synchronize(device)
                starts[id(m)] = time.perf_counter()

            def after(m, args, out, kind=kind):
                synchronize(device)
                spent[kind] += time.perf_counter() - starts.pop(id(m))

            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    best = None
    try:
        time_calls(model, inputs, 1)  # warm-up
        for _ in range(repeats):
            spent.update(attention=0.0, mlp=0.0)
            total = time_calls(model, inputs, calls)
            row = (total, spent["attention"] / calls, spent["mlp"] / calls)
            best = row if best is None or row[0] < best[0] else best
    finally:
        for handle in handles:
            handle.remove()
    return best


def profile_random_networks(spec, config: RandomBenchConfig, device, dtype) -> list[NetworkProfile]:
    """Profile the dense network and each plan's stage networks (random weights, random keeps of the plan's sizes)."""
    from mosaic_core.prune.surgery import sliced_model

    device = torch.device(device)
    dense, _ = random_weights_model(spec, device, dtype, config.seed)
    shape = spec.shape
    generator = torch.Generator().manual_seed(config.seed)
    x = torch.randn((config.batch, spec.in_channels, spec.sample_size, spec.sample_size), generator=generator).to(device, dtype)
    t = torch.full((config.batch,), 500, device=device, dtype=torch.long)
    y = torch.randint(0, spec.num_classes, (config.batch,), generator=generator).to(device)
    total, attention, mlp = profile_network(dense, (x, t, y), config.calls, config.repeats)
    profiles = [NetworkProfile(0.0, "dense", shape.num_heads, shape.mlp_hidden, total, attention, mlp)]
    for sparsity in config.sparsities:
        plan = build_plan(spec, config.num_inference_steps, config.M, config.lam, sparsity=sparsity, scheduler=config.scheduler)
        plan = plan_with_unit_multiple(plan, config.unit_multiple)
        done = set()
        for i in range(3):
            key = (plan.allocation.heads_kept[i], plan.allocation.units_kept[i])
            if plan.step_counts[i] == 0 or key in done or key == (shape.num_heads, shape.mlp_hidden):
                continue
            done.add(key)
            network = sliced_model(dense, random_keeps(shape.num_layers, shape.num_heads, shape.mlp_hidden, key[0], key[1], generator))
            total, attention, mlp = profile_network(network, (x, t, y), config.calls, config.repeats)
            profiles.append(NetworkProfile(sparsity, STAGE_NAMES[i], key[0], key[1], total, attention, mlp))
    return profiles


def profile_markdown(profiles: Sequence[NetworkProfile]) -> str:
    """The per-network time split as a markdown table, with the best speed-up pruning could give."""
    dense = profiles[0]
    lines = [
        "Where a call's time goes (min over rounds; hooks add a little time): attention and MLP shrink with pruning, "
        "the rest (embeddings, adaLN, norms, residuals, final layer) does not.",
        "",
        "| sparsity | network | heads/units | s/call | attention | MLP | unprunable (share) | speed-up vs dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in profiles:
        lines.append(
            f"| {p.sparsity:g} | {p.name} | {p.heads_kept}/{p.units_kept} | {p.total:.4f} | {p.attention:.4f} | "
            f"{p.mlp:.4f} | {p.unprunable:.4f} ({p.unprunable / p.total:.0%}) | {dense.total / p.total:.2f}× |"
        )
    return "\n".join(lines) + "\n"
