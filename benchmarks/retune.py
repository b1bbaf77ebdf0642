"""How long does re-tuning take after a change of budget, and what does predicting cost in quality?

    python benchmarks/retune.py                                   # the studio's setting, budgets 0.5 then 0.3 … 0.8
    python benchmarks/retune.py --budgets 0.5,0.3,0.7 --out assets/bench/retune
    python benchmarks/retune.py --methods cli --out assets/bench/retune-cli   # the CLI's default methods

As the studio's "best at this budget" control does (its default methods, `ui.settings.TUNE_METHODS`, or
`--methods`: a comma list, or `cli` for `tune`'s defaults with the reuse methods, on
`ui.settings.TUNE_IMAGES` validation images, the default step grid, one engine's analyses
and memo), the tuner runs at the first budget, then at each next one. Every budget is tuned
twice, one after the other on the same cached Hessians:

    predicted   `tune(check=4)`: pruned and reuse candidates ranked by the quality models fit to the
                points sampled at earlier budgets; only the best few are pruned and sampled
                (`--check-seconds S`: a second one only if it should end within S seconds)
    exhaustive  `tune(check=0)`: every candidate pruned and sampled (its own memo)

Printed per budget: the seconds of each (the first predicted one gathers the Hessians),
how many candidates each sampled, both choices and the regret (exhaustive choice's PSNR −
predicted choice's, ≥ 0; 0 when prediction finds the same best point). Not a test: it
prints figures and asserts nothing. Run it alone on the machine: the seconds are wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from mosaic_core.allocator import steady_allocator

    steady_allocator()  # the heap the CLI and the studio run with (mosaic_core/allocator.py)
    from mosaic_core.conquer.tune import DEFAULT_CHECK, DEFAULT_METHODS, check_methods, tune
    from mosaic_core.divide.stages import DEFAULT_M
    from mosaic_core.models.loading import load_model
    from mosaic_core.models.samplers import model_default_sampler
    from mosaic_core.models.registry import DEFAULT_MODEL, resolve_model
    from mosaic_core.prune.calibration import CalibrationConfig
    from mosaic_core.prune.stage_pruning import PruneConfig
    from ui import settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--budgets", default="0.5,0.3,0.7,0.4,0.6,0.25,0.8")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--images", type=int, default=settings.TUNE_IMAGES)
    parser.add_argument("--check", type=int, default=DEFAULT_CHECK)
    parser.add_argument("--check-seconds", type=float, default=settings.TUNE_CHECK_SECONDS or 0.0, help="0: no time bound")
    parser.add_argument("--calib-size", type=int, default=settings.CALIBRATION_SIZE_DEFAULT)
    parser.add_argument("--methods", default="studio", help="studio (ui.settings.TUNE_METHODS), cli (tune's defaults) or a comma list")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    methods = {"studio": tuple(settings.TUNE_METHODS), "cli": DEFAULT_METHODS}.get(args.methods)
    methods = check_methods(args.methods.split(",")) if methods is None else methods
    setting = {"studio": "The studio's tuner setting", "cli": "The command line's default methods"}.get(args.methods, "Methods")
    budgets = [float(b) for b in args.budgets.split(",")]

    spec = resolve_model(args.model)
    loaded = load_model(spec, device="cpu")
    config = PruneConfig(CalibrationConfig(size=args.calib_size))
    common = dict(reference_steps=args.steps, M=DEFAULT_M, lam=0.01, scheduler=model_default_sampler(spec), cx=1.0,
                  images=args.images, methods=methods)
    analyses: dict = {}
    memos = {"predicted": {}, "exhaustive": {}}
    rows = []
    for index, budget in enumerate(budgets):
        row = dict(budget=budget)
        for name, check in (("predicted", args.check), ("exhaustive", 0)):
            messages: list[str] = []
            started = time.perf_counter()
            bound = args.check_seconds if name == "predicted" and args.check_seconds > 0 else None
            result = tune(loaded, budget, config, analyses=analyses, memo=memos[name], check=check, check_seconds=bound,
                          on_progress=messages.append, **common)
            seconds = time.perf_counter() - started
            chosen = result.points[result.chosen]
            row[name] = dict(
                seconds=round(seconds, 2), sampled=sum(1 for m in messages if not m.startswith("dense")),
                predicted=sum(1 for p in result.points if p.predicted), unchecked=result.unchecked, steps=chosen.steps, method=chosen.allocation,
                drop_steps=chosen.drop_steps, steps_label=chosen.steps_label,
                psnr=round(chosen.psnr, 3), macs=round(chosen.macs_fraction, 4), models=result.quality_models,
            )
        row["regret_db"] = round(row["exhaustive"]["psnr"] - row["predicted"]["psnr"], 3)
        row["first"] = index == 0
        rows.append(row)
        p, e = row["predicted"], row["exhaustive"]
        print(f"b={budget:.2f} predicted {p['seconds']:6.2f} s ({p['sampled']} sampled, {p['predicted']} predicted) -> "
              f"{p['steps_label']} steps {p['method']:<13} {p['psnr']:6.2f} dB | exhaustive {e['seconds']:6.2f} s ({e['sampled']} sampled) -> "
              f"{e['steps_label']} steps {e['method']:<13} {e['psnr']:6.2f} dB | regret {row['regret_db']:+.2f} dB"
              + ("  (first: gathers the Hessians)" if index == 0 else ""), flush=True)
    later = [r for r in rows if not r["first"]]
    if later:
        print(f"re-tunes: predicted median {sorted(r['predicted']['seconds'] for r in later)[len(later) // 2]:.2f} s, "
              f"max {max(r['predicted']['seconds'] for r in later):.2f} s; exhaustive median "
              f"{sorted(r['exhaustive']['seconds'] for r in later)[len(later) // 2]:.2f} s; worst regret "
              f"{max(r['regret_db'] for r in later):+.2f} dB")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(model=spec.name, sampler=common["scheduler"], steps=args.steps, images=args.images, check=args.check,
                    check_seconds=args.check_seconds,
                    calib_size=args.calib_size, methods=list(methods), torch_threads=_threads())
        out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
        lines = [
            f"# Re-tuning after a change of budget: {spec.name}, {common['scheduler']}-{args.steps}",
            "",
            f"{setting} ({', '.join(methods)}; {args.images} validation images; calibration "
            f"{args.calib_size}), budgets in the order run, on one set of cached Hessians. Wall seconds on a "
            f"{_threads()}-thread CPU. Predicted: at most {args.check} candidates checked"
            + (f", a second only if it should end within {args.check_seconds:g} s" if args.check_seconds > 0 else "")
            + f"; *left* counts those the time bound left predicted. Made by `python benchmarks/retune.py --budgets {args.budgets} "
            f"--check-seconds {args.check_seconds:g}" + ("" if args.methods == "studio" else f" --methods {args.methods}")
            + f" --out {args.out}`.",
            "",
            "| budget | predicted: s | sampled | left | choice | PSNR dB | exhaustive: s | sampled | choice | PSNR dB | regret dB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            p, e = r["predicted"], r["exhaustive"]
            note = " (gathers Hessians)" if r["first"] else ""
            lines.append(f"| {r['budget']:.2f} | {p['seconds']:.2f}{note} | {p['sampled']} | {p['unchecked']} | {p['steps_label']} {p['method']} | {p['psnr']:.2f} | "
                         f"{e['seconds']:.2f} | {e['sampled']} | {e['steps_label']} {e['method']} | {e['psnr']:.2f} | {r['regret_db']:+.2f} |")
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
