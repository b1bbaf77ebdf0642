"""`python -m mosaic_core bench`: MosaicDiff vs. baselines and ablations -> bench.json, bench.md, <method>.npz."""

from __future__ import annotations

import argparse
from pathlib import Path

from mosaic_core.divide.stages import DEFAULT_M
from mosaic_core.models.registry import DEFAULT_MODEL


def register(subparsers) -> None:
    """Add the `bench` command."""
    parser = subparsers.add_parser(
        "bench",
        help="benchmark mosaic against dense, fewer-steps, uniform and the ablations",
        description="Prune every method, sample all on the same labels and seeds, time them "
        "(median of interleaved repeats) and score them; write DIR/bench.json, DIR/bench.md "
        "and DIR/<method>.npz.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--sparsity", type=float, default=0.3, help="overall sparsity S in [0, 0.9] (default 0.3)")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps N (default 50)")
    parser.add_argument("--n", type=int, default=200, help="images per method (default 200, 20 per class)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method, median reported (default 3)")
    parser.add_argument("--reduced-steps", type=int, default=20, help="steps of the stacked mosaic row; 0 to skip (default 20)")
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--M", type=float, default=DEFAULT_M)
    parser.add_argument("--lam", type=float, default=0.01)
    parser.add_argument("--calib-size", type=int, default=256)
    parser.add_argument("--calib-source", default=None, choices=("data", "samples"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark with a progress bar and write its files."""
    from tqdm import tqdm

    from mosaic_core.atomic import write_bytes, write_json
    from mosaic_core.conquer.bench import BenchConfig, bench_steps, markdown_table
    from mosaic_core.prune.calibration import CalibrationConfig, default_calibration_source
    from mosaic_core.conquer.images import save_samples
    from mosaic_core.models.loading import load_model
    from mosaic_core.divide.plan import build_plan
    from mosaic_core.conquer.sampling import run_to_end

    from mosaic_core.models.registry import resolve_model

    build_plan(resolve_model(args.model), args.steps, args.M, args.lam, sparsity=args.sparsity)  # validate first
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    source = args.calib_source or default_calibration_source(loaded.spec)
    config = BenchConfig(
        sparsity=args.sparsity,
        num_inference_steps=args.steps,
        num_images=args.n,
        repeats=args.repeats,
        reduced_steps=args.reduced_steps or None,
        guidance_scale=args.cfg,
        scheduler=args.scheduler,
        seed=args.seed,
        M=args.M,
        lam=args.lam,
        calibration=CalibrationConfig(size=args.calib_size, source=source, seed=args.seed),
    )
    with tqdm(total=1000, desc="bench", bar_format="{l_bar}{bar}| {elapsed} {postfix}") as bar:

        def show(event) -> None:
            bar.n = int(1000 * (0.15 * event.fraction if event.phase == "prune" else 0.15 + 0.85 * event.fraction))
            bar.set_postfix_str(f"{event.phase} {event.method}")
            bar.refresh()

        result = run_to_end(bench_steps(loaded, config), show)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for method in result.results:
        save_samples(out / f"{method.name}.npz", method.images, method.labels)
    write_json(out / "bench.json", result.to_dict(loaded))
    table = markdown_table(result, loaded)
    write_bytes(out / "bench.md", table.encode())
    print(table)
    print(f"wrote {out}/bench.json, bench.md and {len(result.results)} sample archives")
    return 0
