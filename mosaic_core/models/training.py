"""Training the built-in `digits-dit`, recording the training dynamics on the way.

The recipe (`TrainConfig`) is ε-prediction on the linear β schedule (1e-4 -> 0.02, T = 1000,
DiT's own), label dropout 0.1 to the null class for classifier-free guidance, AdamW with a
warm-up and cosine decay, and an EMA of the weights that is what ships.

Training dynamics (the paper's premise): every `log_every` steps the *raw* (non-EMA) model's
ε-loss is measured per noise-level bin on a fixed evaluation set — same images, same noise,
same τ per bin each time — so the curves show which noise levels are learned when. The
paper's observation is slow-fast-slow: the loss in the middle bins falls fastest.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from mosaic_core.models.digits import DIGITS_DIT_CONFIG, NUM_CLASSES, build_digits_dit, disable_label_dropout, load_digit_images
from mosaic_core.models.registry import resolve_model
from mosaic_core.models.dynamics import FILE_NAME as DYNAMICS_FILE
from mosaic_core.models.dynamics import dynamics_record
from mosaic_core.models.samplers import sampler_alphas_cumprod


@dataclass(frozen=True)
class TrainConfig:
    """The digits-dit training recipe; every field is recorded in the model card."""

    steps: int = 2400
    batch_size: int = 64
    learning_rate: float = 6e-4
    warmup_steps: int = 100
    min_lr_fraction: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    label_dropout: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 100
    dynamics_bins: int = 20
    dynamics_images: int = 64

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.dynamics_bins < 2 or self.log_every < 1:
            raise ValueError("dynamics_bins must be >= 2 and log_every >= 1")


@dataclass(frozen=True)
class TrainEvent:
    """Progress of training: step, loss (running mean), seconds so far; `dynamics` on log steps."""

    step: int
    total_steps: int
    loss: float
    seconds: float
    dynamics: list[float] | None = None


def _learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to `min_lr_fraction` of the peak."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.learning_rate * (config.min_lr_fraction + (1.0 - config.min_lr_fraction) * cosine)


class _DynamicsProbe:
    """Fixed images, noise and τ per bin: ε-MSE per noise-level bin of the current weights."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, alphas_cumprod: torch.Tensor, bins: int, seed: int):
        generator = torch.Generator().manual_seed(seed + 1)
        num_train = alphas_cumprod.shape[0]
        self.edges = torch.linspace(0, num_train, bins + 1).round().long()
        index = torch.randperm(images.shape[0], generator=generator)
        self.x0, self.labels = images[index], labels[index]
        n = self.x0.shape[0]
        # One τ per (bin, image), uniform inside the bin: bins × n
        lows, highs = self.edges[:-1, None].float(), self.edges[1:, None].float()
        self.timesteps = (lows + torch.rand(bins, n, generator=generator) * (highs - lows)).long().clamp(max=num_train - 1)
        self.noise = torch.randn((bins,) + tuple(self.x0.shape), generator=generator)
        self.alphas_cumprod = alphas_cumprod

    @torch.no_grad()
    def measure(self, model) -> list[float]:
        was_training = model.training
        model.eval()
        losses = []
        for b in range(self.timesteps.shape[0]):
            t = self.timesteps[b]
            a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * self.x0 + (1 - a).sqrt() * self.noise[b]
            eps = model(x_t, timestep=t, class_labels=self.labels).sample
            losses.append(F.mse_loss(eps, self.noise[b]).item())
        model.train(was_training)
        return losses


def train_digits_dit(
    out_dir: str | Path,
    config: TrainConfig = TrainConfig(),
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[TrainEvent]:
    """Train digits-dit from scratch and write `out_dir` (a generator of `TrainEvent`s).

    Writes, atomically at the end: `config.json` + `diffusion_pytorch_model.safetensors`
    (the EMA weights, diffusers layout), `scheduler_config.json`, `dynamics.json` and
    `train_config.json`. Stopping early (`should_stop`) writes nothing.
    """
    out_dir = check_model_folder(out_dir)  # refuse a folder of other files before training, not after
    torch.manual_seed(config.seed)
    spec = resolve_model("digits-dit")
    alphas_cumprod = sampler_alphas_cumprod(spec.scheduler_config)
    num_train = alphas_cumprod.shape[0]
    images, labels = load_digit_images()

    model = build_digits_dit()
    disable_label_dropout(model)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    probe_images = min(config.dynamics_images, images.shape[0])
    probe = _DynamicsProbe(images[:probe_images], labels[:probe_images], alphas_cumprod, config.dynamics_bins, config.seed)

    log_steps, log_losses, running = [], [], []
    start = time.perf_counter()

    def log(step: int) -> list[float]:
        losses = probe.measure(model)
        log_steps.append(step)
        log_losses.append(losses)
        return losses

    yield TrainEvent(0, config.steps, float("nan"), 0.0, log(0))
    for step in range(1, config.steps + 1):
        if should_stop():
            return
        # 1. A batch: x₀, labels (dropped to the null class with p = label_dropout), τ, ε.
        index = torch.randint(0, images.shape[0], (config.batch_size,), generator=generator)
        x0, y = images[index], labels[index].clone()
        drop = torch.rand(config.batch_size, generator=generator) < config.label_dropout
        y[drop] = NUM_CLASSES
        t = torch.randint(0, num_train, (config.batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        # 2. Forward process x_τ = √ᾱ x₀ + √(1-ᾱ) ε, and the ε-prediction loss.
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(model(x_t, timestep=t, class_labels=y).sample, noise)
        # 3. Step with warm-up + cosine LR and gradient clipping.
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step - 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        # 4. EMA with a warm-up so the early average is not dominated by the init.
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1.0 - decay)
        running.append(loss.item())
        dynamics = log(step) if step % config.log_every == 0 or step == config.steps else None
        yield TrainEvent(step, config.steps, sum(running[-50:]) / len(running[-50:]), time.perf_counter() - start, dynamics)

    _write_model_folder(Path(out_dir), ema, spec, config, probe, log_steps, log_losses, time.perf_counter() - start, images)


# What a digits-dit folder holds; `train` replaces a folder only when it holds nothing else.
MODEL_FOLDER_FILES = (
    "config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json", DYNAMICS_FILE, "train_config.json",
    "README.md", "samples.png",
)


def owns_model_entry(path: Path) -> bool:
    """Whether a folder entry is one a digits-dit model folder holds (README.md and samples.png are kept)."""
    return path.name in MODEL_FOLDER_FILES and path.is_file() and not path.is_symlink()


def check_model_folder(out_dir, what: str = "output folder") -> Path:
    """A folder `train_digits_dit` may write (new, empty, or an earlier model folder), or ValueError."""
    from mosaic_core.atomic import check_output_folder

    return check_output_folder(out_dir, owns_model_entry, what)


def _write_model_folder(out_dir, ema, spec, config, probe, log_steps, log_losses, seconds, images) -> None:
    """Write everything to a temporary sibling folder, then swap it in (atomic for readers)."""
    from mosaic_core.atomic import replace_folder

    with replace_folder(out_dir, owns_model_entry) as tmp:
        ema.save_pretrained(tmp, safe_serialization=True)
        (tmp / "scheduler_config.json").write_text(
            json.dumps({"_class_name": "DDIMScheduler", **dict(spec.scheduler_config)}, indent=2)
        )
        dynamics = dynamics_record(probe.edges.tolist(), log_steps, log_losses, probe.x0.shape[0], images.pow(2).mean())
        (tmp / DYNAMICS_FILE).write_text(json.dumps(dynamics))
        (tmp / "train_config.json").write_text(
            json.dumps({**asdict(config), "architecture": DIGITS_DIT_CONFIG, "train_seconds": round(seconds, 1)}, indent=2)
        )
        # keep files that are not produced by training (model card, sample grid)
        for keep in ("README.md", "samples.png"):
            if (out_dir / keep).is_file():
                (tmp / keep).write_bytes((out_dir / keep).read_bytes())
