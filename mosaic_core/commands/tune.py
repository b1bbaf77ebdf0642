"""`python -m mosaic_core tune`: the best sampler steps × allocation at a MAC budget.

    python -m mosaic_core tune --budget 0.5 --out tune.json
    python -m mosaic_core tune --speedup 2 --steps-grid 10,20,25,30,50 --images 4 --json
"""

from __future__ import annotations

import argparse
import json

from mosaic_core import limits
from mosaic_core.cli import float_in, int_in, text_of
from mosaic_core.commands.plan import add_plan_arguments, sampler_of
from mosaic_core.commands.prune import add_prune_arguments, prune_config_from_args


def _steps_grid(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps-grid must be whole numbers separated by commas, got {limits.shown(text)}") from None
    if not values or any(not 1 <= v <= limits.MAX_STEPS for v in values) or len(values) > 32:
        raise argparse.ArgumentTypeError(f"--steps-grid needs 1 to 32 step counts in [1, {limits.MAX_STEPS}], got {limits.shown(text)}")
    return values


def register(subparsers) -> None:
    """Add the `tune` command."""
    parser = subparsers.add_parser(
        "tune",
        help="search sampler steps x allocation for the best PSNR to dense at a MAC budget",
        description="Budget tuner: every step count of a grid meets the budget with fewer dense steps or with a "
        "pruned plan (paper or measured allocation); each is scored by recorded OBS error and PSNR to dense on a "
        "few seeded images; prints the Pareto front and the chosen point.",
    )
    add_plan_arguments(parser, sparsity_group=False)
    add_prune_arguments(parser)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--budget", type=float_in("--budget", 0.0, 1.0), default=None, help="fraction of the dense MACs at --steps, in (0, 1]")
    target.add_argument("--speedup", type=float_in("--speedup", 1.0, 1000.0), default=None, help="ideal speed-up over dense at --steps (budget = 1/speedup)")
    parser.add_argument("--steps-grid", type=_steps_grid, default=None, help="step counts to try (default 10,15,20,25,30,40,50 up to --steps)")
    parser.add_argument("--images", type=int_in("--images", 1, 256), default=4, help="validation images (default 4)")
    parser.add_argument("--cfg", type=float_in("--cfg", 0.0, 30.0), default=1.5, help="guidance scale (default 1.5)")
    parser.add_argument("--time", action="store_true", help="add the measured sampling seconds of each point to the table")
    parser.add_argument("--out", default=None, metavar="FILE", type=text_of("--out", limits.MAX_PATH_LENGTH), help="write the result as JSON")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.set_defaults(func=run)


def format_tune(result, show_time: bool = False) -> str:
    """The candidates as a table: front points marked *, the chosen one ->."""
    head = f"{'':2} {'steps':>5} {'allocation':<10} {'sparsity':>8} {'MACs':>7} {'rec. error':>11} {'PSNR dB':>8}"
    lines = [f"budget {result.budget:.3f} of dense MACs at {result.reference_steps} steps; {result.images} validation images", head + ("  seconds" if show_time else "")]
    front = set(result.front)
    for index, p in enumerate(result.points):
        mark = "->" if index == result.chosen else ("* " if index in front else "  ")
        line = f"{mark} {p.steps:>5} {p.allocation:<10} {p.sparsity:>8.3f} {p.macs_fraction:>7.3f} {p.recorded_error:>11.4g} {p.psnr:>8.2f}"
        lines.append(line + (f" {p.seconds:>8.2f}" if show_time else ""))
    lines.append("* on the Pareto front (no point has fewer MACs and a higher PSNR); -> chosen (best PSNR within the budget)")
    if result.chosen is None:
        lines.append("no candidate fits the budget: raise it or add smaller step counts")
    lines.append(f"tuned in {result.seconds:.2f} s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Load the model, tune, print the table (or JSON) and write --out."""
    from mosaic_core.atomic import write_json
    from mosaic_core.conquer.tune import check_budget, tune
    from mosaic_core.models.loading import load_model
    from mosaic_core.models.registry import resolve_model

    spec = resolve_model(args.model)
    budget = check_budget(args.budget if args.budget is not None else 1.0 / args.speedup)  # before any loading
    steps = args.steps or 50
    grid = args.steps_grid or [n for n in (10, 15, 20, 25, 30, 40, 50) if n <= steps]
    config = prune_config_from_args(args, spec)
    loaded = load_model(spec, device=args.device, dtype=args.dtype)
    result = tune(
        loaded, budget, config, reference_steps=steps, steps_grid=grid, M=args.M, lam=args.lam, scheduler=args.scheduler or sampler_of(args.model),
        cx=args.cx, images=args.images, seed=args.seed, guidance_scale=args.cfg,
    )
    data = result.to_dict()
    if args.out:
        write_json(args.out, data)
    print(json.dumps(data) if args.json else format_tune(result, args.time))
    return 0
