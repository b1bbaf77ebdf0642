"""Sampler names -> diffusers schedulers, and the timesteps a sampler visits.

The Divide engine needs only the timesteps (which stage each step lands in); the sampler
needs the scheduler object. Both come from the model's scheduler config, so that a
`DDIMScheduler` built here sees exactly the noise schedule the model was trained with.

Flow-matching models (a `FlowMatchEulerDiscreteScheduler` config) take the `flow-*`
samplers, DDPM-family models the others (`check_sampler_fits`). Both flow samplers step
σ with diffusers' `FlowMatchEulerDiscreteScheduler` and differ only in where the
unshifted σ grid ends (docs/method.md §8.7):

| name             | σ before the shift                     | as in diffusers'         |
|------------------|----------------------------------------|--------------------------|
| `flow-euler`     | `set_timesteps(N)`: σ_max … σ_min       | StableDiffusion3Pipeline |
| `flow-euler-1/n` | `sigmas = linspace(1, 1/N, N)`          | FluxPipeline             |

With `use_dynamic_shifting` both need μ, from the image token count (`image_seq_len`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mosaic_core.limits import shown

from typing import Any, Mapping

import numpy as np

# name -> diffusers class name; the classes are imported lazily (diffusers is heavy).
SCHEDULERS: Mapping[str, str] = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "flow-euler": "FlowMatchEulerDiscreteScheduler",
    "flow-euler-1/n": "FlowMatchEulerDiscreteScheduler",
}
FLOW_SAMPLERS = ("flow-euler", "flow-euler-1/n")
DEFAULT_FLOW_SCHEDULER = "flow-euler"
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


def check_drop_steps(drop_steps: int, num_inference_steps: int, scheduler: str = DEFAULT_SCHEDULER) -> int:
    """Return the number of reference steps to drop, or ValueError naming the allowed range and sampler.

    Dropping jumps DDIM straight over steps (`kept_step_indices`); a multistep solver (DPM-Solver)
    keeps a history of earlier steps and Euler-type samplers step σ, so only `ddim` takes it."""
    value = drop_steps
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
        raise ValueError(f"drop_steps must be a whole number in [0, {num_inference_steps - 1}], got {shown(value)}")
    drop = int(value)
    if not 0 <= drop <= num_inference_steps - 1:
        raise ValueError(f"drop_steps must be in [0, {num_inference_steps - 1}] (at least one of the {num_inference_steps} steps runs), got {drop}")
    if drop and scheduler != "ddim":
        raise ValueError(f"dropping steps needs the ddim sampler (it jumps DDIM over the dropped steps), got '{scheduler}'")
    return drop


def kept_step_indices(num_inference_steps: int, drop_steps: int) -> list[int]:
    """Which of the N reference steps run when `drop_steps` of them are dropped evenly: the indices
    round(linspace(0, N − 1, N − drop)), so the first and the last step always run and every kept
    step is one of the reference's own timesteps (docs/method.md §4.6)."""
    keep = int(num_inference_steps) - int(drop_steps)
    if keep == 1:
        return [0]
    return [int(round(i)) for i in np.linspace(0, num_inference_steps - 1, keep)]


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


def is_flow_sampler(name: str) -> bool:
    """True for the flow-matching samplers (`FLOW_SAMPLERS`)."""
    return check_scheduler_name(name) in FLOW_SAMPLERS


# A model's own scheduler class -> the sampler that runs it as its pipeline does. DDPM is left
# out: a DDPMScheduler pipeline samples 1000 steps, and at the step counts used here DDIM is its
# deterministic equivalent.
OWN_SAMPLERS: Mapping[str, str] = {
    "DDIMScheduler": "ddim",
    "DPMSolverMultistepScheduler": "dpm",
    "EulerDiscreteScheduler": "euler",
}


def default_sampler(scheduler_config: Mapping[str, Any]) -> str:
    """The sampler a model's schedule takes by default: `flow-euler` for flow matching, else the
    one its own scheduler class names (`OWN_SAMPLERS`: PixArt's DPM-Solver, SDXL's Euler), else `ddim`."""
    from mosaic_core.divide.flow_schedule import is_flow_matching

    if is_flow_matching(scheduler_config):
        return DEFAULT_FLOW_SCHEDULER
    own = dict(scheduler_config).get("_class_name")
    return OWN_SAMPLERS.get(own, DEFAULT_SCHEDULER) if isinstance(own, str) else DEFAULT_SCHEDULER


def model_default_sampler(spec) -> str:
    """The sampler a model (`ModelSpec`) takes when none is named: its family's own (Flux:
    `flow-euler-1/n`, as FluxPipeline), else the one its schedule takes (`default_sampler`)."""
    from mosaic_core.models.adapters import adapter_named

    return adapter_named(spec.family).default_sampler or default_sampler(spec.scheduler_config)


def check_sampler_fits(name: str, scheduler_config: Mapping[str, Any]) -> str:
    """The sampler name, or ValueError when it does not fit the model's schedule (flow vs ᾱ)."""
    from mosaic_core.divide.flow_schedule import is_flow_matching

    key = check_scheduler_name(name)
    flow = is_flow_matching(scheduler_config)
    if flow and key not in FLOW_SAMPLERS:
        raise ValueError(f"sampler '{key}' does not fit a flow-matching model: choose one of {', '.join(FLOW_SAMPLERS)}")
    if not flow and key in FLOW_SAMPLERS:
        allowed = [n for n in SCHEDULERS if n not in FLOW_SAMPLERS]
        raise ValueError(f"sampler '{key}' needs a flow-matching model (FlowMatchEulerDiscreteScheduler config): choose one of {', '.join(allowed)}")
    return key


def set_sampler_timesteps(scheduler, name: str, scheduler_config: Mapping[str, Any], num_inference_steps: int, image_seq_len: int | None = None):
    """`scheduler.set_timesteps` for N steps, the one rule the plan and the sampler share.

    Flow samplers pass σ and μ as the diffusers pipelines do (table above); μ comes from
    `image_seq_len` when the config uses dynamic shifting (docs/method.md eq. 8.3).
    """
    key = check_sampler_fits(name, scheduler_config)
    if key not in FLOW_SAMPLERS:
        scheduler.set_timesteps(num_inference_steps)
        return scheduler
    from mosaic_core.divide.flow_schedule import effective_shift

    _, mu = effective_shift(scheduler_config, image_seq_len)
    kwargs = {} if mu is None else {"mu": mu}
    if key == "flow-euler-1/n":
        kwargs["sigmas"] = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
    scheduler.set_timesteps(num_inference_steps, **kwargs)
    return scheduler


def denoiser_timestep_scale(model) -> float:
    """The factor between the scheduler's t and the denoiser's `timestep` input (1 for most families).

    The family adapter's `timestep_scale` (Flux: 1/1000), found through staged and wrapped
    denoisers (`adapters.denoiser_adapter`); a class without an adapter gets 1.
    """
    from mosaic_core.models.adapters.base import denoiser_adapter

    try:
        return float(denoiser_adapter(model).timestep_scale)
    except ValueError:  # no adapter for this class
        return 1.0


def sampler_alphas_cumprod(scheduler_config: Mapping[str, Any]):
    """ᾱ_t as the diffusers samplers compute it: a float32 torch tensor of length T.

    Two copies of ᾱ exist on purpose, and this is the only place that says why (docs/method.md
    §6): the Divide engine (`divide.noise_schedule.alphas_cumprod`) recomputes ᾱ in float64,
    because ln SNR and its derivative lose digits in float32 near t = 0 and t = T−1; every
    place that *noises data for the model* (training, calibration, x̂₀ of a sampler step) uses
    this float32 copy instead, so that the model sees exactly the inputs a diffusers sampler
    makes. The two agree to 1e-6 (tests/test_schedule.py).

    A flow-matching config has no ᾱ: ValueError (use `sampler_noising`).
    """
    from mosaic_core.divide.flow_schedule import is_flow_matching

    if is_flow_matching(scheduler_config):
        raise ValueError(
            "a flow-matching model is noised by σ, not ᾱ (docs/method.md §8.1): "
            "its calibration uses sampler_noising; training it is not supported"
        )
    return make_scheduler("ddpm", scheduler_config).alphas_cumprod.float()


@dataclass(frozen=True, eq=False)
class Noising:
    """x_t = signal[t]·x₀ + noise[t]·ε at the integer timesteps t = 0 … T−1 (float32, length T)."""

    signal: Any  # torch.Tensor
    noise: Any  # torch.Tensor

    @property
    def num_train_timesteps(self) -> int:
        """T."""
        return int(self.signal.shape[0])


def sampler_noising(scheduler_config: Mapping[str, Any]) -> Noising:
    """How data is noised for the model at each integer timestep t (calibration inputs).

    DDPM family: (√ᾱ_t, √(1 − ᾱ_t)) from `sampler_alphas_cumprod`. Flow matching: (1 − σ, σ)
    with σ = t/T, the scheduler's own units (docs/method.md eq. 8.1), so a stage's calibration
    timesteps are the ones its bounds name.
    """
    import torch

    from mosaic_core.divide.flow_schedule import check_flow_config, is_flow_matching

    if is_flow_matching(scheduler_config):
        num_train = int(check_flow_config(scheduler_config).get("num_train_timesteps", 1000))
        sigma = torch.arange(num_train, dtype=torch.float64) / num_train
        return Noising((1.0 - sigma).float(), sigma.float())
    alphas = sampler_alphas_cumprod(scheduler_config)
    return Noising(alphas.sqrt(), (1 - alphas).sqrt())


def sampler_timesteps(
    name: str, scheduler_config: Mapping[str, Any], num_inference_steps: int, image_seq_len: int | None = None
) -> np.ndarray:
    """The model timesteps (float64, one per model call) the sampler visits for N steps.

    DPM-Solver, Euler and the flow samplers may return fractional timesteps; stage
    membership rounds them. Flow timesteps are the scheduler's t = σ·T (docs/method.md §8.7);
    `image_seq_len` sets μ for a dynamically shifted schedule.
    """
    num_train = int(scheduler_config.get("num_train_timesteps", 1000))
    steps = check_num_steps(num_inference_steps, num_train)
    scheduler = make_scheduler(name, scheduler_config)
    set_sampler_timesteps(scheduler, name, scheduler_config, steps, image_seq_len)
    return np.asarray(scheduler.timesteps, dtype=np.float64)
