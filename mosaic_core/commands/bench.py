"""`python -m mosaic_core bench`: MosaicDiff vs. baselines and ablations -> bench.json, bench.md, <method>.npz.

    python -m mosaic_core bench --sparsity 0.3 --out out/bench
    python -m mosaic_core bench --methods mosaic,cache,mosaic+cache --n 50 --time-n 8 --threads 2 --out out/b
    python -m mosaic_core bench --random-weights --model digits-dit --profile-stages --out out/profile
    python -m mosaic_core bench --random-weights --model facebook/DiT-XL-2-256 --batch 2 --out out/xl   # no weights needed

A benchmark times one device: under `accelerate launch` rank 0 runs it and the others exit.
`--out` is new, empty, or a folder an earlier bench wrote (it holds that bench's bench.json);
anything else is refused before the model loads, so a user's own bench.md is never overwritten.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mosaic_core import limits
from mosaic_core.cli import float_in, int_in, text_of
from mosaic_core.divide.stages import DEFAULT_M
from mosaic_core.models.registry import DEFAULT_MODEL
from mosaic_core.models.samplers import model_default_sampler


def register(subparsers) -> None:
    """Add the `bench` command."""
    parser = subparsers.add_parser(
        "bench",
        help="benchmark mosaic against dense, fewer-steps, uniform and the ablations",
        description="Prune every method, sample all on the same labels and seeds, score them on --n images, "
        "time them on --time-n images (interleaved repeats; min on CPU, median on GPU; implausible rows flagged); "
        "write DIR/bench.json, DIR/bench.md and DIR/<method>.npz.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--sparsity", type=float, default=0.3, help="overall sparsity S in [0, 0.9] (default 0.3)")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampler steps N (default: the model's own, as for plan: 50 for digits-dit, 28 for sd3-medium)")
    parser.add_argument("--n", type=int, default=200, help="images per method for quality (default 200, 20 per class); timing uses --time-n")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method, interleaved (default 5); with --random-weights, timed rounds per network")
    parser.add_argument("--time-n", type=int, default=8, help="images per timed run (default 8; quality uses --n)")
    parser.add_argument("--methods", default=None, metavar="A,B,...", help="run only these rows (dense, the reference, always runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads, pinned before timing (default: torch's current count, pinned and reported)")
    parser.add_argument("--cache", default=None, metavar="INTERVAL[,FIRST,LAST]", help="block-reuse setting of the cache rows (default: matched to mosaic's MACs)")
    parser.add_argument("--cache-dit", default=None, metavar="THRESHOLD[,FN,BN,WARMUP]",
                        help="DBCache setting of the cache-dit row; THRESHOLD auto is matched to mosaic's MACs (default: auto,1,0,8)")
    parser.add_argument("--unit-multiple", type=int_in("--unit-multiple", 1, 256), default=None, metavar="N",
                        help="kept MLP units of the mosaic-measured-gemm row are multiples of N (default 16); with "
                        "--random-weights, round each plan's kept units to multiples of N (default: the plan's own)")
    parser.add_argument("--drop-steps", type=int_in("--drop-steps", 1, 1000), default=None, metavar="K",
                        help="reference steps the opt-in mosaic-measured-drop row drops evenly (default 10 %% of --steps; ddim only)")
    parser.add_argument("--reduced-steps", type=int, default=None,
                        help="steps of the mosaic-K-steps row, below --steps; 0 to skip (default 20 when --steps is above 20, else skipped)")
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--scheduler", default=None, help="sampler (default: the model's own)")
    parser.add_argument("--M", type=float, default=DEFAULT_M)
    parser.add_argument("--lam", type=float_in("--lam", -1e6, 1e6), default=0.01)
    parser.add_argument("--calib-size", type=int, default=256)
    parser.add_argument("--calib-source", default=None, choices=("data", "samples"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    parser.add_argument("--dtype", default=None, help="fp32 | fp16 | bf16 (default: fp32 on CPU, fp16 on CUDA)")
    parser.add_argument("--out", required=True, metavar="DIR", type=text_of("--out", limits.MAX_PATH_LENGTH),
                        help="folder to write: new, empty, or one an earlier bench wrote (the files it writes again are replaced)")
    random = parser.add_argument_group(
        "timing at real size without weights",
        "--random-weights builds the model from its registry shapes with random weights (nothing is read) and times "
        "dense against staged plans whose networks keep random heads/units of the plan's sizes; no calibration, "
        "no quality columns. E.g. bench --random-weights --model facebook/DiT-XL-2-256 --batch 2 --out out/xl",
    )
    random.add_argument("--random-weights", action="store_true", help="time a random-weights model of the real shapes")
    random.add_argument("--sparsities", default="0.3,0.5", metavar="S1,S2,...", help="plans to time (default 0.3,0.5)")
    random.add_argument("--batch", type=int, default=2, help="rows per model call (default 2 = one image with guidance)")
    random.add_argument("--calls", type=int, default=2, help="timed calls per network per round (default 2)")
    random.add_argument("--compile", action="store_true", help="torch.compile every network (the warm-up call compiles)")
    random.add_argument("--profile-stages", action="store_true", help="also time attention, MLP and the unprunable rest of every network (seconds per call)")
    parser.set_defaults(func=run)


BENCH_FILES = ("bench.json", "bench.md", "profile.json")  # besides <method>.npz
BENCH_OUT_ALLOWED = "a new or empty folder, or one an earlier bench wrote (it holds bench.json)"
_MAX_REPORT_BYTES = 64 << 20  # a bench.json is a few kB; a larger file is not one


def is_bench_report(path: Path) -> bool:
    """Whether `path` is a bench.json that `bench` wrote: a JSON object with its model and its rows (or plans)."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MAX_REPORT_BYTES:
            return False
        report = json.loads(path.read_bytes())
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        return False
    return isinstance(report, dict) and "model" in report and ("methods" in report or report.get("mode") == "random-weights")


def check_bench_folder(out: str) -> Path:
    """The --out folder bench may write (`atomic.check_output_folder`), or ValueError before any work.

    A folder holding an earlier bench's bench.json is bench's own: its bench.json, bench.md,
    profile.json, <method>.npz and temporary leftovers are replaced or kept; any other entry, or
    any entry at all without that bench.json, is the user's and the folder is refused.
    """
    from mosaic_core.atomic import check_output_folder, is_temporary_name

    earlier = is_bench_report(Path(out).expanduser() / "bench.json")

    def owns(entry: Path) -> bool:
        mine = entry.name in BENCH_FILES or entry.suffix == ".npz" or is_temporary_name(entry.name)
        return earlier and mine and entry.is_file() and not entry.is_symlink()

    return check_output_folder(out, owns, "--out", allowed=BENCH_OUT_ALLOWED)


def parse_sparsities(text: str) -> tuple[float, ...]:
    """'0.3,0.5' -> (0.3, 0.5); ValueError naming the text when a part is not a number."""
    try:
        return tuple(float(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--sparsities must be comma-separated numbers in [0, 0.9], e.g. 0.3,0.5; got '{text}'") from None


def pin_threads(threads: int | None) -> int:
    """torch.set_num_threads(threads or the current count): pinned explicitly, and returned for the report."""
    import torch

    count = torch.get_num_threads() if threads is None else int(threads)
    if not 1 <= count <= 1024:
        raise ValueError(f"--threads must be in [1, 1024], got {threads}")
    torch.set_num_threads(count)
    return count


def command_line() -> str:
    """The command as typed (for bench.md and the README table)."""
    import shlex
    import sys

    return "python -m mosaic_core " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def run_random(args: argparse.Namespace, out: Path) -> int:
    """`bench --random-weights`: time dense against staged plans on random weights of the real shapes, written to `out`."""
    from tqdm import tqdm

    from mosaic_core.atomic import write_bytes, write_json
    from mosaic_core.conquer.bench import RandomBenchConfig, random_bench_steps, random_markdown_table
    from mosaic_core.distributed import current_processes
    from mosaic_core.jobs import run_to_end
    from mosaic_core.models.loading import resolve_device, resolve_dtype
    from mosaic_core.models.registry import resolve_model

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    spec = resolve_model(args.model)
    config = RandomBenchConfig(
        sparsities=parse_sparsities(args.sparsities), num_inference_steps=steps_of(args, spec), batch=args.batch,
        calls=args.calls, repeats=args.repeats, seed=args.seed, M=args.M, lam=args.lam, scheduler=args.scheduler or model_default_sampler(spec),
        compile=args.compile, unit_multiple=args.unit_multiple or 1,
    )
    if not current_processes(device).is_main:
        return 0  # timing is one device's business: under `accelerate launch` only rank 0 benchmarks
    pin_threads(args.threads)
    with tqdm(total=1000, desc="bench (random weights)", bar_format="{l_bar}{bar}| {elapsed} {postfix}") as bar:

        def show(event) -> None:
            bar.n = int(1000 * event.fraction)
            bar.set_postfix_str(event.method)
            bar.refresh()

        result = run_to_end(random_bench_steps(spec, config, device, dtype), show)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench.json", result.to_dict())
    table = random_markdown_table(result)
    if args.profile_stages:
        from mosaic_core.conquer.bench import profile_random_networks, profile_markdown

        profiles = profile_random_networks(spec, config, device, dtype)
        write_json(out / "profile.json", [p.to_dict() for p in profiles])
        table += "\n" + profile_markdown(profiles)
    write_bytes(out / "bench.md", table.encode())
    print(table)
    print(f"wrote {out}/bench.json and bench.md" + (" and profile.json" if args.profile_stages else ""))
    return 0


def steps_of(args: argparse.Namespace, spec) -> int:
    """--steps, or the model's own default count (`ModelSpec.default_steps`, as `plan` takes it)."""
    return spec.default_steps if args.steps is None else args.steps


def run(args: argparse.Namespace) -> int:
    """Run the benchmark with a progress bar and write its files."""
    out = check_bench_folder(args.out)  # before any work: never bench for nothing, never overwrite a user's files
    if args.random_weights:
        return run_random(args, out)
    if args.compile:
        raise ValueError("--compile is supported with --random-weights (timing only) for now; drop it or add --random-weights")
    if args.profile_stages:
        raise ValueError("--profile-stages works with --random-weights (shapes, not weights, set the time); add --random-weights")
    from mosaic_core.distributed import current_processes

    if not current_processes(args.device).is_main:
        return 0  # a benchmark times one device: under `accelerate launch` only rank 0 runs it
    from tqdm import tqdm

    from mosaic_core.atomic import write_bytes, write_json
    from mosaic_core.conquer.bench import BenchConfig, bench_steps, markdown_table
    from mosaic_core.prune.calibration import CalibrationConfig, default_calibration_source
    from mosaic_core.conquer.images import save_samples
    from mosaic_core.models.loading import load_model
    from mosaic_core.divide.plan import build_plan
    from mosaic_core.conquer.sampling import run_to_end

    from mosaic_core.models.registry import resolve_model

    from mosaic_core.conquer.bench import parse_methods
    from mosaic_core.conquer.caching import parse_cache
    from mosaic_core.conquer.cache_dit_row import parse_dbcache

    methods, cache, cache_dit = parse_methods(args.methods), parse_cache(args.cache), parse_dbcache(args.cache_dit)  # validate first
    spec = resolve_model(args.model)
    steps = steps_of(args, spec)
    scheduler = args.scheduler or model_default_sampler(spec)
    build_plan(spec, steps, args.M, args.lam, sparsity=args.sparsity, scheduler=scheduler)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    source = args.calib_source or default_calibration_source(loaded.spec)
    config = BenchConfig(
        sparsity=args.sparsity,
        num_inference_steps=steps,
        num_images=args.n,
        repeats=args.repeats,
        reduced_steps=(20 if steps > 20 else None) if args.reduced_steps is None else (args.reduced_steps or None),
        guidance_scale=args.cfg,
        scheduler=scheduler,
        seed=args.seed,
        M=args.M,
        lam=args.lam,
        calibration=CalibrationConfig(size=args.calib_size, source=source, seed=args.seed),
        methods=methods,
        time_images=args.time_n,
        threads=pin_threads(args.threads),
        cache=cache,
        cache_dit=cache_dit,
        unit_multiple=args.unit_multiple or 16,
        drop_steps=args.drop_steps,
    )
    with tqdm(total=1000, desc="bench", bar_format="{l_bar}{bar}| {elapsed} {postfix}") as bar:

        def show(event) -> None:
            bar.n = int(1000 * (0.15 * event.fraction if event.phase in ("prune", "match") else 0.15 + 0.85 * event.fraction))
            bar.set_postfix_str(f"{event.phase} {event.method}")
            bar.refresh()

        result = run_to_end(bench_steps(loaded, config), show)
    result.command = command_line()
    out.mkdir(parents=True, exist_ok=True)
    for method in result.results:
        save_samples(out / f"{method.name}.npz", method.images, method.labels)
    write_json(out / "bench.json", result.to_dict(loaded))
    table = markdown_table(result, loaded)
    write_bytes(out / "bench.md", table.encode())
    print(table)
    print(f"wrote {out}/bench.json, bench.md and {len(result.results)} sample archives")
    return 0
