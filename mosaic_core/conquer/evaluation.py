"""Evaluation at scale: FID and Inception Score of a sample file against a reference batch.

Metrics (images uint8 N×H×W×C; one process or several, see `mosaic_core.distributed`):

| metric  | definition                                                                 | features              |
|---------|----------------------------------------------------------------------------|-----------------------|
| FID     | ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2})  (Heusel et al. 2017) | Inception pool3, 2048 |
| IS      | exp E_x KL(p(y|x) ‖ p(y)), mean ± std over 10 splits (Salimans et al. 2016) | Inception softmax, 1008 |
| digits  | class accuracy and Fréchet distance in the digit classifier's features     | `conquer.metrics`     |

**Why no library.** torch-fidelity, torchmetrics' FID (which builds on torch-fidelity's
extractor), pytorch-fid and clean-fid all import torchvision, and torchvision cannot be
installed here without pulling a second (CUDA) torch over the pinned CPU one. The
arithmetic is short and is written out below; the network is not reimplemented but read
from a file: the TorchScript export of the TensorFlow FID Inception graph
(`inception-2015-12-05.pt`, the detector StyleGAN2-ADA/StyleGAN3 and clean-fid use),
called as `detector(images, return_features=True)` → N×2048 pool3 features and
`detector(images, no_output_bias=True)` → N×1008 softmax probabilities, on float images in
[0, 255] of any size (it resizes to 299×299 inside). Nothing is downloaded: without the file
evaluation stops with one line saying where to put it.

Reference batches in ADM's `.npz` format (guided-diffusion's evaluator): `arr_0` uint8
N×H×W×3 images and/or precomputed `mu` (2048) and `sigma` (2048×2048). ADM computed those
statistics with the TensorFlow graph; the TorchScript export reproduces its features
closely, so FIDs against ADM's `mu`/`sigma` are comparable to within about 0.1 but not
bit-identical. A folder of PNG/JPEG images works as a reference too.

The square root uses the symmetric form: tr((Σ₁Σ₂)^{1/2}) = Σ √λ(Σ₁^{1/2} Σ₂ Σ₁^{1/2}), which
needs only symmetric eigendecompositions (no complex round-off as with a general `sqrtm`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generator

import numpy as np
import torch

from mosaic_core.distributed import Processes, batch_ranges, in_batch_order

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_ENV = "MOSAIC_INCEPTION"
INCEPTION_DEFAULT = Path(__file__).resolve().parents[2] / "cache" / "metrics" / INCEPTION_FILE
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IS_SPLITS = 10


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean μ (D) and covariance Σ (D×D, unbiased) of N feature rows."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None = None

    @classmethod
    def of(cls, features: np.ndarray) -> "FeatureStatistics":
        """Statistics of N×D features (N ≥ 2)."""
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"need N×D features with N >= 2 to fit a Gaussian, got shape {features.shape}")
        return cls(features.mean(0), np.cov(features, rowvar=False), len(features))


def frechet_distance_from_statistics(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """FID between two Gaussians: ‖μa − μb‖² + tr Σa + tr Σb − 2 Σ √λ(Σa^{1/2} Σb Σa^{1/2})."""
    mu_a, mu_b = np.asarray(a.mu, np.float64), np.asarray(b.mu, np.float64)
    sigma_a, sigma_b = np.asarray(a.sigma, np.float64), np.asarray(b.sigma, np.float64)
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != mu_a.shape * 2:
        raise ValueError(f"statistics do not match: μ {mu_a.shape} vs {mu_b.shape}, Σ {sigma_a.shape} vs {sigma_b.shape}")
    # 1. Σa^{1/2} from the eigendecomposition of the symmetric PSD Σa (tiny negative λ from round-off → 0).
    values, vectors = np.linalg.eigh((sigma_a + sigma_a.T) / 2)
    sqrt_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    # 2. Σa^{1/2} Σb Σa^{1/2} is symmetric PSD and similar to Σa Σb: same eigenvalues, so its
    #    square roots' sum is tr((Σa Σb)^{1/2}).
    middle = sqrt_a @ sigma_b @ sqrt_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * trace_sqrt)


def inception_score(probabilities: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) ‖ p(y))) per split of the rows (in order); (mean, std) over splits."""
    p = np.asarray(probabilities, np.float64)
    if p.ndim != 2 or len(p) < splits:
        raise ValueError(f"need at least {splits} rows of class probabilities for {splits} splits, got shape {p.shape}")
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(0, keepdims=True)  # p(y) over this split
        kl = (part * (np.log(part + 1e-12) - np.log(marginal + 1e-12))).sum(1)  # KL per image
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


@dataclass(frozen=True)
class ImageSet:
    """What an image file holds: images (uint8 N×H×W×C), labels, precomputed FID statistics."""

    images: np.ndarray | None
    labels: np.ndarray | None
    statistics: FeatureStatistics | None
    source: str


def _check_images(images: np.ndarray, where: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"{where}: expected uint8 images N×H×W×1 or N×H×W×3, got {images.dtype} {images.shape}")
    return images


def load_image_set(path: str | Path) -> ImageSet:
    """Read a sample archive (`images`, `labels`), an ADM reference batch (`arr_0`, `mu`, `sigma`) or an image folder."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such image file or folder: {path}")
    if path.suffix != ".npz":
        raise ValueError(f"{path}: expected an .npz (from `sample`, or an ADM reference batch) or a folder of images")
    try:
        with np.load(path) as data:
            keys = set(data.files)
            images = data["images"] if "images" in keys else data["arr_0"] if "arr_0" in keys else None
            labels = data["labels"] if "labels" in keys else None
            statistics = None
            if {"mu", "sigma"} <= keys:
                statistics = FeatureStatistics(np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path}: {error}") from error
    if images is None and statistics is None:
        raise ValueError(f"{path} holds neither images (`images` or `arr_0`) nor statistics (`mu` and `sigma`): found {sorted(keys)}")
    return ImageSet(None if images is None else _check_images(images, str(path)), labels, statistics, str(path))


def _load_folder(folder: Path) -> ImageSet:
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for file in files:
        with Image.open(file) as image:
            images.append(np.asarray(image.convert("RGB")))
    shapes = {image.shape for image in images}
    if len(shapes) != 1:
        raise ValueError(f"images in {folder} differ in size ({sorted(shapes)[:3]}...): resize them to one size first")
    return ImageSet(np.stack(images), None, None, str(folder))


def inception_path(explicit: str | Path | None = None) -> Path:
    """The Inception TorchScript file: `explicit`, else $MOSAIC_INCEPTION, else cache/metrics/; never downloaded."""
    candidates = [Path(explicit)] if explicit else []
    if not explicit and os.environ.get(INCEPTION_ENV):
        candidates.append(Path(os.environ[INCEPTION_ENV]))
    if not explicit:
        candidates.append(INCEPTION_DEFAULT)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = f"'{explicit}' does not exist" if explicit else "not found"
    raise ValueError(
        f"Inception weights {where}: put the TorchScript FID Inception '{INCEPTION_FILE}' (StyleGAN3 / clean-fid) "
        f"at {INCEPTION_DEFAULT}, or set ${INCEPTION_ENV}, or pass --inception FILE (nothing is downloaded)"
    )


def load_inception(path: str | Path, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript Inception detector on `device`, in eval mode."""
    try:
        detector = torch.jit.load(str(path), map_location=torch.device(device))
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{path} is not a TorchScript Inception detector: {str(error).splitlines()[0]}") from error
    return detector.eval()


def inception_steps(
    detector: torch.nn.Module,
    images: np.ndarray,
    *,
    batch_size: int = 100,
    device: torch.device | str = "cpu",
    processes: Processes = Processes(),
    should_stop: Callable[[], bool] | None = None,
) -> Generator[tuple[int, int], None, tuple[np.ndarray, np.ndarray] | None]:
    """Pool3 features (N×2048) and class probabilities (N×1008) of `images`, in image order.

    A generator of (batches done, batches of this process); returns the arrays on the main
    process and None elsewhere. Batch k runs on process k mod N; gray images are repeated
    to three channels; the detector gets float N×3×H×W in [0, 255].
    """
    from mosaic_core.jobs import Cancelled

    images = _check_images(images, "images")
    ranges = batch_ranges(len(images), batch_size)
    mine = processes.shard(len(ranges))
    outputs = []
    with torch.no_grad():
        for done, k in enumerate(mine, 1):
            if should_stop is not None and should_stop():
                raise Cancelled("evaluation cancelled")
            start, stop = ranges[k]
            batch = torch.from_numpy(images[start:stop]).to(device).permute(0, 3, 1, 2).float()  # N×C×H×W, 0..255
            if batch.shape[1] == 1:
                batch = batch.expand(-1, 3, -1, -1)
            features = detector(batch, return_features=True)
            probabilities = detector(batch, no_output_bias=True)
            outputs.append((k, (features.double().cpu().numpy(), probabilities.double().cpu().numpy())))
            yield done, len(mine)
    gathered = processes.gather_to_main(outputs)
    if not processes.is_main:
        return None
    ordered = in_batch_order(gathered)
    return np.concatenate([f for f, _ in ordered]), np.concatenate([p for _, p in ordered])


def digit_metrics(images: np.ndarray, labels: np.ndarray | None) -> dict:
    """Class accuracy (when labels are known) and Fréchet distance to the real digits (digit classifier features)."""
    from mosaic_core.conquer.metrics import class_accuracy, digit_classifier, real_digit_images

    classifier = digit_classifier()
    generated = FeatureStatistics.of(classifier.features(images))
    real = FeatureStatistics.of(classifier.features(real_digit_images()[0]))
    return {
        "accuracy": None if labels is None else class_accuracy(images, labels, classifier),
        "fd": frechet_distance_from_statistics(generated, real),
    }


# ----- CLIP score (text-to-image models, when prompts are given) --------------------------
#
# CLIP score (Hessel et al. 2021, as torchmetrics reports it) = 100 · mean_i max(cos(E_img(x_i), E_txt(p_i)), 0)
# with image i judged against prompt i. The CLIP model is a local transformers folder
# (config.json, weights, tokenizer files); nothing is downloaded. Images are prepared as
# CLIP's own processor does: shortest side resized to the model's input size (bicubic,
# antialiased), centre crop, then normalised with CLIP's mean and std.

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def read_prompts(path: str | Path, count: int) -> list[str]:
    """One prompt per image from a text file (line i for image i; one line is used for every image)."""
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise ValueError(f"{path} has {len(lines)} prompts for {count} images: give one per image, or one for all")
    return lines


def clip_folder(folder: str | Path | None) -> Path:
    """The local folder of a full CLIP model, or one ValueError line saying what to put there (nothing is downloaded).

    The CLIP score needs both towers, so a folder holding only a text encoder (a diffusion
    pipeline's `text_encoder/`, model_type "clip_text_model") is refused here, naming what it holds.
    """
    import json

    from mosaic_core import limits

    folder = Path(folder) if folder else None
    if folder is None or not (folder / "config.json").is_file():
        raise ValueError(
            f"CLIP weights not found{f' in {folder}' if folder else ''}: pass --clip FOLDER, a local transformers CLIP "
            f"folder (config.json, model.safetensors, tokenizer files; e.g. a copy of openai/clip-vit-large-patch14); "
            f"nothing is downloaded"
        )
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_bytes()) if config_file.stat().st_size <= limits.MAX_CONFIG_BYTES else None
    except (OSError, ValueError, RecursionError):
        config = None
    found = config.get("model_type") if isinstance(config, dict) else None
    towers = isinstance(config, dict) and all(isinstance(config.get(key), dict) for key in ("vision_config", "text_config"))
    if found != "clip" or not towers:
        if not isinstance(config, dict):
            what = "an unreadable config.json"
        else:
            what = f"model_type {limits.shown(found)}" + (" without both a vision and a text tower" if found == "clip" else "")
        raise ValueError(
            f"--clip {folder} holds {what}, not a full CLIP model: give the folder of one (config.json with "
            f'model_type "clip", a vision and a text tower; e.g. a copy of openai/clip-vit-large-patch14)'
        )
    return folder


def load_clip(folder: str | Path, device: torch.device | str = "cpu"):
    """(CLIPModel, tokenizer) from a local transformers folder, or ValueError saying what is missing."""
    folder = clip_folder(folder)
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


def clip_pixels(images: np.ndarray, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 N×H×W×C -> CLIP input N×3×size×size: resize shortest side, centre crop, normalise."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255.0  # N×C×H×W
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[:, :, top : top + size, left : left + size].clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _pooled(output) -> torch.Tensor:
    """Projected embeddings from `get_*_features` (a tensor in older transformers, an output object in newer)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def clip_score(model, tokenizer, images: np.ndarray, prompts: list[str], batch_size: int = 50, device="cpu") -> float:
    """100 · mean max(cos(image_i, prompt_i), 0) over all images."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    size = int(model.config.vision_config.image_size)
    scores = []
    with torch.no_grad():
        for start, stop in batch_ranges(len(images), batch_size):
            image = _pooled(model.get_image_features(pixel_values=clip_pixels(images[start:stop], size, device)))
            tokens = tokenizer(prompts[start:stop], padding=True, truncation=True, return_tensors="pt").to(device)
            text = _pooled(model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask")))
            cosine = torch.nn.functional.cosine_similarity(image.double(), text.double(), dim=-1)
            scores.append((100.0 * cosine.clamp(min=0)).cpu().numpy())
    return float(np.concatenate(scores).mean())
