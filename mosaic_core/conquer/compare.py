"""Conquer, measured: the same labels and seeds through several denoisers, timed and scored.

`compare_steps` samples every `Contender` (dense, staged, fewer steps, ...) on identical
labels and initial noise, and returns one `MethodResult` each: images, median seconds over
repeats (per run, per step and per stage), MACs, parameters, and quality (class accuracy
and Fréchet distance for digit models; PSNR and SSIM to the reference images of the same
seed for every model).

Timing protocol: one short warm-up run per contender (allocator, kernels, caches), then
`repeats` full runs, **interleaved round-robin** across contenders so that a slow phase of
a shared machine hits every method alike; the median is reported. Every step is timed
with a device synchronisation before reading the clock (CUDA kernels are asynchronous:
timing without it measures the launch, not the work).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Generator, Sequence

import numpy as np
import torch

from mosaic_core.jobs import relay
from mosaic_core.conquer.sampling import SampleConfig, SampleResult, run_to_end, sample_loaded
from mosaic_core.divide.stages import STAGE_NAMES


@dataclass
class Contender:
    """One denoiser to compare: a transformer (dense or staged) with its step count and cost."""

    name: str
    transformer: torch.nn.Module
    num_inference_steps: int
    macs: int
    params: int
    step_stages: Sequence[int] | None = None  # stage index of each step, for per-stage time
    info: dict = field(default_factory=dict)
    # reference steps dropped (`SampleConfig.drop_steps`): it runs num_inference_steps of num_inference_steps + drop_steps
    drop_steps: int = 0



def dense_and_staged(dense: torch.nn.Module, staged: torch.nn.Module, plan, dense_plan=None) -> list[Contender]:
    """The two contenders of a staged-vs-dense comparison of `plan` (dense first, same steps).

    `dense_plan` (the same schedule at another step count) sets the dense reference's steps,
    MACs and step stages instead: staged at the tuner's 40 steps against dense at its 50.
    A `plan` with dropped steps runs its kept steps (`Contender.drop_steps`).
    """
    from mosaic_core.conquer.staged_denoiser import param_count

    reference = plan if dense_plan is None else dense_plan
    return [
        Contender("dense", dense, reference.num_inference_steps, reference.macs_dense, param_count(dense), reference.step_stages),
        Contender("staged", staged, len(plan.step_stages), plan.macs_staged, param_count(staged), plan.step_stages,
                  drop_steps=plan.drop_steps),
    ]

@dataclass(frozen=True)
class CompareEvent:
    """Progress: which contender, which repeat (0 = warm-up), which step."""

    contender: str
    repeat: int
    repeats: int
    step: int
    num_steps: int
    fraction: float


STATISTICS = ("median", "floor")  # what `compare_steps` reports as a contender's seconds


def timing_statistic(device) -> str:
    """"floor" on a CPU (other processes only add time), "median" on a GPU, as `bench` times."""
    return "median" if getattr(device, "type", str(device)) == "cuda" else "floor"


def floor_seconds(step_runs: np.ndarray) -> float:
    """Σ over steps of each step's least time over the runs (runs × steps seconds): the
    least-disturbed trajectory time, where the min of whole runs needs one run that nothing
    disturbed at all (docs/method.md eq. 9.1)."""
    return float(np.min(step_runs, axis=0).sum())


@dataclass
class MethodResult:
    """Measurements of one contender."""

    name: str
    num_inference_steps: int
    images: np.ndarray
    labels: np.ndarray
    seconds: float
    seconds_all: list[float]
    step_seconds: np.ndarray
    stage_seconds: dict[str, float]
    macs: int
    params: int
    speedup: float = 1.0
    ideal_speedup: float = 1.0
    accuracy: float | None = None
    fd: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    info: dict = field(default_factory=dict)
    peak_memory: int | None = None  # bytes: CUDA max_memory_allocated over its runs; None on CPU
    step_runs: np.ndarray | None = field(default=None, repr=False)  # runs × steps seconds of the timed runs
    statistic: str = "median"  # what `seconds` is over the timed runs (`STATISTICS`)

    @property
    def floor_seconds(self) -> float:
        """`floor_seconds` of its timed runs (its `seconds` when none were kept)."""
        if self.step_runs is None or not len(self.step_runs):
            return self.seconds
        return floor_seconds(self.step_runs)

    def row(self) -> dict:
        """A JSON-ready summary (no images)."""
        return {
            "name": self.name,
            "steps": self.num_inference_steps,
            "macs": int(self.macs),
            "params": int(self.params),
            "seconds": round(self.seconds, 4),
            "seconds_all": [round(s, 4) for s in self.seconds_all],
            "floor_seconds": round(self.floor_seconds, 4),
            "statistic": self.statistic,
            "stage_seconds": {k: round(v, 4) for k, v in self.stage_seconds.items()},
            "speedup": round(self.speedup, 4),
            "ideal_speedup": round(self.ideal_speedup, 4),
            "measured_over_ideal": round(self.speedup / self.ideal_speedup, 4),
            "accuracy": self.accuracy,
            "fd": None if self.fd is None else round(self.fd, 3),
            "psnr": None if self.psnr is None else round(self.psnr, 3),
            "ssim": None if self.ssim is None else round(self.ssim, 4),
            "peak_memory_bytes": self.peak_memory,
            **self.info,
        }


def is_digit_model(spec) -> bool:
    """Whether the digit classifier applies (10 classes, one-channel pixel images)."""
    return spec.num_classes == 10 and spec.in_channels == 1 and not spec.latent and spec.sample_size % 8 == 0


def _stage_seconds(step_seconds: np.ndarray, step_stages: Sequence[int] | None) -> dict[str, float]:
    if step_stages is None or len(step_stages) != len(step_seconds):
        return {}
    stages = np.asarray(step_stages)
    return {name: float(step_seconds[stages == i].sum()) for i, name in enumerate(STAGE_NAMES)}


def compare_steps(
    loaded,
    contenders: Sequence[Contender],
    labels: Sequence[int] | np.ndarray,
    config: SampleConfig,
    *,
    repeats: int = 3,
    warmup: bool = True,
    reference: str | None = None,
    should_stop: Callable[[], bool] | None = None,
    statistic: str = "median",
) -> Generator[CompareEvent, None, list[MethodResult]]:
    """Sample and time every contender on the same labels and seeds; returns their results.

    `config.num_inference_steps` is ignored: each contender has its own step count.
    `reference` names the contender whose images PSNR/SSIM compare against, and whose
    seconds and MACs define the speed-ups (default: the first). `statistic` is what a
    result's `seconds` is over its timed runs: "median" of the run totals, or "floor", the
    sum of each step's least time (eq. 9.1; what a CPU should use, other processes only add
    time). With one run both are that run.
    """
    from mosaic_core.conquer import metrics as metrics

    if not contenders:
        raise ValueError("nothing to compare: give at least one contender")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}")
    if isinstance(repeats, bool) or int(repeats) != repeats or not 1 <= repeats <= 20:
        raise ValueError(f"repeats must be a whole number in [1, 20], got {repeats!r}")
    labels = labels if hasattr(labels, "model_kwargs") else np.asarray(labels)  # class ids, or a family's condition (prompts)
    names = [c.name for c in contenders]
    if len(set(names)) != len(names):
        raise ValueError(f"contender names must be unique, got {names}")
    reference = reference or names[0]
    if reference not in names:
        raise ValueError(f"reference '{reference}' is not one of {names}")

    total_steps = sum(c.num_inference_steps * repeats + (min(2, c.num_inference_steps) if warmup else 0) for c in contenders)
    done = itertools.count(1)  # steps finished, for the progress fraction
    first: dict[str, SampleResult] = {}
    timings: dict[str, list[np.ndarray]] = {c.name: [] for c in contenders}
    peaks: dict[str, int | None] = {c.name: None for c in contenders}
    cuda = loaded.device.type == "cuda"
    for repeat in range(0 if warmup else 1, repeats + 1):
        for contender in contenders:
            steps = min(2, contender.num_inference_steps) if repeat == 0 else contender.num_inference_steps
            drop = 0 if repeat == 0 else contender.drop_steps  # the warm-up only warms
            run_config = SampleConfig(steps + drop, config.guidance_scale, config.scheduler, config.seed, drop_steps=drop)
            if cuda:
                torch.cuda.reset_peak_memory_stats(loaded.device)
            result = yield from relay(
                sample_loaded(loaded, labels, run_config, transformer=contender.transformer, should_stop=should_stop),
                lambda e, name=contender.name, r=repeat: CompareEvent(name, r, repeats, e.step, e.num_steps, next(done) / total_steps),
            )
            if cuda:
                peaks[contender.name] = max(peaks[contender.name] or 0, int(torch.cuda.max_memory_allocated(loaded.device)))
            if repeat == 0:
                continue
            timings[contender.name].append(result.step_seconds)
            first.setdefault(contender.name, result)

    digits = is_digit_model(loaded.spec)
    reference_images = first[reference].images
    results = []
    for contender in contenders:
        runs = timings[contender.name]
        totals = [float(r.sum()) for r in runs]
        step_seconds = np.median(np.stack(runs), axis=0)
        images = first[contender.name].images
        seconds = floor_seconds(np.stack(runs)) if statistic == "floor" else float(np.median(totals))
        results.append(
            MethodResult(
                name=contender.name,
                num_inference_steps=contender.num_inference_steps,
                images=images,
                labels=first[contender.name].labels,
                seconds=seconds,
                seconds_all=totals,
                step_seconds=step_seconds,
                stage_seconds=_stage_seconds(step_seconds, contender.step_stages),
                macs=contender.macs,
                params=contender.params,
                accuracy=metrics.class_accuracy(images, labels) if digits else None,
                fd=metrics.digit_fd(images) if digits and len(images) >= 2 else None,
                psnr=metrics.mean_psnr(images, reference_images),
                ssim=float(metrics.ssim(images, reference_images).mean()) if min(images.shape[1:3]) >= 7 else None,
                info=dict(contender.info),
                peak_memory=peaks[contender.name],
                step_runs=np.stack(runs),
                statistic=statistic,
            )
        )
    base = next(r for r in results if r.name == reference)
    for r in results:
        r.speedup = base.seconds / r.seconds
        r.ideal_speedup = base.macs / r.macs
    return results


def compare(loaded, contenders, labels, config, **kwargs) -> list[MethodResult]:
    """Plain call: run `compare_steps` to the end."""
    return run_to_end(compare_steps(loaded, contenders, labels, config, **kwargs))

