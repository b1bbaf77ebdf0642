"""`python -m mosaic_core tune`: the best sampler steps × allocation at a MAC budget.

    python -m mosaic_core tune --budget 0.5 --out tune.json
    python -m mosaic_core tune --speedup 2 --steps-grid 10,20,25,30,50 --images 4 --json
    python -m mosaic_core tune --budget 0.3 --methods dense,measured,measured+cache --cfg-grid 1.0,1.5,2.0
    python -m mosaic_core tune --budget 0.5,0.3,0.7            # later budgets predicted, the best few sampled
    python -m mosaic_core tune --budget 0.5,0.3 --check 0      # sample every candidate, predict none
    python -m mosaic_core tune --budget 0.5 --cache cache      # Hessians and sampled points kept for the next run
"""

from __future__ import annotations

import argparse
import json

from mosaic_core import limits
from mosaic_core.cli import float_in, int_in, text_of
from mosaic_core.commands.plan import add_plan_arguments, parse_edges, sampler_of
from mosaic_core.commands.prune import add_prune_arguments, prune_config_from_args


def _steps_grid(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps-grid must be whole numbers separated by commas, got {limits.shown(text)}") from None
    if not values or any(not 1 <= v <= limits.MAX_STEPS for v in values) or len(values) > 32:
        raise argparse.ArgumentTypeError(f"--steps-grid needs 1 to 32 step counts in [1, {limits.MAX_STEPS}], got {limits.shown(text)}")
    return values


def _cfg_grid(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or len(values) > 8 or any(not (0.0 <= v <= 30.0) for v in values):
        raise argparse.ArgumentTypeError(f"--cfg-grid needs 1 to 8 guidance scales in [0, 30] separated by commas, got {limits.shown(text)}")
    return values


def _several(parse_one):
    """An argparse `type=` for 1 to 16 values separated by commas, each parsed by `parse_one`."""

    def parse(text: str) -> tuple[float, ...]:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if not 1 <= len(parts) <= 16:
            raise argparse.ArgumentTypeError(f"give 1 to 16 values separated by commas, got {limits.shown(text)}")
        return tuple(parse_one(part) for part in parts)

    parse.__name__ = "numbers"
    return parse


def _methods(text: str) -> tuple[str, ...]:
    from mosaic_core.conquer.tune import check_methods

    try:
        return check_methods(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def register(subparsers) -> None:
    """Add the `tune` command."""
    parser = subparsers.add_parser(
        "tune",
        help="search sampler steps x pruning x caching (x CFG) for the best PSNR to dense at a MAC budget",
        description="Budget tuner: every step count of a grid meets the budget with fewer dense steps, block reuse, "
        "a pruned plan (paper or measured allocation) or pruning and reuse stacked; each is scored by recorded OBS "
        "error and PSNR to dense on a few seeded images, the best again at each --cfg-grid scale; prints the Pareto "
        "front and the chosen point.",
    )
    add_plan_arguments(parser, sparsity_group=False)
    add_prune_arguments(parser)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--budget", type=_several(float_in("--budget", 0.0, 1.0)), default=None, metavar="B[,B2,...]",
                        help="fraction of the dense MACs at --steps, in (0, 1]; several are tuned in turn, the later ones predicted")
    target.add_argument("--speedup", type=_several(float_in("--speedup", 1.0, 1000.0)), default=None, metavar="K[,K2,...]",
                        help="ideal speed-up over dense at --steps (budget = 1/speedup); several as for --budget")
    parser.add_argument("--steps-grid", type=_steps_grid, default=None,
                        help="step counts to try (default 20 %%, 30 %%, ..., 100 %% of --steps, e.g. 10,15,...,50 of 50)")
    parser.add_argument("--images", type=int_in("--images", 1, 256), default=4, help="validation images (default 4)")
    parser.add_argument("--cfg", type=float_in("--cfg", 0.0, 30.0), default=None, help="guidance scale of the dense reference (default: the model's)")
    parser.add_argument("--cfg-grid", type=_cfg_grid, default=(), metavar="G1,G2,...",
                        help="also sample the best --cfg-top candidates at these guidance scales (default: none)")
    parser.add_argument("--cfg-top", type=int_in("--cfg-top", 1, 16), default=2, help="candidates re-tried on --cfg-grid (default 2)")
    parser.add_argument("--methods", type=_methods, default=None, metavar="A,B,...",
                        help="ways to meet the budget: dense (fewer steps), cache, paper, measured, measured+cache, measured+cache-dit, "
                        "drop (fewer steps as a subset of the reference steps), measured+drop (pruned for that subset; both ddim only) "
                        "(default all but measured+cache-dit: 6 sampling runs per candidate, and the least reliable choice)")
    parser.add_argument("--check", type=int_in("--check", 0, 64), default=None, metavar="K",
                        help="from the second budget of a run on, pruned candidates are predicted from the points sampled "
                        "before and at most K of them sampled (default 4); 0 samples every candidate")
    parser.add_argument("--check-seconds", type=float_in("--check-seconds", 0.001, 3600.0), default=None, metavar="S",
                        help="sample a second predicted candidate only if it should end within S seconds of the budget's start "
                        "(default: no bound, as in the studio; docs/method.md §4.5 has what 3 s cost)")
    parser.add_argument("--cache", default=None, metavar="DIR", type=text_of("--cache", limits.MAX_PATH_LENGTH),
                        help="keep Hessians and sampled points under DIR (the studio's is cache/): a later tune of the same "
                        "model and settings gathers no Hessians and predicts from its first budget")
    parser.add_argument("--time", action="store_true", help="add the measured sampling seconds of each point to the table")
    parser.add_argument("--out", default=None, metavar="FILE", type=text_of("--out", limits.MAX_PATH_LENGTH),
                        help="write the result as JSON to FILE (not a folder; checked before tuning starts)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.set_defaults(func=run)


def format_tune(result, show_time: bool = False) -> str:
    """The candidates as a table: front points marked *, the chosen one ->."""
    head = f"{'':2} {'steps':>5} {'method':<18} {'sparsity':>8} {'reuse':>7} {'cfg':>5} {'MACs':>7} {'rec. error':>11} {'PSNR dB':>8}"
    lines = [
        f"budget {result.budget:.3f} of dense MACs at {result.reference_steps} steps, cfg {result.guidance_scale:g}; "
        f"{result.images} validation images" + ("" if result.edges is None else f"; middle stage {result.edges[0]}–{result.edges[1]} set by hand"),
        head + ("  seconds" if show_time else ""),
    ]
    front = set(result.front)
    for index, p in enumerate(result.points):
        mark = "->" if index == result.chosen else ("* " if index in front else ("~ " if p.predicted else "  "))
        reuse = "-" if p.cache is None else "{}:{}/{}".format(*p.cache)
        if p.cache_dit is not None:
            reuse = f"δ{p.cache_dit[0]:.3g}"
        line = (f"{mark} {p.steps_label:>5} {p.allocation:<18} {p.sparsity:>8.3f} {reuse:>7} {p.guidance_scale:>5g} {p.macs_fraction:>7.3f} "
                f"{p.recorded_error:>11.4g} {p.psnr:>8.2f}")
        lines.append(line + (f" {p.seconds:>8.2f}" if show_time else ""))
    lines.append("* on the Pareto front (no point has fewer MACs and a higher PSNR); -> chosen (best PSNR within the budget); "
                 "reuse = full step every I, first/last blocks always run; δ = cache-dit's DBCache threshold")
    if any(p.predicted for p in result.points):
        models = "; ".join(_model_text(m, q) for m, q in _models_once(result.quality_models or {}))
        lines.append(f"~ predicted from its recorded error, not sampled (never on the front nor chosen); {models}")
    if result.unchecked:
        lines.append(f"{result.unchecked} predicted candidates that could still win were left unsampled by --check-seconds")
    if result.chosen is None:
        lines.append("no candidate fits the budget: raise it or add smaller step counts")
    elif result.points[result.chosen].drop_steps:  # the chosen point's steps are a subset: say how to sample it
        p = result.points[result.chosen]
        n0 = p.steps + p.drop_steps
        sample = f"sample --steps {n0} --drop-steps {p.drop_steps} --cfg {p.guidance_scale:g}"
        lines.append(
            f"n/N steps: n of the N reference steps run, the rest dropped evenly (docs/method.md §4.6); replay the chosen point: "
            + (f"prune --steps {n0} --drop-steps {p.drop_steps} --sparsity {p.target_sparsity:.6g} --out DIR, then {sample} --pruned DIR"
               if p.allocation == "measured+drop" else sample)
        )
    lines.append(f"tuned in {result.seconds:.2f} s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Load the model, tune each budget in turn, print the tables (or JSON) and write --out.

    Several budgets share one set of analyses and every sampled point, so from the second on
    the pruned candidates are predicted and only the best few sampled (`--check`). One budget
    prints and writes one result object; several print one JSON object per line and write
    {"results": [...]}.
    """
    from mosaic_core.atomic import check_output_file, write_json
    from mosaic_core.conquer.tune import DEFAULT_METHODS, check_budget, tune
    from mosaic_core.divide.plan import build_plan
    from mosaic_core.models.loading import load_model
    from mosaic_core.models.registry import resolve_model

    out = check_output_file(args.out, "--out") if args.out else None  # before any work: never tune for nothing
    spec = resolve_model(args.model)
    budgets = [check_budget(b) for b in args.budget] if args.budget is not None else [check_budget(1.0 / k) for k in args.speedup]
    steps = spec.default_steps if args.steps is None else args.steps  # the model's own, as `plan` takes it
    grid = args.steps_grid  # None: default_steps_grid(steps)
    edges = None if args.edges is None else parse_edges(args.edges)  # every candidate's middle stage, by hand
    if edges is not None:
        build_plan(spec, steps, args.M, args.lam, scheduler=args.scheduler or sampler_of(args.model), edges=edges)  # range, before work
    prune_config_from_args(args, spec)  # its refusals (a missing calibration folder) before the load
    loaded = load_model(spec, device=args.device, dtype=args.dtype)
    config = prune_config_from_args(args, spec, loaded.device)
    analyses: dict = {}
    memo: dict = {}
    saved = None
    if args.cache:
        from mosaic_core.conquer.tune import load_memo_points, memo_path, save_memo_points
        from mosaic_core.prune.service import _JobAnalyses, analysis_store

        analyses = _JobAnalyses(analysis_store(args.cache))
        saved = memo_path(args.cache, spec.name, loaded.weights_hash)
        memo.update(load_memo_points(saved))
    results = []
    for index, budget in enumerate(budgets):
        result = tune(
            loaded, budget, config, reference_steps=steps, steps_grid=grid, M=args.M, lam=args.lam, scheduler=args.scheduler or sampler_of(args.model),
            cx=args.cx, images=args.images, seed=args.seed, guidance_scale=args.cfg, methods=args.methods or DEFAULT_METHODS,
            cfg_grid=args.cfg_grid, cfg_top=args.cfg_top, analyses=analyses, memo=memo, **({} if args.check is None else {"check": args.check}),
            check_seconds=args.check_seconds, edges=edges,
        )
        results.append(result.to_dict())
        if saved is not None:
            save_memo_points(memo, saved)
        print(json.dumps(results[-1]) if args.json else format_tune(result, args.time) + ("\n" if index < len(budgets) - 1 else ""), flush=True)
    if out is not None:
        write_json(out, results[0] if len(results) == 1 else {"results": results})
    return 0


def _models_once(models: dict) -> list[tuple[str, dict]]:
    """(methods, model) pairs, methods sharing one model (cache, measured+cache) named together."""
    joined: list[tuple[list[str], dict]] = []
    for method, model in models.items():
        same = next((names for names, other in joined if other == model), None)
        if same is None:
            joined.append(([method], model))
        else:
            same.append(method)
    return [(", ".join(names), model) for names, model in joined]


def _model_text(methods: str, q: dict) -> str:
    text = (f"{methods}: MSE = D + P + 2·({q.get('rho', 0.0):g})·√(D·P)"
            + (" + R" if "log_reuse" in q else "")
            + f", D = MSE_dense, P = 10^{q['log_kappa']:g}·E^{q['alpha']:g}")
    if "log_reuse" in q:
        text += (f", R = 10^{q['log_reuse']:g}·(c/L)^{q['share_exponent']:g}·(I−1)^{q['interval_exponent']:g}"
                 f"·(n/N₀)^{q['steps_exponent']:g} (c of L blocks cached, a full step every I)")
    return text + f" (residual {q['rmse']:.2f} dB, {q['count']} points)"
