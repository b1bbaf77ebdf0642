"""`python -m mosaic_core prune`: SNR-aware calibration + structured OBS per stage -> checkpoint folder.

    python -m mosaic_core prune --sparsity 0.3 --out out/mosaic-0.3
    python -m mosaic_core sample --pruned out/mosaic-0.3 --n 20 --out staged.npz
"""

from __future__ import annotations

import argparse
import dataclasses

from mosaic_core import limits
from mosaic_core.cli import float_in, int_in, text_of
from mosaic_core.prune.calibration import CALIBRATION_MODES, CALIBRATION_SOURCES
from mosaic_core.commands.plan import add_drop_steps_argument, add_plan_arguments, add_stages_argument, format_plan, plan_from_args
from mosaic_core.prune.stage_pruning import ALLOCATION_ALIASES, ALLOCATIONS, DEFAULT_DAMPING, SCORERS


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    """Calibration and scorer arguments (shared with `bench`)."""
    parser.add_argument("--calib", default="snr", choices=CALIBRATION_MODES, help="calibration noise levels (default snr)")
    parser.add_argument("--calib-size", type=int_in("--calib-size", 1, limits.MAX_CALIBRATION_SIZE), default=256, help="clean calibration images per stage (default 256)")
    parser.add_argument(
        "--calib-source", default=None, metavar="|".join(CALIBRATION_SOURCES),
        help="clean inputs: the model's dataset, the dense model's own samples, or a local image folder "
        "encoded by the VAE (text-to-image models) (default: data for digits-dit, else samples)",
    )
    parser.add_argument(
        "--calib-batch-size", type=int, default=64,
        help="clean calibration images per model call (default 64); under `accelerate launch` batch k runs on process k mod N",
    )
    parser.add_argument("--scorer", default="obs", choices=SCORERS, help="structured OBS or magnitude (ablation)")
    parser.add_argument(
        "--allocation", default=None, choices=(*ALLOCATIONS, *ALLOCATION_ALIASES),
        help="measured (default with --scorer obs): spread the plan's MACs over stages x blocks x heads/units by the "
        "recorded OBS errors, weighted by each stage's steps; per-stage (alias paper): the plan's counts in every "
        "block (default with --scorer magnitude); per-block: spread each stage's MACs over its blocks by OBS error",
    )
    parser.add_argument("--damping", type=float_in("--damping", 0.0, 1.0), default=DEFAULT_DAMPING, help="OBS damping, fraction of mean diag H")
    parser.add_argument("--seed", type=int_in("--seed", 0, limits.MAX_SEED), default=0, help="calibration seed")
    parser.add_argument(
        "--hessian-budget", type=float, default=None, metavar="MIB",
        help="gather float64 Hessians a few blocks at a time, at most MIB MiB at once (default: every layer at once; "
        "`plan` shows both figures)",
    )
    parser.add_argument(
        "--unit-multiple", type=int_in("--unit-multiple", 1, 256), default=None, metavar="N",
        help="measured allocation: keep MLP units in multiples of N (widths the GEMM kernels tile without a "
        "ragged edge; default 64 on a GPU, where other widths ran 3-8x slower per MAC, and 1, any count, on a CPU)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    parser.add_argument("--dtype", default=None, help="fp32 | fp16 | bf16 (or float32 | float16 | bfloat16; default fp32 on CPU)")


def prune_config_from_args(args: argparse.Namespace, spec, device=None):
    """The `PruneConfig` described by the prune arguments; without --unit-multiple, the default
    for `device` (`default_unit_multiple`: 64 for the measured allocation on a GPU, else 1)."""
    from mosaic_core.prune.calibration import CalibrationConfig, check_calibration_source, default_calibration_source
    from mosaic_core.prune.stage_pruning import PruneConfig, default_unit_multiple

    source = args.calib_source or default_calibration_source(spec)
    calibration = CalibrationConfig(
        mode=args.calib, size=args.calib_size, source=source, seed=args.seed,
        batch_size=getattr(args, "calib_batch_size", 64),
    )
    check_calibration_source(spec, source)  # from the spec: callers build this before the model loads
    budget = getattr(args, "hessian_budget", None)
    if budget is not None and not budget > 0:
        raise ValueError(f"--hessian-budget must be a positive number of MiB, got {budget}")
    allocation = getattr(args, "allocation", None) or ("measured" if args.scorer == "obs" else "per-stage")
    refit = getattr(args, "refit", False)  # only `prune` has --refit; its default None: on for three OBS stages
    if refit is None:
        refit = args.scorer == "obs" and args.stages == 3
    allocation = ALLOCATION_ALIASES.get(allocation, allocation)
    unit_multiple = getattr(args, "unit_multiple", None)
    if unit_multiple is None:
        shape = getattr(spec, "shape", None)
        unit_multiple = 1 if device is None else default_unit_multiple(device, allocation, getattr(shape, "mlp_hidden", None))
    return PruneConfig(
        calibration=calibration, scorer=args.scorer, damping=args.damping, allocation=allocation,
        hessian_budget=None if budget is None else int(budget * 2**20), unit_multiple=unit_multiple, refit=refit,
    )


def register(subparsers) -> None:
    """Add the `prune` command."""
    parser = subparsers.add_parser(
        "prune",
        help="prune one sub-network per stage and write a checkpoint folder",
        description="MosaicDiff Prune: per-stage calibration at the stage's noise levels, Hessians, "
        "greedy structured OBS on attention heads and MLP units, physical slicing.",
    )
    add_plan_arguments(parser)
    add_stages_argument(parser)
    add_drop_steps_argument(parser)
    add_prune_arguments(parser)
    parser.add_argument(
        "--out", required=True, metavar="DIR", type=text_of("--out", limits.MAX_PATH_LENGTH),
        help="checkpoint folder to write: new, empty, or an earlier checkpoint (replaced atomically)",
    )
    parser.add_argument(
        "--refit", action=argparse.BooleanOptionalAction, default=None,
        help="after OBS, fit each stage network's pruned layers (weights and bias) again on the inputs the pruned "
        "network itself produces, towards the dense layer's output (default: on for three stages with --scorer obs; "
        "+0.7 / +1.3 dB PSNR to dense at S = 0.3 / 0.5 on digits-dit, one more calibration pass per network; "
        "written as a v4 checkpoint)",
    )
    parser.add_argument(
        "--cache", default=None, metavar="DIR", type=text_of("--cache", limits.MAX_PATH_LENGTH),
        help="keep the Hessians and removal orders under DIR (the studio's is cache/): a later prune of the same "
        "model and calibration at another sparsity gathers nothing (one process; three stages)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Plan, prune with a progress bar, save, and print a summary."""
    from tqdm import tqdm

    from mosaic_core.prune.checkpoint import check_checkpoint_folder, save_pruned
    from mosaic_core.models.loading import load_model
    from mosaic_core.models.registry import resolve_model
    from mosaic_core.prune.stage_pruning import prune_steps
    from mosaic_core.conquer.sampling import run_to_end
    from mosaic_core.conquer.staged_denoiser import memory_ledger
    from mosaic_core.distributed import current_processes, process_device

    check_checkpoint_folder(args.out, "--out")  # before any work: never prune for nothing
    if args.stages != 3:
        if args.cache:
            raise ValueError(f"--cache keeps three-stage analyses; --stages {args.stages} prunes without it")
        return run_k_stages(args)
    plan = plan_from_args(args)
    processes = current_processes(args.device)  # one process unless started by `accelerate launch`
    analyses = None
    if args.cache:
        if processes.distributed:
            raise ValueError("--cache works in one process; launch without accelerate, or drop --cache")
        from mosaic_core.prune.service import _JobAnalyses, analysis_store

        analyses = _JobAnalyses(analysis_store(args.cache))
    prune_config_from_args(args, resolve_model(plan.model))  # its refusals (a missing calibration folder) before the load
    loaded = load_model(plan.model, device=process_device(args.device, processes), dtype=args.dtype)
    config = prune_config_from_args(args, loaded.spec, loaded.device)
    if processes.is_main:
        print(format_plan(plan))
    with tqdm(
        total=1000, desc="pruning", unit="‰", bar_format="{l_bar}{bar}| {elapsed} {postfix}", disable=not processes.is_main
    ) as bar:

        def show(event) -> None:
            bar.n = int(1000 * event.fraction)
            bar.set_postfix_str(" ".join(x for x in (event.phase, event.stage, event.layer or "") if x))
            bar.refresh()

        result = run_to_end(prune_steps(loaded, plan, config, processes=processes, analyses=analyses), show)
    if not processes.is_main:  # its share of the Hessians is summed; rank 0 solves and writes
        return 0
    extra = {"processes": result.processes, "calibration_images_per_process": result.calibration_images}
    save_pruned(result, loaded, args.out, extra=extra)
    ledger = memory_ledger(loaded.transformer, result.staged)
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    print(f"allocation: {config.allocation}" + ("; refit on the pruned networks' own inputs" if config.refit else ""))
    if result.measured is not None:
        print(format_measured(result.measured))
    print(f"measured c_x = {result.cx:.4f}; {seconds}")
    if result.hessian_peak_bytes:
        budget = "every layer at once" if config.hessian_budget is None else f"budget {config.hessian_budget / 2**20:.1f} MiB"
        print(f"Hessians held at once: peak {result.hessian_peak_bytes / 2**20:.1f} MiB ({budget})")
    print(
        f"parameters: dense {ledger.dense_bytes / 2**20:.1f} MiB, staged (shared) {ledger.staged_bytes / 2**20:.1f} MiB, "
        f"three copies {ledger.naive_bytes / 2**20:.1f} MiB"
    )
    print(f"wrote {args.out}")
    return 0


def run_k_stages(args: argparse.Namespace) -> int:
    """`prune --stages K`: K stage networks (paper allocation), written as a v3 checkpoint."""
    import time

    from tqdm import tqdm

    from mosaic_core.commands.plan import k_plan_from_args
    from mosaic_core.conquer.sampling import run_to_end
    from mosaic_core.conquer.staged_denoiser import param_count
    from mosaic_core.distributed import current_processes
    from mosaic_core.divide.k_plan import format_k_plan
    from mosaic_core.models.loading import load_model
    from mosaic_core.prune.checkpoint import save_k_stages
    from mosaic_core.prune.multistage_pruning import prune_k_stages

    if args.refit:
        raise ValueError(f"--refit is done for three stages; --stages {args.stages} prunes without it (drop --refit)")
    if args.allocation not in (None, "per-stage", "paper"):
        raise ValueError(f"--stages {args.stages} prunes each stage's counts in every block (--allocation paper); got --allocation {args.allocation}")
    if current_processes(args.device).distributed:
        raise ValueError(f"--stages {args.stages} runs in one process; launch it without accelerate (3 stages shard over processes)")
    from mosaic_core.models.registry import resolve_model

    plan = k_plan_from_args(args)  # before loading: a bad option costs nothing
    if args.unit_multiple not in (None, 1):
        raise ValueError(f"--unit-multiple rounds the measured allocation; --stages {args.stages} prunes with the paper's")
    config = dataclasses.replace(prune_config_from_args(args, resolve_model(plan.model)), allocation="per-stage")
    loaded = load_model(plan.model, device=args.device, dtype=args.dtype)
    print(format_k_plan(plan))
    record: list = []
    analyses: dict = {}
    start = time.perf_counter()
    with tqdm(total=1000, desc="pruning", unit="‰", bar_format="{l_bar}{bar}| {elapsed} {postfix}") as bar:

        def show(event) -> None:
            bar.n = int(1000 * event.fraction)
            bar.set_postfix_str(" ".join(x for x in (event.phase, event.stage, event.layer or "") if x))
            bar.refresh()

        steps = prune_k_stages(loaded, plan.partition, plan.allocation, config, analyses=analyses, record=record)
        denoiser = run_to_end(steps, show)
    seconds = {"total": time.perf_counter() - start}
    cx = next((float(a.cx) for a in analyses.values()), plan.cx)  # measured on the calibration set (nothing pruned: the plan's)
    save_k_stages(denoiser, record, plan, config, cx, loaded, args.out, seconds)
    distinct = {id(n) for n in denoiser.networks()} - {id(loaded.transformer)}
    print(f"{len(distinct)} pruned networks for {plan.num_stages} stages; parameters {param_count(denoiser) / 1e6:.2f} M "
          f"(dense {param_count(loaded.transformer) / 1e6:.2f} M); {seconds['total']:.1f} s")
    print(f"wrote {args.out}")
    return 0


def format_measured(measured) -> str:
    """Per-stage sparsity and step-weighted recorded OBS error under the paper's rule and the measured one."""
    from mosaic_core.divide.stages import STAGE_NAMES

    lines = ["stage    paper sparsity  measured sparsity   paper error  measured error"]
    for index, name in enumerate(STAGE_NAMES):
        paper, chosen = measured.paper_sparsity[index], measured.sparsity[index]
        mark = "  <- measured prunes more" if chosen > paper + 0.005 else "  <- measured prunes less" if chosen < paper - 0.005 else ""
        lines.append(
            f"{name:<7} {paper:>15.3f} {chosen:>18.3f} {measured.paper_stage_errors[index]:>13.4g} {measured.stage_errors[index]:>15.4g}{mark}"
        )
    change = (measured.error / measured.paper_error - 1) * 100 if measured.paper_error > 0 else 0.0
    lines.append(
        f"summed recorded error (step-weighted): paper {measured.paper_error:.4g}, measured {measured.error:.4g} ({change:+.1f} %); "
        f"MACs removed {measured.macs_removed:.4g} of budget {measured.budget:.4g} (per token)"
    )
    return "\n".join(lines)
