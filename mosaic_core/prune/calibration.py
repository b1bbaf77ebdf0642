"""SNR-aware calibration data: clean inputs noised at the noise levels of one stage.

For a stage covering model timesteps [t_min, t_max], each calibration example is

    τ ~ U{t_min..t_max},  ε ~ N(0, I),  x_τ = √ᾱ(τ) x₀ + √(1 − ᾱ(τ)) ε       (DDPM eq. 4)

with its true class label, and every batch is repeated with the null label so that the
unconditional branch of classifier-free guidance is calibrated too (docs/method.md §3).

| mode     | τ drawn from                 | input  | role                                   |
|----------|------------------------------|--------|----------------------------------------|
| `snr`    | uniform inside the stage     | x_τ    | MosaicDiff (default)                   |
| `random` | uniform over all T           | x_τ    | ablation: stage-blind calibration      |
| `clean`  | τ = 0                        | x₀     | ablation: clean-input calibration      |

Clean inputs x₀ come from the model's dataset (`data`: the real digits for digits-dit) or,
for any model, from the dense model's own samples (`samples`: data-free; for a latent model
these are already latents, no VAE encoding needed), or from a local image folder encoded by
the VAE (`folder:PATH`). A text-to-image family is conditioned on prompts from
`assets/prompts.txt` (the i-th clean input on prompt i mod the list, after a seeded shuffle),
embedded by the pipeline's own text encoders (`FamilyAdapter.condition_for`); the null copy
of each batch is the family's unconditional condition, so both CFG branches are calibrated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mosaic_core import limits
from mosaic_core.models.adapters.base import move_condition, select_rows

CALIBRATION_MODES = ("snr", "random", "clean")
CALIBRATION_SOURCES = ("data", "samples", "folder:PATH")
PROMPTS_FILE = "prompts.txt"  # in assets/: calibration prompts of text-to-image models
MAX_CALIBRATION_SIZE = limits.MAX_CALIBRATION_SIZE



def default_calibration_source(spec) -> str:
    """Where calibration images come from by default: the built-in model's own dataset
    ("data"); for every other model the dense model's own samples ("samples", data-free)."""
    return "data" if spec.source == "builtin" else "samples"

@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration settings; `size` is the number of clean images per stage (before the null copy)."""

    mode: str = "snr"
    size: int = 256
    batch_size: int = 64
    source: str = "data"
    seed: int = 0
    sample_steps: int = 25  # sampler steps for source="samples"

    def __post_init__(self) -> None:
        if not isinstance(self.mode, str) or self.mode not in CALIBRATION_MODES:
            raise ValueError(f"unknown calibration mode {limits.shown(self.mode)}: choose one of {', '.join(CALIBRATION_MODES)}")
        source = self.source
        if not isinstance(source, str) or (
            source not in CALIBRATION_SOURCES[:2] and not (source.startswith("folder:") and len(source) > len("folder:"))
        ):
            raise ValueError(f"unknown calibration source {limits.shown(source)}: choose one of {', '.join(CALIBRATION_SOURCES)}")
        if len(source) > limits.MAX_PATH_LENGTH + len("folder:"):
            raise ValueError(f"calibration source is {len(source)} characters long: at most {limits.MAX_PATH_LENGTH} allowed")
        for field, name, high in (
            ("size", "calibration size", MAX_CALIBRATION_SIZE),
            ("batch_size", "calibration batch size", 4096),
            ("seed", "calibration seed", limits.MAX_SEED),
            ("sample_steps", "calibration sample steps", limits.MAX_STEPS),
        ):
            low = 0 if field == "seed" else 1
            object.__setattr__(self, field, limits.check_int(name, getattr(self, field), low, high))

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class CleanSet:
    """Clean model inputs x₀ (N×C×H×W, model space) with their conditions, and c_x = E‖x₀‖²/d.

    `labels` are class labels (N,), or a family's condition object for N samples (e.g.
    SDXL's prompt embeddings: `mosaic_core.models.adapters`).
    """

    x0: torch.Tensor
    labels: torch.Tensor

    @property
    def cx(self) -> float:
        """Mean squared value per element of the clean inputs (feeds E[MSE(τ)] of the Divide score)."""
        return float(self.x0.double().pow(2).mean())


def calibration_prompts(size: int, seed: int) -> list[str]:
    """`size` prompts from assets/prompts.txt: a seeded shuffle, cycled."""
    from mosaic_core.models.registry import ASSETS_DIR

    prompts = [line.strip() for line in (ASSETS_DIR / PROMPTS_FILE).read_text().splitlines() if line.strip()]
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    return [prompts[order[i % len(prompts)]] for i in range(size)]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def calibration_files(source: str) -> tuple[Path, list[Path]]:
    """(folder, its image files, sorted) of a `folder:PATH` source; ValueError naming the folder when
    it does not exist, is not a folder, or holds no images."""
    folder = Path(source[len("folder:") :]).expanduser()
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"calibration folder '{folder}' {what}: give folder:PATH of an existing folder of .png/.jpg/.jpeg/.webp/.bmp images")
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"calibration folder '{folder}' has no .png/.jpg/.jpeg/.webp/.bmp images")
    return folder, files


def check_calibration_source(spec, source: str) -> None:
    """ValueError unless `source` can calibrate the model of `spec` (a `ModelSpec`): the built-in
    dataset is digits-dit's only, a folder of images serves text-to-image models (their VAE encodes
    it) and must hold images. Needs no weights, so commands check it before the model loads."""
    from mosaic_core.models.adapters import adapter_named

    text = adapter_named(spec.family).conditioning == "text"
    if source == "data" and (text or (spec.name != "digits-dit" and spec.source != "builtin")):
        also = " or 'folder:PATH' (local images)" if text else ""
        raise ValueError(f"model '{spec.name}' has no built-in dataset: use calibration source 'samples' (data-free){also}")
    if source.startswith("folder:"):
        if not text:
            raise ValueError(f"calibration source '{source}' needs a text-to-image model; use 'samples' or 'data'")
        calibration_files(source)


def _text_clean_inputs(loaded, config: CalibrationConfig, should_stop=None) -> CleanSet:
    """Clean latents of a text-to-image model with their prompts' conditions (samples or a folder)."""
    from mosaic_core.conquer.sampling import SampleConfig, sample_steps
    from mosaic_core.models.adapters import concat_conditions, move_condition
    from mosaic_core.models.samplers import default_sampler

    prompts = calibration_prompts(config.size, config.seed)
    images = _folder_latents(loaded, config) if config.source.startswith("folder:") else None
    xs, conditions = [], None
    for start in range(0, config.size, config.batch_size):
        chunk = prompts[start : start + config.batch_size]
        condition = loaded.adapter.condition_for(loaded, chunk)
        if images is not None:
            xs.append(images[start : start + len(chunk)])
        else:
            steps = sample_steps(
                loaded.transformer, loaded.scheduler_config, condition,
                SampleConfig(
                    num_inference_steps=config.sample_steps, guidance_scale=loaded.spec.default_cfg,
                    scheduler=default_sampler(loaded.scheduler_config), seed=config.seed,
                ),
                num_classes=0, sample_shape=(loaded.spec.in_channels, loaded.spec.sample_size, loaded.spec.sample_size),
                noise=_noise_for(chunk, loaded, config.seed, start), should_stop=should_stop,
                image_seq_len=getattr(loaded.spec, "image_seq_len", None),
            )
            last = None
            for event in steps:
                last = event
            xs.append(last.latents.float().cpu())
        condition = move_condition(condition, "cpu", torch.float32)
        conditions = condition if conditions is None else concat_conditions(conditions, condition)
    return CleanSet(torch.cat(xs), conditions)


def _folder_latents(loaded, config: CalibrationConfig) -> torch.Tensor:
    """`config.size` images of a local folder (cycled), resized to the model's size, VAE-encoded."""
    from pathlib import Path

    from PIL import Image

    from mosaic_core.conquer.sampling import vae_shift

    folder, files = calibration_files(config.source)
    if loaded.vae is None:
        raise ValueError(f"model '{loaded.spec.name}' has no VAE to encode the images of '{folder}'")
    size = loaded.pixel_size
    latents = []
    for start in range(0, config.size, config.batch_size):
        batch = []
        for i in range(start, min(start + config.batch_size, config.size)):
            image = Image.open(files[i % len(files)]).convert("RGB").resize((size, size), Image.BICUBIC)
            batch.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))  # C×H×W in [-1, 1]
        pixels = torch.stack(batch).to(device=loaded.vae.device, dtype=loaded.vae.dtype)
        with torch.no_grad():
            mean = loaded.vae.encode(pixels).latent_dist.mean
            encoded = (mean - vae_shift(loaded.vae)) * loaded.vae.config.scaling_factor  # what the denoiser saw in training
        latents.append(encoded.float().cpu())
    return torch.cat(latents)


def clean_inputs(loaded, config: CalibrationConfig, should_stop=None, processes=None) -> CleanSet:
    """`config.size` clean inputs for `loaded`: dataset images, the dense model's own samples,
    or a local image folder; with class labels, or a text family's prompt conditions.

    With several `processes` (`mosaic_core.distributed.Processes`), class-conditional sampled
    inputs are made batch by batch (batch k by process k mod N, each from its images' own
    seeds) and gathered, so every process holds the same set one process would make; a text
    family's inputs are made whole by every process (its Hessian batches are still sharded).
    """
    check_calibration_source(loaded.spec, config.source)
    if loaded.adapter.conditioning == "text":
        return _text_clean_inputs(loaded, config, should_stop)
    generator = torch.Generator().manual_seed(config.seed)
    if config.source == "data":
        from mosaic_core.models.digits import load_digit_images

        images, labels = load_digit_images(loaded.spec.sample_size)
        index = torch.randperm(images.shape[0], generator=generator)
        index = index.repeat(-(-config.size // len(index)))[: config.size]
        return CleanSet(images[index], labels[index])
    from mosaic_core.conquer.sampling import SampleConfig, run_to_end, sample_steps
    from mosaic_core.models.samplers import default_sampler

    labels = torch.randint(0, loaded.spec.num_classes, (config.size,), generator=generator)
    xs = []
    for index, start in enumerate(range(0, config.size, config.batch_size)):
        if processes is not None and not processes.owns(index):
            continue
        chunk = labels[start : start + config.batch_size]
        steps = sample_steps(
            loaded.transformer,
            loaded.scheduler_config,
            chunk,
            SampleConfig(
                num_inference_steps=config.sample_steps, guidance_scale=loaded.spec.default_cfg,
                scheduler=default_sampler(loaded.scheduler_config), seed=config.seed,
            ),
            num_classes=loaded.spec.num_classes,
            sample_shape=(loaded.spec.in_channels, loaded.spec.sample_size, loaded.spec.sample_size),
            noise=_noise_for(chunk, loaded, config.seed, start),
            should_stop=should_stop,
            image_seq_len=getattr(loaded.spec, "image_seq_len", None),
        )
        last = None
        for event in steps:
            last = event
        xs.append((index, last.latents.float().cpu()))
    if processes is not None and processes.distributed:
        from mosaic_core.distributed import in_batch_order

        return CleanSet(torch.cat(in_batch_order(processes.all_gather(xs))), labels)
    return CleanSet(torch.cat([x for _, x in xs]), labels)


def _noise_for(chunk, loaded, seed, offset):
    from mosaic_core.conquer.sampling import initial_noise

    shape = (loaded.spec.in_channels, loaded.spec.sample_size, loaded.spec.sample_size)
    return initial_noise(len(chunk), shape, seed + 7, offset)


def calibration_batches(
    clean: CleanSet,
    alphas_cumprod,
    t_range: tuple[int, int] | None,
    config: CalibrationConfig,
    null_class: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches (x_τ, τ, y) for one stage; each batch is followed by its null-condition copy.

    y is a slice of `clean.labels`: class labels (then the copy has `null_class`), or a
    condition object (then the copy is its `null()`: both CFG branches are calibrated).

    `t_range` is the stage's inclusive (t_min, t_max); None means all timesteps. The draws
    depend only on `config.seed`, so every run (and every scorer) sees the same data.
    `alphas_cumprod` is ᾱ (x_τ = √ᾱ x₀ + √(1−ᾱ) ε), or a `samplers.Noising` that gives the
    two factors itself (flow matching: 1 − σ and σ, docs/method.md eq. 8.1).
    """
    num_train = alphas_cumprod.shape[0] if torch.is_tensor(alphas_cumprod) else alphas_cumprod.num_train_timesteps
    low, high = (0, num_train - 1) if t_range is None or config.mode == "random" else t_range
    if not 0 <= low <= high < num_train:
        raise ValueError(f"stage range must satisfy 0 <= t_min <= t_max < {num_train}, got ({low}, {high})")
    generator = torch.Generator().manual_seed(config.seed + 1)
    n = clean.x0.shape[0]
    t = torch.randint(low, high + 1, (n,), generator=generator)
    noise = torch.randn(clean.x0.shape, generator=generator)
    for start in range(0, n, config.batch_size):
        x0 = clean.x0[start : start + config.batch_size]
        rows = torch.arange(start, min(start + config.batch_size, n))
        y = clean.labels[start : start + config.batch_size] if torch.is_tensor(clean.labels) else select_rows(clean.labels, rows, n)
        if config.mode == "clean":
            tb, x_t = torch.zeros(len(x0), dtype=torch.long), x0
        else:
            tb = t[start : start + config.batch_size]
            if torch.is_tensor(alphas_cumprod):
                a = alphas_cumprod[tb].view(-1, 1, 1, 1).to(x0.dtype)
                x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise[start : start + config.batch_size]
            else:
                shape = (-1,) + (1,) * (x0.ndim - 1)
                signal = alphas_cumprod.signal[tb].view(shape).to(x0.dtype)
                scale = alphas_cumprod.noise[tb].view(shape).to(x0.dtype)
                x_t = signal * x0 + scale * noise[start : start + config.batch_size]
        x_t, tb = x_t.to(device=device, dtype=dtype), tb.to(device)
        if torch.is_tensor(y):
            y = y.to(device)
            yield x_t, tb, y
            yield x_t, tb, torch.full_like(y, null_class)
        else:
            y = move_condition(y, device, dtype)
            yield x_t, tb, y
            yield x_t, tb, y.null()


def num_calibration_batches(clean: CleanSet, config: CalibrationConfig) -> int:
    """How many batches `calibration_batches` yields (for progress bars)."""
    return 2 * -(-clean.x0.shape[0] // config.batch_size)

