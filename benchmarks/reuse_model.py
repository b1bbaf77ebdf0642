"""Can a re-tune predict the block-reuse candidates (`cache`, `measured+cache`) instead of sampling them?

    python benchmarks/reuse_model.py                                  # 14 budgets, 10 orders
    python benchmarks/reuse_model.py --out assets/bench/reuse-model

`tune`'s default methods include two with block reuse. A `measured+cache` candidate spends
what its pruned networks leave of the budget on reuse, so each budget makes new ones, and
before the `ReuseModel` every re-tune sampled all of them. This benchmark checks the model
(docs/method.md (4.16)) on real points:

1. Every candidate of methods dense, cache, measured and measured+cache at every budget of
   `--budgets` is pruned and sampled once (`tune(check=0)`, 4 validation images, one set of
   Hessians), so each one's true PSNR is known.
2. The tuner's own fits (`fit_quality` for measured, `fit_reuse` for the reuse methods) are
   fit to all of them: the residual of each, and the reuse model's fields.
3. Re-tuning is replayed on those points in `--orders` budget orders (each starting with the
   first budget, sampled in full), with the tuner's rule: candidates sampled best predicted
   first while the next one's prediction plus max(residual, 1 dB) reaches the best sampled, at
   most `check` per re-tune. Two policies: the reuse candidates sampled every time (the tuner
   before), or predicted with the measured ones.

Printed: per policy, the regret summed over every replayed re-tune (the best candidate's PSNR
minus the chosen one's, 0 when the replay finds it), its maximum, and the sampler steps run per
re-tune (a re-tune's time is its sampling). Not a test: it prints figures and asserts nothing.
The first step samples every candidate (about 2 minutes on 2 cores); `--points FILE` reuses a
JSON it wrote with `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METHODS = ("dense", "cache", "measured", "measured+cache")
REUSE = ("cache", "measured+cache")


def gather(budgets, args) -> dict:
    """Every candidate of every budget sampled: {"dense": {n: psnr}, "budgets": {b: [point, ...]}, ...}."""
    from mosaic_core.allocator import steady_allocator

    steady_allocator()
    from mosaic_core.conquer.tune import tune
    from mosaic_core.divide.stages import DEFAULT_M
    from mosaic_core.models.adapters import adapter_for_model
    from mosaic_core.models.loading import load_model
    from mosaic_core.models.registry import resolve_model
    from mosaic_core.models.samplers import model_default_sampler
    from mosaic_core.prune.calibration import CalibrationConfig
    from mosaic_core.prune.stage_pruning import PruneConfig
    from ui import settings

    spec = resolve_model(args.model)
    loaded = load_model(spec, device="cpu")
    config = PruneConfig(CalibrationConfig(size=settings.CALIBRATION_SIZE_DEFAULT))
    common = dict(reference_steps=args.steps, M=DEFAULT_M, lam=0.01, scheduler=model_default_sampler(spec), cx=1.0,
                  images=settings.TUNE_IMAGES, methods=METHODS, check=0)
    blocks = len(adapter_for_model(loaded.transformer).block_paths(loaded.transformer))
    analyses, memo = {}, {}
    out = {"dense": {}, "budgets": {}, "reference_steps": args.steps, "num_blocks": blocks}
    for budget in budgets:
        result = tune(loaded, budget, config, analyses=analyses, memo=memo, **common)
        print(f"budget {budget:.2f}: {len(result.points)} points sampled in {result.seconds:.1f} s", flush=True)
        out["budgets"][str(budget)] = [
            dict(steps=p.steps, method=p.allocation, error=p.recorded_error, psnr=p.psnr, macs=p.macs_fraction,
                 asked=p.target_sparsity, cache=p.cache)
            for p in result.points if p.allocation != "dense" and p.macs_fraction <= budget + 1e-12
        ]
        for p in result.points:
            if p.allocation == "dense":
                out["dense"][str(p.steps)] = p.psnr
    return out


def _key(point: dict, budget: float) -> tuple:
    """The tuner's identity of a sampled point (`tune._identity`): a cache point by its setting, a
    measured+cache one by its budget too."""
    if point["method"] == "cache":
        return (point["steps"], "cache", tuple(point["cache"]))
    return (point["steps"], point["method"], round(point["asked"], 9)) + ((budget,) if point["method"] == "measured+cache" else ())


def _models(sampled: dict, dense: dict, blocks: int, reference_steps: int) -> dict:
    from mosaic_core.conquer.tune import fit_quality, fit_reuse

    measured = fit_quality([(p["steps"], dense[p["steps"]], p["error"], p["psnr"]) for p in sampled.values() if p["method"] == "measured"])
    reuse = fit_reuse([(p["steps"], dense[p["steps"]], p["error"], tuple(p["cache"]), p["psnr"])
                       for p in sampled.values() if p["method"] in REUSE], measured, blocks, reference_steps)
    return {"measured": measured, "cache": reuse, "measured+cache": reuse}


def _predicted(model, point: dict, dense: dict) -> float:
    if point["method"] in REUSE:
        return model.psnr(dense[point["steps"]], point["error"], tuple(point["cache"]), point["steps"])
    return model.psnr(dense[point["steps"]], point["error"])


def replay(points: dict, order, predict_reuse: bool, check: int) -> list[tuple[float, int]]:
    """(regret, sampler steps run) of each re-tune after the first budget of `order`."""
    dense = {int(n): v for n, v in points["dense"].items()}
    n0, blocks = points["reference_steps"], points["num_blocks"]
    by_budget = {b: {_key(p, b): p for p in points["budgets"][str(b)]} for b in order}
    sampled = dict(by_budget[order[0]])
    out = []
    for budget in order[1:]:
        here = by_budget[budget]
        fewer = [v for n, v in dense.items() if n <= budget * n0 + 1e-9 and n < n0]
        best = max([p["psnr"] for k, p in here.items() if k in sampled] + fewer + [-math.inf])
        fresh = {k: p for k, p in here.items() if k not in sampled}
        steps = 0
        if not predict_reuse:  # the tuner before: every new reuse candidate sampled
            for k in [k for k, p in fresh.items() if p["method"] in REUSE]:
                sampled[k] = fresh.pop(k)
                steps += sampled[k]["steps"]
                best = max(best, sampled[k]["psnr"])
        for _ in range(check):
            models = _models(sampled, dense, blocks, n0)
            ranked = sorted(((_predicted(models[p["method"]], p, dense), k) for k, p in fresh.items()
                             if models[p["method"]] is not None), key=lambda t: -t[0])
            if not ranked:
                break
            guess, k = ranked[0]
            if guess + max(models[fresh[k]["method"]].rmse, 1.0) < best:
                break
            sampled[k] = fresh.pop(k)
            steps += sampled[k]["steps"]
            best = max(best, sampled[k]["psnr"])
        truth = max([p["psnr"] for p in here.values()] + fewer)
        out.append((max(0.0, truth - best), steps))
    return out


def main() -> None:
    from mosaic_core.conquer.tune import DEFAULT_CHECK

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits-dit")
    parser.add_argument("--budgets", default="0.5,0.25,0.3,0.35,0.4,0.45,0.55,0.6,0.65,0.7,0.75,0.8,0.85,0.9")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--orders", type=int, default=10)
    parser.add_argument("--check", type=int, default=DEFAULT_CHECK)
    parser.add_argument("--points", default=None, help="a JSON of points an earlier --out wrote (skips sampling)")
    parser.add_argument("--out", default=None, help="write OUT.json (the points) and OUT.md")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    points = json.loads(Path(args.points).read_text()) if args.points else gather(budgets, args)
    dense = {int(n): v for n, v in points["dense"].items()}
    everything = {_key(p, float(b)): p for b, ps in points["budgets"].items() for p in ps}
    fit = _models(everything, dense, points["num_blocks"], points["reference_steps"])
    reuse_points = sum(1 for p in everything.values() if p["method"] in REUSE)
    summary = [
        f"Fit to every point: measured α {fit['measured'].alpha:g}, log₁₀ κ {fit['measured'].log_kappa:g}, ρ {fit['measured'].rho:g}, "
        f"residual {fit['measured'].rmse:.2f} dB over {fit['measured'].count} points; reuse λ {fit['cache'].log_reuse:g}, "
        f"a {fit['cache'].share_exponent:g}, b {fit['cache'].interval_exponent:g}, g {fit['cache'].steps_exponent:g}, "
        f"residual {fit['cache'].rmse:.2f} dB over {reuse_points} points.",
    ]
    print(summary[0], flush=True)
    first, rest = budgets[0], budgets[1:]
    rng = random.Random(0)
    orders = [[first, *rest]] + [[first, *rng.sample(rest, len(rest))] for _ in range(args.orders - 1)]
    lines = ["| reuse candidates | re-tunes | regret, sum (dB) | max | sampler steps per re-tune: mean | max |",
             "|---|---|---|---|---|---|"]
    for name, predict in (("sampled every time (before)", False), ("predicted (`ReuseModel`)", True)):
        runs = [r for order in orders for r in replay(points, order, predict, args.check)]
        regrets, steps = [r[0] for r in runs], [r[1] for r in runs]
        lines.append(f"| {name} | {len(runs)} | {sum(regrets):.2f} | {max(regrets):.2f} | {np.mean(steps):.1f} | {max(steps)} |")
        print(lines[-1], flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(points, indent=1) + "\n")
        header = (
            f"# Predicting the block-reuse candidates on a re-tune: {args.model}, ddim-{args.steps}\n\n"
            f"Every candidate of methods {', '.join(METHODS)} at budgets {args.budgets} sampled once (4 validation images), "
            f"then re-tuning replayed in {len(orders)} budget orders, each starting at {first}, with at most {args.check} "
            f"candidates sampled per re-tune by the tuner's rule. Regret: the best candidate's PSNR minus the chosen one's. "
            f"Made by `python benchmarks/reuse_model.py --out {args.out}`.\n\n"
        )
        out.with_suffix(".md").write_text(header + summary[0] + "\n\n" + "\n".join(lines) + "\n")
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
