"""`python -m mosaic_core sample`: sample a model (dense, or staged with --pruned) to an .npz."""

from __future__ import annotations

import argparse

from mosaic_core import limits
from mosaic_core.cli import float_in, int_in, text_of
from mosaic_core.models.registry import DEFAULT_MODEL
from mosaic_core.models.samplers import SCHEDULERS


def register(subparsers) -> None:
    """Add the `sample` command."""
    parser = subparsers.add_parser(
        "sample",
        help="sample images to an .npz (images uint8 N×H×W×C, labels N; image i has class i mod classes)",
        description="Sample a model with classifier-free guidance; with --pruned, the staged pruned model.",
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, type=text_of("--model", limits.MAX_NAME_LENGTH),
        help=f"registry name or diffusers folder (default {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--pruned", default=None, metavar="DIR", type=text_of("--pruned", limits.MAX_PATH_LENGTH),
        help="a pruned checkpoint folder written by `prune`",
    )
    parser.add_argument(
        "--n", type=int_in("--n", 1, limits.MAX_IMAGES), default=20,
        help=f"number of images, 1..{limits.MAX_IMAGES} (default 20)",
    )
    parser.add_argument("--seed", type=int_in("--seed", 0, limits.MAX_SEED), default=0)
    parser.add_argument(
        "--steps", type=int_in("--steps", 1, limits.MAX_STEPS), default=None, help="sampling steps (default: the model's, 50)"
    )
    parser.add_argument("--cfg", type=float_in("--cfg", 0.0, 20.0), default=None, help="classifier-free guidance scale (default: the model's)")
    parser.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: float32 on CPU)")
    parser.add_argument("--out", required=True, metavar="FILE.npz", type=text_of("--out", limits.MAX_PATH_LENGTH))
    parser.add_argument(
        "--grid", default=None, metavar="FILE.png", type=text_of("--grid", limits.MAX_PATH_LENGTH), help="also write an image grid"
    )
    parser.add_argument("--metrics", action="store_true", help="also print class accuracy and Fréchet distance (digit models)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Sample with a progress bar; write the archive (and grid)."""
    from tqdm import tqdm

    from mosaic_core.atomic import check_output_file
    from mosaic_core.conquer.compare import is_digit_model
    from mosaic_core.conquer.images import save_grid, save_samples
    from mosaic_core.models.loading import load_model
    from mosaic_core.models.registry import resolve_model
    from mosaic_core.conquer.sampling import SampleConfig, labels_for, run_to_end, sample_loaded

    # Everything that can be refused is refused here, before the model loads or a step runs.
    check_output_file(args.out, "--out", suffix=".npz")
    if args.grid:
        check_output_file(args.grid, "--grid", suffix=".png")
    spec = resolve_model(args.model)
    if args.metrics:
        if not is_digit_model(spec):
            raise ValueError(f"--metrics needs a digit model (10 classes, 1-channel pixels); '{spec.name}' is not one")
        if args.n < limits.MIN_METRIC_IMAGES:
            raise ValueError(f"--metrics needs --n of at least {limits.MIN_METRIC_IMAGES} (Fréchet distance fits a covariance), got {args.n}")
    if args.pruned is not None:
        from mosaic_core.prune.checkpoint import read_manifest

        read_manifest(args.pruned)
    config = SampleConfig(
        num_inference_steps=args.steps if args.steps is not None else spec.default_steps,
        guidance_scale=args.cfg if args.cfg is not None else spec.default_cfg,
        scheduler=args.scheduler,
        seed=args.seed,
    )
    loaded = load_model(spec, device=args.device, dtype=args.dtype)
    transformer = None
    if args.pruned is not None:
        from mosaic_core.prune.checkpoint import load_pruned

        transformer = load_pruned(args.pruned, loaded)
    labels = labels_for(args.n, spec.num_classes)
    with tqdm(total=config.num_inference_steps, desc="sampling", unit="step") as bar:
        result = run_to_end(sample_loaded(loaded, labels, config, transformer=transformer), lambda event: bar.update(1))
    save_samples(args.out, result.images, result.labels)
    if args.grid:
        save_grid(args.grid, result.images, columns=min(spec.num_classes, 10))
    print(f"wrote {len(result.images)} images to {args.out} in {result.total_seconds:.1f} s")
    if args.metrics:
        from mosaic_core.conquer.metrics import class_accuracy, digit_fd

        print(f"class accuracy {class_accuracy(result.images, result.labels):.3f}, Fréchet distance {digit_fd(result.images):.2f}")
    return 0
