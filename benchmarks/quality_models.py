"""Could a better quality model let a re-tune sample one candidate instead of two?

    python benchmarks/quality_models.py                      # 13 budgets, 10 orders
    python benchmarks/quality_models.py --out assets/bench/quality-models

A re-tune's time is its sampling: the tuner predicts every pruned candidate's PSNR from its
recorded error with `QualityModel` (MSE = MSE_dense(n) + κ·E^α, fit to the points sampled
so far) and samples the best one or two (`tune(check=2)`). One look would halve the
slowest re-tunes, if the model ranked the candidates well enough. This benchmark answers
that with real points, not a guess:

1. Every candidate at every budget of `--budgets` is pruned and sampled once
   (`tune(check=0)`, the studio's setting: methods dense, paper and measured, 4 validation
   images, one set of Hessians), so each one's true PSNR is known.
2. Re-tuning is then replayed on those points in `--orders` budget orders (the first budget
   is always the first, sampled in full as in the studio): at each next budget the model is
   fit to the points sampled so far and candidates are sampled best predicted first, while
   the next one's prediction plus max(residual, 1 dB) reaches the best sampled (the tuner's
   rule), at most 1 or 2 per budget.

Model forms compared, each fit by least squares in dB over a grid:

    α, κ         MSE = MSE_d + P, P = κ·E^α: the errors of fewer steps and of pruning added as
                 independent, α and κ shared by every step count (the tuner's first model)
    α, κ, ρ      MSE = MSE_d + P + 2ρ·√(MSE_d·P): the two errors may add or partly cancel
                 (the tuner's `fit_quality` now)
    α, κ, β      P = κ·E^α·(n/N₀)^β: the same recorded error costs more or less at n steps
    κ per n      a κ of its own per step count seen (the shared fit where a count has none)

Printed: per form and look count, the regret summed over every replayed re-tune (the best
candidate's PSNR minus the chosen one's, 0 when the model finds it), its mean and maximum,
and the samples per re-tune. Not a test: it prints figures and asserts nothing. The first
step samples every candidate of every budget (minutes); `--points FILE` reuses a JSON it
wrote with `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ALPHAS = np.arange(0.5, 2.51, 0.125)
LOG_KAPPAS = np.arange(-16.0, 4.0 + 1e-9, 0.05)
RHOS = np.round(np.arange(-0.9, 0.91, 0.1), 2)
BETAS = np.arange(-1.0, 4.01, 0.5)


def _psnr(dense_psnr, error, steps, alpha, log_kappa, rho=0.0, beta=0.0, reference_steps=50):
    """The tuner's (4.15) (`tune._model_psnr`), with P scaled by (n/N₀)^β: a κ of κ·(n/N₀)^β."""
    from mosaic_core.conquer.tune import _model_psnr

    log_kappa = np.asarray(log_kappa) + beta * np.log10(np.asarray(steps, float) / reference_steps)
    return _model_psnr(np.asarray(dense_psnr, float), np.asarray(error, float), alpha, log_kappa, rho)


@dataclass
class Form:
    alpha: float
    log_kappa: float
    rmse: float
    rho: float = 0.0
    beta: float = 0.0
    per_steps: dict | None = None  # steps -> log κ

    def psnr(self, dense_psnr: float, error: float, steps: int) -> float:
        log_kappa = (self.per_steps or {}).get(int(steps), self.log_kappa)
        return float(_psnr(dense_psnr, error, steps, self.alpha, log_kappa, self.rho, self.beta))


def _grid_fit(rows, rhos=(0.0,), betas=(0.0,), alphas=ALPHAS) -> Form | None:
    if len(rows) < 4 or len({r[0] for r in rows}) < 2:
        return None  # the tuner's own rule (`fit_quality`)
    steps, dense, error, psnr = (np.asarray([r[i] for r in rows], float) for i in range(4))
    best = None
    for alpha in alphas:
        for rho in rhos:
            for beta in betas:
                predicted = _psnr(dense[None], error[None], steps[None], alpha, LOG_KAPPAS[:, None], rho, beta)
                sse = ((predicted - psnr[None]) ** 2).sum(1)
                i = int(np.argmin(sse))
                if best is None or sse[i] < best[0]:
                    best = (float(sse[i]), float(alpha), float(LOG_KAPPAS[i]), float(rho), float(beta))
    return Form(best[1], best[2], math.sqrt(best[0] / len(rows)), best[3], best[4])


def fit_tuner(rows):
    from mosaic_core.conquer.tune import fit_quality

    model = fit_quality(rows)
    return None if model is None else Form(model.alpha, model.log_kappa, model.rmse, rho=model.rho)


def fit_independent(rows):
    """The tuner's model before ρ: its α grid, the errors added as independent."""
    from mosaic_core.conquer.tune import ALPHAS as TUNER_ALPHAS

    return _grid_fit(rows, alphas=np.asarray(TUNER_ALPHAS))


def fit_kappa_per_steps(rows):
    shared = _grid_fit(rows)
    if shared is None:
        return None
    steps, dense, error, psnr = (np.asarray([r[i] for r in rows], float) for i in range(4))
    best = None
    for alpha in ALPHAS:
        total, per = 0.0, {}
        for n in sorted(set(steps)):
            mask = steps == n
            sse = ((_psnr(dense[mask][None], error[mask][None], n, alpha, LOG_KAPPAS[:, None]) - psnr[mask][None]) ** 2).sum(1)
            i = int(np.argmin(sse))
            total += float(sse[i])
            per[int(n)] = float(LOG_KAPPAS[i])
        if best is None or total < best[0]:
            best = (total, float(alpha), per)
    return Form(best[1], shared.log_kappa, math.sqrt(best[0] / len(rows)), per_steps=best[2])


FORMS = {
    "α, κ (errors independent)": fit_independent,
    "tuner: α, κ, ρ": fit_tuner,
    "α, κ, β": lambda rows: _grid_fit(rows, betas=BETAS),
    "κ per step count": fit_kappa_per_steps,
}


def gather(budgets, args) -> dict:
    """Every candidate of every budget pruned and sampled: {"dense": {n: psnr}, "budgets": {b: [point, ...]}}."""
    from mosaic_core.allocator import steady_allocator

    steady_allocator()
    from mosaic_core.conquer.tune import tune
    from mosaic_core.divide.stages import DEFAULT_M
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
                  images=settings.TUNE_IMAGES, methods=settings.TUNE_METHODS, check=0)
    analyses, memo, out = {}, {}, {"dense": {}, "budgets": {}, "reference_steps": args.steps}
    for budget in budgets:
        result = tune(loaded, budget, config, analyses=analyses, memo=memo, **common)
        print(f"budget {budget:.2f}: {len(result.points)} points sampled in {result.seconds:.1f} s", flush=True)
        out["budgets"][str(budget)] = [
            dict(steps=p.steps, method=p.allocation, error=p.recorded_error, psnr=p.psnr, macs=p.macs_fraction)
            for p in result.points if p.allocation in ("paper", "measured")
        ]
        for p in result.points:
            if p.allocation == "dense":
                out["dense"][str(p.steps)] = p.psnr
    return out


def replay(points: dict, fit, order, looks: int, margin: float = 1.0) -> tuple[list[float], int]:
    """Regret of each re-tune after the first budget of `order`, and the samples taken."""
    dense = {int(n): v for n, v in points["dense"].items()}
    reference_steps = points["reference_steps"]
    candidates = {b: [dict(p, key=(p["steps"], p["method"], round(p["error"], 9))) for p in points["budgets"][str(b)]] for b in order}
    sampled = {p["key"]: p for p in candidates[order[0]]}
    regrets, samples = [], 0
    for budget in order[1:]:
        here = candidates[budget]
        fresh = [p for p in here if p["key"] not in sampled]
        best = max([p["psnr"] for p in here if p["key"] in sampled]
                   + [v for n, v in dense.items() if n <= budget * reference_steps + 1e-9 and n < reference_steps] + [-math.inf])
        for _ in range(looks):
            models = {m: fit([(q["steps"], dense[q["steps"]], q["error"], q["psnr"]) for q in sampled.values() if q["method"] == m])
                      for m in ("paper", "measured")}
            ranked = sorted(((models[p["method"]].psnr(dense[p["steps"]], p["error"], p["steps"]), p)
                             for p in fresh if models[p["method"]] is not None), key=lambda t: -t[0])
            if not ranked or ranked[0][0] + max(models[ranked[0][1]["method"]].rmse, margin) < best:
                break
            head = ranked[0][1]
            fresh.remove(head)
            sampled[head["key"]] = head
            samples += 1
            best = max(best, head["psnr"])
        truth = max([p["psnr"] for p in here] + [v for n, v in dense.items() if n <= budget * reference_steps + 1e-9 and n < reference_steps])
        regrets.append(max(0.0, truth - best))
    return regrets, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits-dit")
    parser.add_argument("--budgets", default="0.5,0.25,0.3,0.35,0.4,0.45,0.55,0.6,0.65,0.7,0.75,0.8,0.9")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--orders", type=int, default=10)
    parser.add_argument("--points", default=None, help="a JSON of points an earlier --out wrote (skips sampling)")
    parser.add_argument("--out", default=None, help="write OUT.json (the points) and OUT.md")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    points = json.loads(Path(args.points).read_text()) if args.points else gather(budgets, args)
    first, rest = budgets[0], budgets[1:]
    rng = random.Random(0)
    orders = [[first, *rest]] + [[first, *rng.sample(rest, len(rest))] for _ in range(args.orders - 1)]
    lines = [
        "| model form | looks per re-tune | regret, sum (dB) | mean | max | samples per re-tune |",
        "|---|---|---|---|---|---|",
    ]
    for name, fit in FORMS.items():
        for looks in (1, 2):
            regrets, samples = [], 0
            for order in orders:
                r, s = replay(points, fit, order, looks)
                regrets += r
                samples += s
            lines.append(f"| {name} | {looks} | {sum(regrets):.2f} | {np.mean(regrets):.2f} | {max(regrets):.2f} | {samples / len(regrets):.2f} |")
            print(lines[-1], flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(points, indent=1))
        header = (
            f"# Quality model forms for one-look re-tunes: {args.model}, ddim-{args.steps}\n\n"
            f"Every candidate of budgets {args.budgets} sampled once (the studio's tuner setting, 4 validation images), "
            f"then re-tuning replayed in {len(orders)} budget orders, each starting at {first}: "
            f"{len(orders) * len(rest)} re-tunes per row. Regret: the best candidate's PSNR minus the chosen one's. "
            f"Made by `python benchmarks/quality_models.py --out {args.out}`.\n\n"
        )
        out.with_suffix(".md").write_text(header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
