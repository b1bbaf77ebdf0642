"""SNR-aware calibration data: clean inputs noised at the noise levels of one stage.

For a stage covering model timesteps [t_min, t_max], each calibration example is

    τ ~ U{t_min..t_max},  ε ~ N(0, I),  x_τ = √ᾱ(τ) x₀ + √(1 − ᾱ(τ)) ε       (DDPM eq. 4)

with its true class label, and every batch is repeated with the null label so that the
unconditional branch of classifier-free guidance is calibrated too (METHOD.md §3).

| mode     | τ drawn from                 | input  | role                                   |
|----------|------------------------------|--------|----------------------------------------|
| `snr`    | uniform inside the stage     | x_τ    | MosaicDiff (default)                   |
| `random` | uniform over all T           | x_τ    | ablation: stage-blind calibration      |
| `clean`  | τ = 0                        | x₀     | ablation: clean-input calibration      |

Clean inputs x₀ come from the model's dataset (`data`: the real digits for digits-dit) or,
for any model, from the dense model's own samples (`samples`: data-free; for a latent model
these are already latents, no VAE encoding needed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from mosaic_core import limits

CALIBRATION_MODES = ("snr", "random", "clean")
CALIBRATION_SOURCES = ("data", "samples")
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
        if not isinstance(self.source, str) or self.source not in CALIBRATION_SOURCES:
            raise ValueError(f"unknown calibration source {limits.shown(self.source)}: choose one of {', '.join(CALIBRATION_SOURCES)}")
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
    """Clean model inputs x₀ (N×C×H×W, model space) with labels, and c_x = E‖x₀‖²/d."""

    x0: torch.Tensor
    labels: torch.Tensor

    @property
    def cx(self) -> float:
        """Mean squared value per element of the clean inputs (feeds E[MSE(τ)] of the Divide score)."""
        return float(self.x0.double().pow(2).mean())


def clean_inputs(loaded, config: CalibrationConfig, should_stop=None) -> CleanSet:
    """`config.size` clean inputs for `loaded`: dataset images, or the dense model's own samples."""
    generator = torch.Generator().manual_seed(config.seed)
    if config.source == "data":
        if loaded.spec.name != "digits-dit" and loaded.spec.source != "builtin":
            raise ValueError(
                f"model '{loaded.spec.name}' has no built-in dataset: use calibration source 'samples' (data-free)"
            )
        from mosaic_core.models.digits import load_digit_images

        images, labels = load_digit_images(loaded.spec.sample_size)
        index = torch.randperm(images.shape[0], generator=generator)
        index = index.repeat(-(-config.size // len(index)))[: config.size]
        return CleanSet(images[index], labels[index])
    from mosaic_core.conquer.sampling import SampleConfig, run_to_end, sample_steps

    labels = torch.randint(0, loaded.spec.num_classes, (config.size,), generator=generator)
    xs = []
    for start in range(0, config.size, config.batch_size):
        chunk = labels[start : start + config.batch_size]
        steps = sample_steps(
            loaded.transformer,
            loaded.scheduler_config,
            chunk,
            SampleConfig(num_inference_steps=config.sample_steps, guidance_scale=loaded.spec.default_cfg, seed=config.seed),
            num_classes=loaded.spec.num_classes,
            sample_shape=(loaded.spec.in_channels, loaded.spec.sample_size, loaded.spec.sample_size),
            noise=_noise_for(chunk, loaded, config.seed, start),
            should_stop=should_stop,
        )
        last = None
        for event in steps:
            last = event
        xs.append(last.latents.float().cpu())
    return CleanSet(torch.cat(xs), labels)


def _noise_for(chunk, loaded, seed, offset):
    from mosaic_core.conquer.sampling import initial_noise

    shape = (loaded.spec.in_channels, loaded.spec.sample_size, loaded.spec.sample_size)
    return initial_noise(len(chunk), shape, seed + 7, offset)


def calibration_batches(
    clean: CleanSet,
    alphas_cumprod: torch.Tensor,
    t_range: tuple[int, int] | None,
    config: CalibrationConfig,
    null_class: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches (x_τ, τ, y) for one stage; each batch is followed by its null-label copy.

    `t_range` is the stage's inclusive (t_min, t_max); None means all timesteps. The draws
    depend only on `config.seed`, so every run (and every scorer) sees the same data.
    """
    num_train = alphas_cumprod.shape[0]
    low, high = (0, num_train - 1) if t_range is None or config.mode == "random" else t_range
    if not 0 <= low <= high < num_train:
        raise ValueError(f"stage range must satisfy 0 <= t_min <= t_max < {num_train}, got ({low}, {high})")
    generator = torch.Generator().manual_seed(config.seed + 1)
    n = clean.x0.shape[0]
    t = torch.randint(low, high + 1, (n,), generator=generator)
    noise = torch.randn(clean.x0.shape, generator=generator)
    for start in range(0, n, config.batch_size):
        x0 = clean.x0[start : start + config.batch_size]
        y = clean.labels[start : start + config.batch_size]
        if config.mode == "clean":
            tb, x_t = torch.zeros(len(x0), dtype=torch.long), x0
        else:
            tb = t[start : start + config.batch_size]
            a = alphas_cumprod[tb].view(-1, 1, 1, 1).to(x0.dtype)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise[start : start + config.batch_size]
        x_t, tb, y = x_t.to(device=device, dtype=dtype), tb.to(device), y.to(device)
        yield x_t, tb, y
        yield x_t, tb, torch.full_like(y, null_class)


def num_calibration_batches(clean: CleanSet, config: CalibrationConfig) -> int:
    """How many batches `calibration_batches` yields (for progress bars)."""
    return 2 * -(-clean.x0.shape[0] // config.batch_size)

