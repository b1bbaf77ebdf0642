"""Sampler names -> diffusers schedulers, and the timesteps a sampler visits.

The Divide engine needs only the timesteps (which stage each step lands in); the sampler
needs the scheduler object. Both come from the model's scheduler config, so that a
`DDIMScheduler` built here sees exactly the noise schedule the model was trained with.
"""

from __future__ import annotations

import math

from mosaic_core.limits import shown

from typing import Any, Mapping

import numpy as np

# name -> diffusers class name; the classes are imported lazily (diffusers is heavy).
SCHEDULERS: Mapping[str, str] = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}
DEFAULT_SCHEDULER = "ddim"
MAX_STEPS = 1000


def check_scheduler_name(name: str) -> str:
    """Return `name` normalised, or raise ValueError listing the allowed samplers."""
    key = name.strip().lower() if isinstance(name, str) else None
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {shown(name)}: choose one of {', '.join(SCHEDULERS)}")
    return key


def check_num_steps(num_inference_steps: int, num_train_timesteps: int = MAX_STEPS) -> int:
    """Return the step count, or raise ValueError when it is not an integer in [1, T]."""
    value = num_inference_steps
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not (math.isfinite(value) and value.is_integer()))
    ):
        raise ValueError(f"steps must be a whole number in [1, {num_train_timesteps}], got {shown(value)}")
    steps = int(value)
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    return steps


def make_scheduler(name: str, scheduler_config: Mapping[str, Any]):
    """A fresh diffusers scheduler of kind `name` built from the model's scheduler config.

    Config keys that the chosen class does not know are ignored by diffusers, so one
    config serves every sampler. `clip_sample` (DDIM/DDPM on pixels) is kept.
    """
    import diffusers

    key = check_scheduler_name(name)
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    cls = getattr(diffusers, SCHEDULERS[key])
    if key == "euler":
        # Euler's default "linspace" spacing starts at t = T-1; keep DiT's trained range.
        config.setdefault("timestep_spacing", "leading")
    return cls.from_config(config)


def sampler_alphas_cumprod(scheduler_config: Mapping[str, Any]):
    """ᾱ_t as the diffusers samplers compute it: a float32 torch tensor of length T.

    Two copies of ᾱ exist on purpose, and this is the only place that says why (docs/method.md
    §6): the Divide engine (`divide.noise_schedule.alphas_cumprod`) recomputes ᾱ in float64,
    because ln SNR and its derivative lose digits in float32 near t = 0 and t = T−1; every
    place that *noises data for the model* (training, calibration, x̂₀ of a sampler step) uses
    this float32 copy instead, so that the model sees exactly the inputs a diffusers sampler
    makes. The two agree to 1e-6 (tests/test_schedule.py).
    """
    return make_scheduler("ddpm", scheduler_config).alphas_cumprod.float()


def sampler_timesteps(name: str, scheduler_config: Mapping[str, Any], num_inference_steps: int) -> np.ndarray:
    """The model timesteps (float64, one per model call) the sampler visits for N steps.

    DPM-Solver and Euler may return fractional timesteps; stage membership rounds them.
    """
    num_train = int(scheduler_config.get("num_train_timesteps", 1000))
    steps = check_num_steps(num_inference_steps, num_train)
    scheduler = make_scheduler(name, scheduler_config)
    scheduler.set_timesteps(steps)
    return np.asarray(scheduler.timesteps, dtype=np.float64)
