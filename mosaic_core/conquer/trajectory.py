"""The model's own trajectory: how fast the predicted clean sample x̂₀ settles, step by step.

A teaching measurement (docs/method.md §4.2, eq. 4.4): sample a few images densely and, at every
sampler step k, measure the RMS distance of that step's x̂₀ to the final step's,

    d_k = mean over images of  ‖x̂₀(t_k) − x̂₀(t_N)‖₂ / √d        (d = C·H·W elements),

so a user can see at which noise levels the image is actually decided. x̂₀ comes from the
sampler's own per-step events (`sampling.sample_steps`), so CFG and the learned-σ split
are applied exactly as when sampling. When the schedule clips samples (pixel models),
every x̂₀ is clipped the same way, so the samplers compare on equal terms. Distances are
measured in model space: nothing is decoded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Generator

import numpy as np
import torch

from mosaic_core.conquer.conditions import conditions_for, default_values
from mosaic_core.conquer.sampling import SampleConfig, StepEvent, sample_steps


@dataclass(frozen=True)
class Trajectory:
    """Distance of the predicted clean image to the final one, per sampler step."""

    timesteps: np.ndarray  # N model timesteps, in sampling order
    distance: np.ndarray  # N, RMS ‖x̂₀(t_k) − x̂₀(final)‖ / √d, mean over images
    num_images: int
    seconds: float


def trajectory_steps(
    loaded,
    sampler: str,
    steps: int,
    num_images: int,
    seed: int,
    should_stop: Callable[[], bool] | None = None,
) -> Generator[StepEvent, None, Trajectory]:
    """Sample `num_images` images densely, yielding each `StepEvent`; returns the `Trajectory`.

    Image i is conditioned on class i mod the classes, or prompt i mod assets/prompts.txt
    for a text-to-image model (`conditions.default_values`).
    """
    spec = loaded.spec
    config = SampleConfig(num_inference_steps=steps, guidance_scale=spec.default_cfg, scheduler=sampler, seed=seed)
    labels = conditions_for(loaded, default_values(spec, num_images))
    schedule = dict(loaded.scheduler_config)
    clip = float(schedule.get("clip_sample_range", 1.0)) if schedule.get("clip_sample") else None
    predictions, timesteps = [], []
    start = time.perf_counter()
    generator = sample_steps(
        loaded.transformer,
        loaded.scheduler_config,
        labels,
        config,
        num_classes=spec.num_classes,
        sample_shape=(spec.in_channels, spec.sample_size, spec.sample_size),
        vae=None,  # distances are measured in model space; nothing is decoded
        should_stop=should_stop,
        image_seq_len=getattr(spec, "image_seq_len", None),  # μ of a dynamically shifted flow schedule
    )
    for event in generator:
        x0 = event.pred_original.float()
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        predictions.append(x0.cpu())
        timesteps.append(event.timestep)
        yield event
    stacked = torch.stack(predictions)  # steps×N×C×H×W
    rms = (stacked - stacked[-1]).flatten(2).pow(2).mean(dim=2).sqrt()  # steps×N
    return Trajectory(
        timesteps=np.asarray(timesteps, dtype=np.float64),
        distance=rms.mean(dim=1).double().numpy(),
        num_images=int(num_images),
        seconds=time.perf_counter() - start,
    )
