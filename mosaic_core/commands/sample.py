"""`python -m mosaic_core sample`: sample a model (dense, or staged with --pruned) to an .npz.

    python -m mosaic_core sample --pruned out/mosaic-0.3 --n 20 --out staged.npz
    accelerate launch --multi_gpu --num_processes 8 -m mosaic_core sample --model facebook/DiT-XL-2-256 \
        --n 50000 --batch-size 64 --out samples.npz          # the same file one process writes
"""

from __future__ import annotations

import argparse

import numpy as np

from mosaic_core import limits
from mosaic_core.cli import float_in, int_in, text_of
from mosaic_core.models.registry import DEFAULT_MODEL
from mosaic_core.models.samplers import SCHEDULERS, model_default_sampler


def register(subparsers) -> None:
    """Add the `sample` command."""
    parser = subparsers.add_parser(
        "sample",
        help="sample images to an .npz (images uint8 N×H×W×C, labels N; image i has class i mod classes, "
        "or prompt i mod the --prompt list for a text-to-image model, labels -1)",
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
        "--n", type=int_in("--n", 1, limits.MAX_SAMPLE_IMAGES), default=20,
        help=f"number of images, 1..{limits.MAX_SAMPLE_IMAGES} (default 20; sampled --batch-size at a time)",
    )
    parser.add_argument(
        "--prompt", action="append", default=None, metavar="TEXT", type=text_of("--prompt", limits.MAX_TEXT_LENGTH),
        help="text prompt of a text-to-image model (repeat for several; image i gets prompt i mod the list)",
    )
    parser.add_argument(
        "--negative-prompt", default="", metavar="TEXT", type=text_of("--negative-prompt", limits.MAX_TEXT_LENGTH),
        help="what a text-to-image model's guidance steers away from: CFG's unconditional branch (default none)",
    )
    parser.add_argument("--seed", type=int_in("--seed", 0, limits.MAX_SEED), default=0)
    parser.add_argument(
        "--steps", type=int_in("--steps", 1, limits.MAX_STEPS), default=None, help="sampling steps (default: the model's own, as for plan: 50 for digits-dit, 28 for sd3-medium)"
    )
    parser.add_argument(
        "--drop-steps", type=int_in("--drop-steps", 0, limits.MAX_STEPS), default=0, metavar="K",
        help="run K fewer steps by dropping K of the --steps reference steps evenly, the first and last kept, and "
        "jumping DDIM over them (ddim only; docs/method.md §4.6). Unlike a smaller --steps, every step that runs "
        "is one of the reference's own (default 0)",
    )
    parser.add_argument("--cfg", type=float_in("--cfg", 0.0, 20.0), default=None, help="classifier-free guidance scale (default: the model's)")
    parser.add_argument("--scheduler", default=None, choices=list(SCHEDULERS), help="sampler (default: the model's own)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    parser.add_argument("--dtype", default=None, help="fp32 | fp16 | bf16 (or float32 | float16 | bfloat16; default: fp32 on CPU)")
    parser.add_argument(
        "--batch-size", type=int_in("--batch-size", 1, limits.MAX_IMAGES), default=64,
        help="images per model call (default 64); images do not depend on it. Under `accelerate launch` "
        "batch k runs on process k mod N and rank 0 writes them all, in order",
    )
    parser.add_argument("--out", required=True, metavar="FILE.npz", type=text_of("--out", limits.MAX_PATH_LENGTH))
    parser.add_argument(
        "--grid", default=None, metavar="FILE.png", type=text_of("--grid", limits.MAX_PATH_LENGTH), help="also write an image grid"
    )
    parser.add_argument("--metrics", action="store_true", help="also print class accuracy and Fréchet distance (digit models)")
    parser.add_argument(
        "--cache", default=None, metavar="INTERVAL[,FIRST,LAST]",
        help="DeepCache-style block-output reuse: a full step every INTERVAL, the first/last blocks always run "
        "(default 1,1); stacks with --pruned (docs/method.md §8)",
    )
    parser.add_argument(
        "--cache-dit", default=None, metavar="THRESHOLD[,FN,BN,WARMUP]",
        help="cache-dit's DBCache (diffusers DiT only): skip the blocks after the first FN while their residual changes "
        "less than THRESHOLD (default 1,0,8); stacks with --pruned (docs/method.md §9)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Sample with a progress bar; write the archive (and grid)."""
    from mosaic_core.atomic import check_output_file
    from mosaic_core.conquer.compare import is_digit_model
    from mosaic_core.conquer.images import save_grid, save_samples
    from mosaic_core.models.loading import load_model
    from mosaic_core.models.registry import resolve_model
    from mosaic_core.conquer.sampling import SampleConfig, labels_for
    from mosaic_core.distributed import current_processes, process_device

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

        planned = read_manifest(args.pruned)["plan"]
        steps, dropped = planned.get("num_inference_steps"), planned.get("drop_steps", 0)
        if dropped and (args.drop_steps != dropped or (args.steps or spec.default_steps) != steps):
            import sys

            print(f"note: {args.pruned} was pruned for {steps} steps with {dropped} dropped (its allocation weighs the "
                  f"kept ones); sample it as planned with --steps {steps} --drop-steps {dropped}", file=sys.stderr)
    from mosaic_core.conquer.caching import parse_cache

    from mosaic_core.conquer.cache_dit_row import parse_dbcache

    cache, cache_dit = parse_cache(args.cache), parse_dbcache(args.cache_dit)
    if cache is not None and cache_dit is not None:
        raise ValueError("give --cache (DeepCache-style) or --cache-dit, not both: each already skips work across steps")
    if cache_dit is not None and cache_dit.threshold is None:
        raise ValueError("--cache-dit auto matches a MACs target, which only bench has; give sample a threshold, e.g. --cache-dit 0.08")
    config = SampleConfig(
        num_inference_steps=args.steps if args.steps is not None else spec.default_steps,
        guidance_scale=args.cfg if args.cfg is not None else spec.default_cfg,
        scheduler=args.scheduler if args.scheduler is not None else model_default_sampler(spec),
        seed=args.seed,
        drop_steps=args.drop_steps,
    )
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_conditioning(spec, args.prompt, args.negative_prompt, config.guidance_scale)
    processes = current_processes(args.device)  # one process unless started by `accelerate launch`
    loaded = load_model(spec, device=process_device(args.device, processes), dtype=args.dtype)
    transformer = None
    if args.pruned is not None:
        from mosaic_core.prune.checkpoint import load_pruned

        transformer = load_pruned(args.pruned, loaded)
    if cache is not None:
        from mosaic_core.conquer.caching import BlockReuse

        transformer = BlockReuse(transformer if transformer is not None else loaded.transformer, cache)
    if cache_dit is not None:
        from mosaic_core.conquer.cache_dit_row import CacheDiT

        transformer = CacheDiT(transformer if transformer is not None else loaded.transformer, cache_dit,
                               config.num_inference_steps - config.drop_steps, dense=loaded.transformer)
    if loaded.adapter.conditioning == "text":
        labels = [args.prompt[i % len(args.prompt)] for i in range(args.n)]  # prompts; conditions per batch
    else:
        labels = labels_for(args.n, spec.num_classes)
    images, seconds = sample_sharded(loaded, labels, config, transformer, args.batch_size, processes, args.negative_prompt)
    if not processes.is_main:
        return 0
    if loaded.adapter.conditioning == "text":  # labels -1 (no class); the prompts travel beside them
        result_labels = np.full(len(images), -1, dtype=np.int64)
        save_samples(args.out, images, result_labels, prompts=np.asarray(labels, dtype=str))
    else:
        result_labels = np.asarray(labels)
        save_samples(args.out, images, result_labels)
    if args.grid:
        save_grid(args.grid, images, columns=min(spec.num_classes or len(images), 10))
    where = f" by {processes.count} processes" if processes.distributed else ""
    print(f"wrote {len(images)} images to {args.out}{where} in {seconds:.1f} s")
    if cache_dit is not None and transformer.trajectories:
        shares = [transformer.computed_fraction(i) for i in range(len(transformer.trajectories))]
        print(f"cache-dit ran {np.mean(shares):.3f} of the dense block-linear MACs (this process's batches: "
              f"{min(shares):.3f}–{max(shares):.3f})")
    if args.metrics:
        from mosaic_core.conquer.metrics import class_accuracy, digit_fd

        print(f"class accuracy {class_accuracy(images, result_labels):.3f}, Fréchet distance {digit_fd(images):.2f}")
    return 0


def check_conditioning(spec, prompts, negative_prompt: str, guidance_scale: float) -> None:
    """ValueError naming the flag when --prompt, --negative-prompt or --cfg does not fit the model's
    conditioning; checked from its spec, before the model loads."""
    from mosaic_core.models.adapters import adapter_named

    adapter = adapter_named(spec.family)
    if adapter.conditioning == "text":
        if not prompts or not any(str(prompt).strip() for prompt in prompts):
            raise ValueError(f"model '{spec.name}' is text-to-image: give --prompt \"…\" with some text (repeat it for several prompts)")
    elif prompts:
        raise ValueError(f"model '{spec.name}' is class-conditional: --prompt is for text-to-image models")
    if negative_prompt.strip():
        if adapter.conditioning != "text":
            raise ValueError(f"model '{spec.name}' is class-conditional: --negative-prompt is for text-to-image models")
        if adapter.guidance_distilled:
            raise ValueError(
                f"model '{spec.name}' is guidance-distilled (Flux): it runs no unconditional branch for --negative-prompt "
                "to steer; leave --negative-prompt out"
            )
    if adapter.guidance_distilled and guidance_scale != 1.0:
        raise ValueError(
            f"--cfg must be 1 for model '{spec.name}', got {guidance_scale:g}: Flux is guidance-distilled, with no "
            "unconditional branch to guide against (leave --cfg out)"
        )


def sample_sharded(loaded, labels, config, transformer, batch_size: int, processes, negative_prompt: str = ""):
    """All images for `labels` in global batches; batch k on process k mod N, gathered on rank 0.

    Returns (uint8 N×H×W×C images in label order, sampling seconds of this process) on
    rank 0 and (None, seconds) elsewhere. Image i's noise is seeded by its global index i
    (`index_offset`), so the images are those of one process and one call. Gathering goes
    round by round (one batch per process), so rank 0 never holds more than N batches in
    flight besides the result.
    """
    from tqdm import tqdm

    from mosaic_core.conquer.sampling import run_to_end, sample_loaded
    from mosaic_core.distributed import batch_ranges, in_batch_order

    ranges = batch_ranges(len(labels), batch_size)
    mine = processes.shard(len(ranges))
    rounds = -(-len(ranges) // processes.count)
    parts, seconds = [], 0.0
    with tqdm(total=len(mine) * (config.num_inference_steps - config.drop_steps), desc="sampling", unit="step", disable=not processes.is_main) as bar:
        for round_index in range(rounds):
            k = round_index * processes.count + processes.index
            done = []
            if k < len(ranges):
                start, stop = ranges[k]
                batch = labels[start:stop]
                if loaded.adapter.conditioning == "text":  # prompts -> the pipeline's own text conditions
                    batch = loaded.adapter.condition_for(loaded, list(batch), negative_prompt)
                steps = sample_loaded(loaded, batch, config, transformer=transformer, index_offset=start)
                result = run_to_end(steps, lambda event: bar.update(1))
                seconds += result.total_seconds
                done = [(k, result.images)]
            gathered = processes.gather_to_main(done)
            if processes.is_main:
                parts.extend(in_batch_order(gathered))
    return (np.concatenate(parts) if processes.is_main else None), seconds
