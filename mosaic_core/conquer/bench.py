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
| `mosaic-<K>-steps`    | `mosaic` at K < N steps: pruning stacked with step reduction      |

All methods share labels, seeds and initial noise; PSNR/SSIM compare each image with the
dense image of the same seed. The Hessians of one calibration setting are computed once
and reused by every method that needs them.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, replace
from typing import Callable, Generator

import numpy as np
import torch

from mosaic_core.prune.calibration import CalibrationConfig
from mosaic_core.conquer.compare import Contender, MethodResult, compare_steps
from mosaic_core.jobs import relay
from mosaic_core.divide.plan import Plan, build_plan
from mosaic_core.divide.stages import DEFAULT_M
from mosaic_core.prune.stage_pruning import PruneConfig, prune_steps
from mosaic_core.conquer.sampling import SampleConfig, labels_for
from mosaic_core.conquer.staged_denoiser import param_count

METHODS = ("dense", "fewer-steps", "uniform", "mosaic", "mosaic-random-calib", "mosaic-clean-calib", "mosaic-magnitude")


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

    def __post_init__(self) -> None:
        if not 1 <= int(self.num_images) <= 4096:
            raise ValueError(f"--n must be in [1, 4096], got {self.num_images}")
        if self.reduced_steps is not None and not 1 <= self.reduced_steps < self.num_inference_steps:
            raise ValueError(f"reduced steps must be in [1, {self.num_inference_steps - 1}], got {self.reduced_steps}")


@dataclass(frozen=True)
class BenchEvent:
    """Progress: `phase` is prune | sample, with the method and a fraction of the phase."""

    phase: str
    method: str
    fraction: float


@dataclass
class BenchResult:
    plan: Plan
    config: BenchConfig
    results: list[MethodResult]

    def to_dict(self, loaded) -> dict:
        """bench.json: the setup, the machine, and one row per method."""
        return {
            "model": loaded.spec.name,
            "sparsity": self.config.sparsity,
            "steps": self.config.num_inference_steps,
            "n": self.config.num_images,
            "repeats": self.config.repeats,
            "cfg": self.config.guidance_scale,
            "scheduler": self.config.scheduler,
            "seed": self.config.seed,
            "calibration": self.config.calibration.to_dict(),
            "plan": self.plan.to_dict(),
            "machine": {
                "device": str(loaded.device),
                "dtype": str(loaded.dtype).replace("torch.", ""),
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "gpu": torch.cuda.get_device_name(0) if loaded.device.type == "cuda" else None,
                "platform": platform.platform(),
                "torch": torch.__version__,
            },
            "methods": [r.row() for r in self.results],
        }


def bench_steps(
    loaded, config: BenchConfig, should_stop: Callable[[], bool] | None = None
) -> Generator[BenchEvent, None, BenchResult]:
    """Prune every method, then sample and time them all together; returns a `BenchResult`."""
    spec = loaded.spec
    cfg = spec.default_cfg if config.guidance_scale is None else config.guidance_scale
    config = replace(config, guidance_scale=cfg)
    n_steps = config.num_inference_steps

    def plan_for(steps: int, uniform: bool = False) -> Plan:
        return build_plan(spec, steps, config.M, config.lam, sparsity=config.sparsity, uniform=uniform, scheduler=config.scheduler)

    mosaic_plan = plan_for(n_steps)
    dense_macs_per_step = mosaic_plan.macs_dense // n_steps
    calibration = config.calibration
    variants = [
        ("uniform", plan_for(n_steps, uniform=True), PruneConfig(calibration)),
        ("mosaic", mosaic_plan, PruneConfig(calibration)),
        ("mosaic-random-calib", mosaic_plan, PruneConfig(replace(calibration, mode="random"))),
        ("mosaic-clean-calib", mosaic_plan, PruneConfig(replace(calibration, mode="clean"))),
        ("mosaic-magnitude", mosaic_plan, PruneConfig(calibration, scorer="magnitude")),
        ("mosaic-per-block", mosaic_plan, PruneConfig(calibration, allocation="per-block")),
    ]
    if config.reduced_steps:
        variants.append((f"mosaic-{config.reduced_steps}-steps", plan_for(config.reduced_steps), PruneConfig(calibration)))

    dense = loaded.transformer
    fewer = max(1, round(n_steps * mosaic_plan.macs_staged / mosaic_plan.macs_dense))
    contenders = [
        Contender("dense", dense, n_steps, mosaic_plan.macs_dense, param_count(dense)),
        Contender("fewer-steps", dense, fewer, dense_macs_per_step * fewer, param_count(dense), info={"note": f"{fewer} steps"}),
    ]
    analyses: dict = {}
    for index, (name, plan, prune_config) in enumerate(variants):
        result = yield from relay(
            prune_steps(loaded, plan, prune_config, should_stop=should_stop, analyses=analyses),
            lambda event, name=name, index=index: BenchEvent("prune", name, (index + event.fraction) / len(variants)),
        )
        contenders.append(
            Contender(
                name,
                result.staged,
                plan.num_inference_steps,
                plan.macs_staged,
                param_count(result.staged),
                step_stages=plan.step_stages,
                info={
                    "stage_sparsity": [round(a, 4) for a in plan.allocation.achieved],
                    "overall_sparsity": round(plan.overall_sparsity, 4),
                    "prune_seconds": round(sum(result.seconds.values()), 2),
                    "prune_seconds_by_phase": {k: round(v, 2) for k, v in result.seconds.items()},
                },
            )
        )
    labels = labels_for(config.num_images, spec.num_classes)
    sample_config = SampleConfig(n_steps, cfg, config.scheduler, config.seed)
    results = yield from relay(
        compare_steps(loaded, contenders, labels, sample_config, repeats=config.repeats, should_stop=should_stop),
        lambda event: BenchEvent("sample", event.contender, event.fraction),
    )
    return BenchResult(mosaic_plan, config, results)


def markdown_table(result: BenchResult, loaded) -> str:
    """bench.md: methods ranked by PSNR to dense (dense first), with speed and all three qualities."""
    rows = sorted(result.results, key=lambda r: (r.name != "dense", -(r.psnr or 0)))
    cfg = result.config
    lines = [
        f"**{loaded.spec.name}**, {cfg.scheduler.upper()}-{cfg.num_inference_steps}, cfg {cfg.guidance_scale}, "
        f"S = {cfg.sparsity}, {cfg.num_images} images, seed {cfg.seed}; seconds = median of {cfg.repeats} "
        f"(interleaved), {loaded.device} ({torch.get_num_threads()} threads). Ranked by PSNR to dense.",
        "",
        "| method | steps | MACs | params | seconds | speed-up (ideal) | measured/ideal | accuracy | FD | PSNR (dB) | SSIM |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        macs = f"{r.macs / 1e12:.3f} T" if r.macs >= 1e12 else f"{r.macs / 1e9:.1f} G"
        psnr = "ref" if r.name == "dense" else fmt(r.psnr, ".1f")
        lines.append(
            f"| {r.name} | {r.num_inference_steps} | {macs} | {r.params / 1e6:.2f} M | {r.seconds:.1f} | "
            f"{r.speedup:.2f}× ({r.ideal_speedup:.2f}×) | {r.speedup / r.ideal_speedup:.2f} | {fmt(r.accuracy, '.3f')} | "
            f"{fmt(r.fd, '.1f')} | {psnr} | {fmt(r.ssim, '.3f')} |"
        )
    allocation = result.plan.allocation
    lines += [
        "",
        f"mosaic stages: steps {'/'.join(map(str, allocation.step_counts))}, sparsity "
        f"{'/'.join(f'{a:.2f}' for a in allocation.achieved)} (early/middle/late).",
    ]
    return "\n".join(lines) + "\n"
