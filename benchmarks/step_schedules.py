"""Which steps to drop? A fitted subset of the reference DDIM steps against evenly spaced fewer steps,
alone and under a pruned model, at equal MACs (docs/method.md §4.6).

    python benchmarks/step_schedules.py                       # digits-dit, DDIM-50, 8 fitting + 32 held-out images
    python benchmarks/step_schedules.py --images 64 --steps 45,40,35 --sparsity 0.22 --alone 0.30 --drop 5

"Fewer steps" as `bench` and `tune` run it re-spaces the whole schedule: DDIM with 35 steps visits
980, 952, … instead of 980, 960, …, so every step moves away from the reference trajectory. Here a
schedule is instead a subset of the reference's N₀ timesteps. Which subset is fitted by dynamic
programming on one reference trajectory of the fitting images: dropping the steps between kept
steps i and j costs ‖DDIM-jump(x_i, ε_i, t_i → t_j) − x_j‖², the error of jumping straight from i to
j, summed over the kept intervals (no model call beyond the one trajectory). The schedule is then
scored on held-out images of other noise, as PSNR / SSIM to the dense reference images.

Part 1, dense: evenly spaced N steps (diffusers' DDIM) against the fitted subset of N.
Part 2, pruned (the default prune, measured allocation and refit, planned at N₀ steps): pruning alone
at `--alone` (N₀ steps) against pruning at `--sparsity` with `--drop` steps fewer: re-spaced (the
tuner's form today, planned at N₀ − drop steps), and as a subset of the reference steps dropped
evenly, fitted on the dense trajectory, and fitted on the pruned model's (its ε along its own
trajectory, jumps scored against the dense trajectory). MACs are block-linear, each step at its stage network's, over N₀
dense steps.

Not a test: it prints figures and asserts nothing beyond its own check that the engine's DDIM jump
(the one `sample --drop-steps` takes), run over the full schedule, reproduces diffusers' DDIM.
Timings are not reported.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_counts(text: str) -> list[int]:
    """'45,40' -> [45, 40]."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps must be comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"--steps must be comma-separated whole numbers >= 2, got {text!r}")
    return values


def main() -> None:
    from mosaic_core.allocator import steady_allocator

    steady_allocator()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits-dit", help="a DDIM model (default digits-dit)")
    parser.add_argument("--steps", type=parse_counts, default=[45, 40, 35, 25], help="step counts for part 1 (default 45,40,35,25)")
    parser.add_argument("--fit-images", type=int, default=8, help="images the schedule is fitted on (default 8)")
    parser.add_argument("--images", type=int, default=32, help="held-out images it is scored on (default 32)")
    parser.add_argument("--fit-seed", type=int, default=7)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--sparsity", type=float, default=0.22, help="part 2: the pruned model with dropped steps (default 0.22)")
    parser.add_argument("--alone", type=float, default=0.30, help="part 2: pruning alone, N₀ steps (default 0.30)")
    parser.add_argument("--drop", type=int, default=5, help="part 2: steps dropped from N₀ (default 5)")
    parser.add_argument("--reach", type=int, default=8, help="longest jump, in reference steps (default 8)")
    args = parser.parse_args()

    import numpy as np
    import torch

    from mosaic_core.conquer.caching import block_macs
    from mosaic_core.conquer.metrics import mean_psnr, ssim
    from mosaic_core.conquer.sampling import SampleConfig, _ddim_jump, _denoise, decode_images, initial_noise, sample_loaded
    from mosaic_core.divide.plan import build_plan
    from mosaic_core.jobs import run_to_end
    from mosaic_core.models.adapters import ClassCondition
    from mosaic_core.models.loading import load_model
    from mosaic_core.models.samplers import make_scheduler, sampler_timesteps
    from mosaic_core.prune.calibration import CalibrationConfig, default_calibration_source
    from mosaic_core.prune.stage_pruning import PruneConfig, prune_steps

    loaded = load_model(args.model, device="cpu")
    spec = loaded.spec
    if spec.num_classes is None or loaded.vae is not None:
        raise SystemExit(f"{spec.name}: this benchmark drives a class-conditioned pixel DDIM model such as digits-dit")
    n0, cfg = spec.default_steps, spec.default_cfg
    shape = (spec.in_channels, spec.sample_size, spec.sample_size)
    full = [int(t) for t in sampler_timesteps("ddim", loaded.scheduler_config, n0)]
    scheduler = make_scheduler("ddim", loaded.scheduler_config)

    def jump(x, eps, t: int, to: int):  # DDIM (η = 0) from t straight to `to`: the step `sample --drop-steps` takes
        return _ddim_jump(scheduler, eps, torch.tensor(t), to, x).prev_sample

    def images_of(count: int, seed: int, offset: int):
        labels = np.arange(count) % spec.num_classes
        return labels, ClassCondition(torch.as_tensor(labels).long(), spec.num_classes), initial_noise(count, shape, seed, offset)

    def run(model, timesteps, condition, noise, trajectory: bool = False):
        x, xs, es = noise.clone().double(), [], []
        with torch.no_grad():
            for k, t in enumerate(timesteps):
                eps = _denoise(model, x.float(), torch.tensor(t), condition, condition.null(), cfg).double()
                xs.append(x)
                es.append(eps)
                x = jump(x, eps, t, timesteps[k + 1] if k + 1 < len(timesteps) else -1)
        xs.append(x)
        images = decode_images(x.float())
        return (images, xs, es) if trajectory else images

    def fit(xs, es, target, keep: int) -> list[int]:
        """The `keep` reference steps (the first always) whose summed jump errors are least."""
        last = len(full)
        cost = np.full((last + 1, last + 1), np.inf)
        for i in range(last):
            for j in range(i + 1, min(last, i + args.reach) + 1):
                to = full[j] if j < last else -1
                cost[i, j] = float(((jump(xs[i], es[i], full[i], to) - target[j]) ** 2).mean())
        best = np.full((last + 1, keep + 1), np.inf)
        came = np.zeros((last + 1, keep + 1), dtype=int)
        best[0, 0] = 0.0
        for j in range(1, last + 1):
            for m in range(1, keep + 1):
                for i in range(max(0, j - args.reach), j):
                    if best[i, m - 1] + cost[i, j] < best[j, m]:
                        best[j, m], came[j, m] = best[i, m - 1] + cost[i, j], i
        if not np.isfinite(best[last, keep]):
            raise SystemExit(f"no schedule of {keep} steps jumps at most {args.reach} reference steps: raise --reach")
        path, m = [last], keep
        while path[-1] != 0:
            path.append(int(came[path[-1], m]))
            m -= 1
        return [full[k] for k in sorted(path[1:])]

    def dropped(timesteps) -> str:
        return ",".join(str(i) for i, t in enumerate(full) if t not in set(timesteps)) or "none"

    dense = loaded.transformer
    dense_step = sum(block_macs(dense, spec.shape))

    def macs(model, timesteps) -> float:
        if model is dense:
            return len(timesteps) / n0
        per = [sum(block_macs(network, spec.shape)) for network in model.networks()]
        stages = model.stage_index(torch.tensor([float(t) for t in timesteps], dtype=torch.float64)).tolist()
        return sum(per[s] for s in stages) / (n0 * dense_step)

    start = time.perf_counter()
    _, fit_condition, fit_noise = images_of(args.fit_images, args.fit_seed, 1000)
    _, fit_xs, fit_es = run(dense, full, fit_condition, fit_noise, trajectory=True)
    labels, condition, noise = images_of(args.images, args.seed, 5000)
    reference = run(dense, full, condition, noise)
    diffusers_ref = run_to_end(sample_loaded(loaded, labels, SampleConfig(n0, cfg, "ddim", args.seed), noise=noise)).images
    gap = int(np.abs(reference.astype(int) - diffusers_ref.astype(int)).max())
    print(f"{spec.name}, DDIM-{n0}, cfg {cfg:g}; schedules fitted on {args.fit_images} images (seed {args.fit_seed}), "
          f"scored on {args.images} held-out images (seed {args.seed}); jumps of at most {args.reach} reference steps")
    print(f"check: the DDIM jump on all {n0} steps differs from diffusers' DDIMScheduler by at most {gap} "
          "grey level(s) per pixel")
    if gap > 1:
        raise SystemExit("the DDIM jump does not reproduce diffusers' DDIM: its figures would mean nothing")

    def score(images):
        return mean_psnr(images, reference), float(np.mean(ssim(images, reference)))

    rows = []
    for n in args.steps:
        even = run_to_end(sample_loaded(loaded, labels, SampleConfig(n, cfg, "ddim", args.seed), noise=noise)).images
        rows.append(("dense", f"{n} steps, evenly spaced (diffusers)", macs(dense, range(n)), *score(even), "re-spaced"))
        fitted = fit(fit_xs, fit_es, fit_xs, n)
        rows.append(("dense", f"{n} steps, fitted subset", macs(dense, fitted), *score(run(dense, fitted, condition, noise)), dropped(fitted)))

    calibration = CalibrationConfig(source=default_calibration_source(spec), seed=0)
    config = PruneConfig(calibration=calibration, allocation="measured", refit=True)
    analyses: dict = {}

    def pruned(sparsity: float, steps: int = n0):
        plan = build_plan(spec, steps, sparsity=sparsity)
        return run_to_end(prune_steps(loaded, plan, config, analyses=analyses)).staged

    alone = pruned(args.alone)
    rows.append(("pruned", f"s̄ = {args.alone:g} alone, {n0} steps", macs(alone, full), *score(run(alone, full, condition, noise)), "none"))
    staged = pruned(args.sparsity)
    keep = n0 - args.drop
    rows.append(("pruned", f"s̄ = {args.sparsity:g}, {n0} steps", macs(staged, full), *score(run(staged, full, condition, noise)), "none"))
    respaced = pruned(args.sparsity, keep)  # the tuner's form: the same pruning planned at `keep` re-spaced steps
    images = run_to_end(sample_loaded(loaded, labels, SampleConfig(keep, cfg, "ddim", args.seed), noise=noise, transformer=respaced)).images
    steps_respaced = [int(t) for t in sampler_timesteps("ddim", loaded.scheduler_config, keep)]
    rows.append(("pruned", f"s̄ = {args.sparsity:g}, {keep} steps, evenly re-spaced (diffusers; the tuner's form)",
                 macs(respaced, steps_respaced), *score(images), "re-spaced"))
    even = [full[int(round(i))] for i in np.linspace(0, n0 - 1, keep)]
    _, own_xs, own_es = run(staged, full, fit_condition, fit_noise, trajectory=True)
    for name, timesteps in (
        ("evenly dropped", even),
        ("fitted on the dense model", fit(fit_xs, fit_es, fit_xs, keep)),
        ("fitted on the pruned model", fit(own_xs, own_es, fit_xs, keep)),
    ):
        label = f"s̄ = {args.sparsity:g}, {keep} steps, {name}"
        rows.append(("pruned", label, macs(staged, timesteps), *score(run(staged, timesteps, condition, noise)), dropped(timesteps)))

    print()
    print("| model | schedule | MACs (of dense) | PSNR (dB) | SSIM | reference steps dropped (0 = first) |")
    print("|---|---|---|---|---|---|")
    for model, label, fraction, value, similarity, which in rows:
        print(f"| {model} | {label} | {fraction:.3f} | {value:.2f} | {similarity:.4f} | {which} |")
    print(f"\n({time.perf_counter() - start:.0f} s in all on a shared machine; not a timing)")


if __name__ == "__main__":
    main()
