"""Do more stages help? K = 3 against K = 4–6 at equal MACs on digits-dit (docs/method.md §12).

    python benchmarks/stages_k.py                                   # K = 3,4,5,6, S = 0.3, 8 images
    python benchmarks/stages_k.py --ks 2,3,4,5,6,8 --sparsity 0.5 --images 50 --calib-size 256
    python benchmarks/stages_k.py --allocation measured --sparsity 0.5     # the same MACs placed by recorded error

For each K the trajectory is divided by `divide_k_stages` (K = 3 is the M rule; more stages
split the early and late ends, the middle stage stays whole), the same overall sparsity S
is allocated by the score-weighted rule of §12.4 (so every K costs the same block-linear
MACs, up to rounding to whole heads and units), each stage is pruned with SNR-aware
calibration at its own noise levels and structured OBS, and the staged model samples the
same labels from the same initial noise as the dense model. Printed per K: the stages
(τ ranges), steps and achieved sparsity per stage, MACs relative to dense, and PSNR / SSIM
against the dense images. Analyses are shared between K where a stage's τ range recurs.

Not a test: it prints figures and asserts nothing. Quality figures are deterministic for a
given seed; timings on a shared machine are not reported.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_ks(text: str) -> list[int]:
    """'3,4,5' -> [3, 4, 5]."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ks must be comma-separated whole numbers >= 2, got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"--ks must be comma-separated whole numbers >= 2, got {text!r}")
    return values


def main() -> None:
    from mosaic_core.allocator import steady_allocator

    steady_allocator()  # the heap the CLI and the studio run with (mosaic_core/allocator.py)
    """Parse the arguments, prune and sample each K, print one table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits-dit")
    parser.add_argument("--ks", type=parse_ks, default=[3, 4, 5, 6], help="numbers of stages (default 3,4,5,6)")
    parser.add_argument("--sparsity", type=float, default=0.3, help="overall step-weighted sparsity S (default 0.3)")
    parser.add_argument("--images", type=int, default=8, help="images per model (class i mod 10; default 8)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--M", type=float, default=0.55)
    parser.add_argument("--lam", type=float, default=0.01)
    parser.add_argument("--calib-size", type=int, default=256, help="clean calibration images per stage (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allocation", choices=("paper", "measured"), default="paper",
                        help="paper: each stage's score-weighted counts in every block; measured: the same MACs placed over "
                        "stages × layers by recorded error (default paper)")
    args = parser.parse_args()

    import numpy as np
    import torch

    from mosaic_core.conquer.metrics import mean_psnr, ssim
    from mosaic_core.conquer.sampling import SampleConfig, sample_loaded
    from mosaic_core.divide.cost import sampling_macs
    from mosaic_core.divide.multistage import allocate_k_stages, divide_k_stages, k_stage_macs
    from mosaic_core.divide.plan import build_plan
    from mosaic_core.jobs import run_to_end
    from mosaic_core.models.loading import load_model
    from mosaic_core.prune.calibration import CalibrationConfig, default_calibration_source
    from mosaic_core.prune.multistage_pruning import prune_k_stages
    from mosaic_core.prune.stage_pruning import PruneConfig

    torch.manual_seed(args.seed)
    loaded = load_model(args.model, device="cpu")
    spec = loaded.spec
    plan = build_plan(spec, args.steps, args.M, args.lam, sparsity=args.sparsity)
    curve = plan.curve()
    labels = [i % spec.num_classes for i in range(args.images)]
    sample_config = SampleConfig(args.steps, spec.default_cfg, "ddim", args.seed)
    dense = run_to_end(sample_loaded(loaded, labels, sample_config)).images
    dense_macs = sampling_macs(spec.shape, None, plan.step_counts)
    calibration = CalibrationConfig(size=args.calib_size, source=default_calibration_source(spec), seed=args.seed)
    config = PruneConfig(calibration=calibration, allocation="measured" if args.allocation == "measured" else "per-stage")
    analyses: dict = {}
    print(
        f"{spec.name}, DDIM-{args.steps}, S = {args.sparsity}, M = {args.M}, λ = {args.lam}, "
        f"{args.images} images, {args.calib_size} calibration images per stage, guidance {spec.default_cfg}, "
        f"{args.allocation} allocation"
    )
    rows = []
    for K in args.ks:
        start = time.perf_counter()
        partition = divide_k_stages(curve, K, args.M)
        counts = partition.count_steps(plan.timesteps)
        allocation = allocate_k_stages(curve, partition, counts, args.sparsity, spec.shape)
        chosen: list = []
        staged = run_to_end(prune_k_stages(loaded, partition, allocation, config, analyses=analyses, measured=chosen))
        images = run_to_end(sample_loaded(loaded, labels, sample_config, transformer=staged)).images
        quality = (mean_psnr(images, dense), float(np.mean(ssim(images, dense))))
        if chosen:  # measured: each stage's removed share of the prunable MACs
            achieved = tuple(float(x) for x in chosen[0].sparsity)
            macs = sum(n * (1.0 - a) for n, a in zip(counts, achieved)) / sum(counts)
        else:
            achieved, macs = tuple(allocation.achieved), k_stage_macs(spec.shape, allocation) / dense_macs
        rows.append((K, partition, counts, achieved, macs, *quality))
        print(f"K = {K} done ({time.perf_counter() - start:.0f} s on a shared machine; not a timing)", flush=True)

    print()
    print("| K | stages τ (noisiest first) | steps | achieved sparsity | MACs / dense | PSNR (dB) | SSIM |")
    print("|---|---|---|---|---|---|---|")
    for K, partition, counts, achieved, macs, psnr_value, ssim_value in rows:
        ranges = ", ".join("–" if r is None else f"{r[1]}–{r[0]}" for r in partition.ranges)
        steps = " / ".join(str(n) for n in counts)
        sparsity = " / ".join(f"{a:.2f}" for a in achieved)
        print(f"| {K} | {ranges} | {steps} | {sparsity} | {macs:.4f} | {psnr_value:.2f} | {ssim_value:.4f} |")


if __name__ == "__main__":
    main()
