"""`python -m mosaic_core eval`: FID and Inception Score of samples against a reference batch.

    python -m mosaic_core eval staged.npz --reference VIRTUAL_imagenet256_labeled.npz
    python -m mosaic_core eval staged.npz --model digits-dit          # accuracy and digit FD
    accelerate launch --multi_gpu --num_processes 8 -m mosaic_core eval staged.npz --reference ref.npz

The Inception network is read from a local TorchScript file (see
`mosaic_core.conquer.evaluation`); without it the command stops with one line saying where
to put it. The digit metrics need no file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

METRICS = ("fid", "is", "clip", "digits")


def register(subparsers) -> None:
    """Add the `eval` command."""
    parser = subparsers.add_parser(
        "eval",
        help="FID / Inception Score of an image file against a reference (or digit accuracy and FD)",
        description="Evaluate sampled images (.npz from `sample`, an ADM .npz, or a folder): FID and Inception "
        "Score with a local Inception file, or the built-in digit metrics.",
    )
    parser.add_argument("images", metavar="IMAGES", help="sample archive (.npz), ADM reference-format .npz, or image folder")
    parser.add_argument("--reference", default=None, metavar="REF",
                        help="reference batch for FID: ADM .npz (arr_0 and/or mu, sigma), sample .npz, or folder")
    parser.add_argument("--metric", default=None, metavar="M1,M2",
                        help=f"any of {', '.join(METRICS)} (default: digits for a digit model, else fid,is with --reference, is without)")
    parser.add_argument("--model", default=None, help="the model that made the images; a digit model implies --metric digits")
    parser.add_argument("--inception", default=None, metavar="FILE",
                        help="TorchScript FID Inception (inception-2015-12-05.pt); default $MOSAIC_INCEPTION or cache/metrics/")
    parser.add_argument("--prompts", default=None, metavar="FILE.txt",
                        help="text-to-image: one prompt per line (line i for image i, or one for all); adds the CLIP score")
    parser.add_argument("--clip", default=None, metavar="FOLDER", help="local transformers CLIP folder for the CLIP score")
    parser.add_argument("--batch-size", type=int, default=100, help="images per Inception call (default 100)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    parser.add_argument("--out", default=None, metavar="FILE.json", help="also write the numbers as JSON")
    parser.set_defaults(func=run)


def parse_metrics(text: str | None, model: str | None, has_reference: bool, has_prompts: bool = False) -> tuple[str, ...]:
    """The metrics to compute, validated (ValueError naming the bad one and the choices)."""
    if text is None:
        if model is not None:
            from mosaic_core.conquer.compare import is_digit_model
            from mosaic_core.models.registry import resolve_model

            if is_digit_model(resolve_model(model)):
                return ("digits",)
        return (("fid", "is") if has_reference else ("is",)) + (("clip",) if has_prompts else ())
    metrics = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown metric '{','.join(unknown) or text}': choose from {', '.join(METRICS)}")
    if "fid" in metrics and not has_reference:
        raise ValueError("FID needs a reference batch: pass --reference REF (ADM .npz, sample .npz or folder)")
    if "clip" in metrics and not has_prompts:
        raise ValueError("the CLIP score needs prompts: pass --prompts FILE.txt (one per image, or one for all)")
    return metrics


def run(args: argparse.Namespace) -> int:
    """Compute the metrics (Inception work sharded over processes) and print them on rank 0."""
    import json

    from tqdm import tqdm

    from mosaic_core.atomic import check_output_file, write_json
    from mosaic_core.conquer import evaluation
    from mosaic_core.distributed import current_processes, process_device
    from mosaic_core.jobs import run_to_end
    from mosaic_core.models.loading import resolve_device

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    out = None if args.out is None else check_output_file(args.out, "--out", suffix=".json")  # a .json file, not a folder
    metrics = parse_metrics(args.metric, args.model, args.reference is not None, args.prompts is not None)
    for path in (args.images, args.reference):  # a mistyped path is named before any weights are asked for
        if path is not None and not Path(path).exists():
            raise ValueError(f"no such image file or folder: {path}")
    inception = None
    if {"fid", "is"} & set(metrics):
        inception = evaluation.inception_path(args.inception)  # fail before reading anything big
    if "clip" in metrics:
        evaluation.clip_folder(args.clip)  # likewise: where to put CLIP, before any image is read
    device = resolve_device(args.device)
    processes = current_processes(device)
    device = resolve_device(process_device(args.device, processes)) if args.device else device
    generated = evaluation.load_image_set(args.images)
    if generated.images is None:
        raise ValueError(f"{args.images} holds statistics only; the evaluated file must hold images")
    reference = evaluation.load_image_set(args.reference) if args.reference else None
    results: dict = {"images": args.images, "count": int(len(generated.images)), "reference": args.reference}

    if "digits" in metrics:
        results.update(evaluation.digit_metrics(generated.images, generated.labels))
    if inception is not None:
        detector = evaluation.load_inception(inception, device)

        def outputs(images, what):
            steps = evaluation.inception_steps(detector, images, batch_size=args.batch_size, device=device, processes=processes)
            with tqdm(desc=f"inception ({what})", unit="batch", disable=not processes.is_main) as bar:
                return run_to_end(steps, lambda event: (setattr(bar, "total", event[1]), bar.update(1)))

        features, probabilities = outputs(generated.images, "images") or (None, None)
        if "is" in metrics and processes.is_main:
            results["is"], results["is_std"] = evaluation.inception_score(probabilities)
        if "fid" in metrics:
            reference_statistics = reference.statistics
            if reference_statistics is None:
                reference_features = outputs(reference.images, "reference")
                if processes.is_main:
                    reference_statistics = evaluation.FeatureStatistics.of(reference_features[0])
            if processes.is_main:
                results["fid"] = evaluation.frechet_distance_from_statistics(
                    evaluation.FeatureStatistics.of(features), reference_statistics
                )
                results["reference_statistics"] = "precomputed mu/sigma" if reference.statistics is not None else "computed"
    if "clip" in metrics and processes.is_main:  # small next to Inception work: rank 0 alone
        model, tokenizer = evaluation.load_clip(args.clip, device)
        prompts = evaluation.read_prompts(args.prompts, len(generated.images))
        results["clip"] = evaluation.clip_score(model, tokenizer, generated.images, prompts, args.batch_size, device)
    if not processes.is_main:
        return 0
    shown = {k: v for k, v in results.items() if isinstance(v, float)}
    print(" | ".join(f"{name} {value:.4f}" for name, value in shown.items()) + f"  ({results['count']} images)")
    if out is not None:
        write_json(out, json.loads(json.dumps(results)))
        print(f"wrote {out}")
    return 0
