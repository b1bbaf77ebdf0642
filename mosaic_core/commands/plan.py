"""`python -m mosaic_core plan`: show (or print as JSON) the Divide plan for a model.

    python -m mosaic_core plan --model digits-dit --sparsity 0.3
    python -m mosaic_core plan --model facebook/DiT-XL-2-256 --stage-sparsity 0.5,0.1,0.4 --json
    python -m mosaic_core plan --edges 150,600 --sparsity 0.3        # stage edges set by hand
"""

from __future__ import annotations

import argparse
import json

from mosaic_core import limits
from mosaic_core.cli import float_in, int_in, text_of
from mosaic_core.divide.plan import DEFAULT_LAM, DEFAULT_M, Plan
from mosaic_core.models.registry import DEFAULT_MODEL, resolve_model
from mosaic_core.requests import PlanRequest
from mosaic_core.models.samplers import DEFAULT_SCHEDULER, SCHEDULERS, model_default_sampler
from mosaic_core.divide.stages import STAGE_NAMES
from mosaic_core.units import format_bytes, format_count


def parse_stage_sparsity(text: str) -> tuple[float, float, float]:
    """'A,B,C' -> (A, B, C) as floats; ValueError naming the text when it is not 3 numbers.

    The range check ([0, 0.9], finite) is the engine's, in `build_plan`.
    """
    parts = [part.strip() for part in str(text).split(",")]
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != 3:
        raise ValueError(
            f"--stage-sparsity must be 3 comma-separated numbers EARLY,MIDDLE,LATE, each in [0, 0.9], got '{text}'"
        )
    return values  # type: ignore[return-value]


def parse_edges(text: str) -> tuple[int, int]:
    """'LO,HI' -> (LO, HI) as ints; ValueError naming the text when it is not 2 whole numbers.

    The range check (0 <= LO <= HI < T, the model's training timesteps) is the engine's, in `build_plan`.
    """
    parts = [part.strip() for part in str(text).split(",")]
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != 2:
        raise ValueError(
            f"--edges must be 2 comma-separated whole numbers LO,HI (the middle stage in training timesteps, "
            f"0 <= LO <= HI < the model's training timesteps), got '{text}'"
        )
    return values  # type: ignore[return-value]


def format_plan(plan: Plan) -> str:
    """A readable table of the plan: stages, τ ranges, steps, sparsity, kept structure, cost."""
    allocation = plan.allocation
    shape = plan.shape
    lines = [
        f"model {plan.model} | {plan.scheduler} {plan.num_inference_steps} steps"
        f"{f' ({plan.drop_steps} dropped evenly: {len(plan.timesteps)} run)' if plan.drop_steps else ''} | "
        f"{'edges set by hand' if plan.manual_edges else f'M={plan.M:g}'} lam={plan.lam:g} cx={plan.cx:g} | mode {plan.mode}",
        "",
        f"{'stage':<7} {'tau range':>11} {'steps':>5} {'requested':>9} {'achieved':>8} "
        f"{'heads kept':>10} {'units kept':>11}",
    ]
    for index, name in enumerate(STAGE_NAMES):
        bounds = plan.bounds.ranges[index]
        tau = "empty" if bounds is None else f"{bounds[0]}-{bounds[1]}"
        lines.append(
            f"{name:<7} {tau:>11} {allocation.step_counts[index]:>5} {allocation.requested[index]:>9.3f} "
            f"{allocation.achieved[index]:>8.3f} {allocation.heads_kept[index]:>4}/{shape.num_heads:<5} "
            f"{allocation.units_kept[index]:>5}/{shape.mlp_hidden:<5}"
        )
    lines += [
        "",
        f"overall sparsity (step-weighted): requested {allocation.overall_requested:.3f}, "
        f"achieved {allocation.overall_achieved:.4f}",
        f"block-linear MACs per image: dense {format_count(plan.macs_dense)}, "
        f"staged {format_count(plan.macs_staged)}, ideal speed-up {plan.ideal_speedup:.2f}x",
    ]
    if plan.drop_steps:  # what the user compares with: the dense model at every reference step
        reference = plan.macs_dense * plan.num_inference_steps / len(plan.timesteps)
        lines.append(
            f"against all {plan.num_inference_steps} reference steps: dense {format_count(reference)}, staged "
            f"{plan.macs_staged / reference:.3f} of it, ideal speed-up {reference / plan.macs_staged:.2f}x"
        )
    memory = plan.memory_figures()
    lines += [
        f"prunable-layer parameters: dense {format_count(memory['parameters_dense'])}, "
        f"three stage networks {format_count(memory['parameters_staged'])} (shared layers not counted)",
        f"Hessians a prune gathers (float64): {format_bytes(memory['hessian_bytes'])} for every layer at once, "
        f"{format_bytes(memory['hessian_block_bytes'])} for the largest block",
    ]
    if allocation.middle_capped:
        lines.append("note: the middle stage's ratio was capped to the lowest of the other stages")
    return "\n".join(lines)


def sampler_of(model: str) -> str:
    """The sampler `--scheduler` defaults to for `model` (`samplers.model_default_sampler`)."""
    return model_default_sampler(resolve_model(model))


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The `Plan` described by the plan arguments (shared by `plan`, `prune` and `bench`).

    The values go through `PlanRequest.from_values`, the same checks the studio and its API use.
    """
    stage_sparsity = getattr(args, "stage_sparsity", None)
    edges = getattr(args, "edges", None)
    request = PlanRequest.from_values(
        model=args.model,
        sampler=args.scheduler,  # None: the model's own
        steps=args.steps,
        M=args.M,
        lam=args.lam,
        sparsity=getattr(args, "sparsity", None),
        stage_sparsity=None if stage_sparsity is None else parse_stage_sparsity(stage_sparsity),
        cx=args.cx,
        uniform=bool(getattr(args, "uniform", False)),
        edges=None if edges is None else parse_edges(edges),
        drop_steps=getattr(args, "drop_steps", 0) or 0,
    )
    return request.plan()


def add_drop_steps_argument(parser: argparse.ArgumentParser) -> None:
    """`--drop-steps K` (plan and prune): plan for K of the reference steps dropped, as `sample --drop-steps K` runs them."""
    parser.add_argument(
        "--drop-steps", type=int_in("--drop-steps", 0, limits.MAX_STEPS), default=0, metavar="K",
        help="plan for K of the --steps reference steps dropped evenly, the first and last kept (ddim only): stage step "
        "counts, allocation and MACs of the kept steps; sample it with `sample --drop-steps K` (docs/method.md §4.6)",
    )


def run(args: argparse.Namespace) -> int:
    """Build the plan from the parsed arguments and print it."""
    if getattr(args, "stages", 3) != 3:
        from mosaic_core.divide.k_plan import format_k_plan

        plan = k_plan_from_args(args)
        print(json.dumps(plan.to_dict()) if args.json else format_k_plan(plan))
        return 0
    plan = plan_from_args(args)
    print(json.dumps({**plan.to_dict(), **plan.memory_figures()}) if args.json else format_plan(plan))
    return 0


def add_stages_argument(parser: argparse.ArgumentParser) -> None:
    """`--stages K` (plan and prune): K ≥ 2 stages instead of early/middle/late."""
    from mosaic_core.divide.multistage import MAX_STAGES

    parser.add_argument(
        "--stages", type=int_in("--stages", 2, MAX_STAGES), default=3,
        help="number of stages K (default 3: early, middle, late); K > 3 splits the early and late stages "
        "(docs/method.md §12), K = 2 keeps the early stage apart",
    )


def k_plan_from_args(args: argparse.Namespace):
    """The `KStagePlan` of the plan arguments with `--stages K` (K ≠ 3); ValueError for options it cannot take."""
    from mosaic_core.divide.k_plan import build_k_plan

    if getattr(args, "drop_steps", 0):
        raise ValueError(f"--drop-steps is planned for three stages (early, middle, late); drop --stages {args.stages} or --drop-steps")

    for option, given in (("--stage-sparsity", getattr(args, "stage_sparsity", None)), ("--edges", getattr(args, "edges", None)),
                          ("--uniform", getattr(args, "uniform", False) or None)):
        if given is not None:
            raise ValueError(f"{option} sets three stages; with --stages {args.stages} give --sparsity (the stages come from --M)")
    return build_k_plan(
        args.model, args.steps, M=args.M, lam=args.lam, sparsity=getattr(args, "sparsity", None) or 0.0,
        num_stages=args.stages, scheduler=args.scheduler, cx=args.cx,
    )


def add_plan_arguments(parser: argparse.ArgumentParser, sparsity_group: bool = True) -> None:
    """The Divide arguments: model, steps, M, λ, sparsity or per-stage sparsity, sampler, c_x."""
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, type=text_of("--model", limits.MAX_NAME_LENGTH),
        help=f"registry name or diffusers folder (default {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--steps", type=int_in("--steps", 1, limits.MAX_STEPS), default=None,
        help="sampler steps (default: the model's own: 50 for digits-dit, DiT and sdxl-base, 28 for sd3-medium, 20 for pixart-sigma, 4 for flux-schnell)",
    )
    parser.add_argument("--M", type=float_in("--M", 0.0, 1.0), default=DEFAULT_M, help=f"stage threshold in (0, 1) (default {DEFAULT_M})")
    parser.add_argument(
        "--edges", default=None, metavar="LO,HI", type=text_of("--edges", 200),
        help="set the middle stage [LO, HI] by hand, in training timesteps (0 <= LO <= HI < T, the model's count, "
        "e.g. 1000), instead of from --M",
    )
    parser.add_argument("--lam", type=float_in("--lam", -1e6, 1e6), default=DEFAULT_LAM, help=f"weight of ln SNR in the score (default {DEFAULT_LAM})")
    if sparsity_group:
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--sparsity", type=float_in("--sparsity", 0.0, 0.9), default=None, help="overall step-weighted sparsity in [0, 0.9] (auto allocation)")
        group.add_argument("--stage-sparsity", default=None, metavar="A,B,C", type=text_of("--stage-sparsity", 200), help="early,middle,late sparsities, each in [0, 0.9]")
        parser.add_argument("--uniform", action="store_true", help="one network at --sparsity for every step")
    parser.add_argument(
        "--scheduler", default=None, type=text_of("--scheduler", 64),
        help=f"sampler: {'|'.join(SCHEDULERS)} (default: the model's own, {DEFAULT_SCHEDULER} for DDPM-style schedules, "
        "dpm for PixArt-Σ, euler for SDXL, flow-euler for SD3, flow-euler-1/n for Flux; "
        "a local folder's from its model_index.json)",
    )
    parser.add_argument("--cx", type=float_in("--cx", 0.0, 1e12), default=1.0, help="E||x0||^2 / d of the clean latents, > 0 (default 1.0)")


def register(subparsers) -> None:
    """Add the `plan` sub-command."""
    parser = subparsers.add_parser(
        "plan",
        help="divide the trajectory into stages and allocate per-stage sparsity",
        description="Divide a model's sampling trajectory into early/middle/late stages "
        "(MosaicDiff) and allocate a sparsity to each.",
    )
    add_plan_arguments(parser)
    add_stages_argument(parser)
    add_drop_steps_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    parser.set_defaults(func=run)
