"""`python -m mosaic_core train`: train the built-in digits-dit from scratch (CPU, ~20 min)."""

from __future__ import annotations

import argparse
import math

from mosaic_core import limits
from mosaic_core.cli import int_in, text_of
from mosaic_core.models.registry import ASSETS_DIR


def register(subparsers) -> None:
    """Add the `train` command."""
    parser = subparsers.add_parser(
        "train",
        help="train the built-in digits-dit (reproducible: fixed seed, CPU)",
        description="Train digits-dit on sklearn's real digits and write config, EMA weights, "
        "scheduler config and training dynamics to --out (atomically, at the end).",
    )
    parser.add_argument(
        "--out", default=str(ASSETS_DIR / "digits-dit"), type=text_of("--out", limits.MAX_PATH_LENGTH),
        help="output folder: new, empty, or an earlier digits-dit (default: assets/digits-dit)",
    )
    parser.add_argument(
        "--steps", type=int_in("--steps", 1, limits.MAX_TRAIN_STEPS), default=None, help="optimizer steps (default: the recipe's)"
    )
    parser.add_argument("--seed", type=int_in("--seed", 0, limits.MAX_SEED), default=0)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train and show a progress bar with the running loss."""
    from tqdm import tqdm

    from mosaic_core.models.training import TrainConfig, check_model_folder, train_digits_dit

    check_model_folder(args.out, "--out")  # before training: refuse a folder holding other files
    config = TrainConfig(seed=args.seed, **({"steps": args.steps} if args.steps is not None else {}))
    with tqdm(total=config.steps, desc="training digits-dit", unit="step") as bar:
        for event in train_digits_dit(args.out, config):
            if event.step:
                bar.update(1)
            if not math.isnan(event.loss):
                bar.set_postfix(loss=f"{event.loss:.4f}")
    print(f"wrote {args.out}")
    return 0
