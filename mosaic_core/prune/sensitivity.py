"""Measured sensitivity: how much a pruned network's output moves, noise level by noise level.

The Divide step guesses where the trajectory is fragile from the importance score; pruning
can measure it. For each model timestep τ of a grid, the calibration images are noised to
x_τ = √ᾱ_τ x₀ + √(1 − ᾱ_τ) ε (one seeded ε per image, the same at every τ) and both the dense
and the pruned network predict; the sensitivity at τ is the relative output error

    e(τ) = Σ ‖f_pruned(x_τ, τ, y) − f_dense(x_τ, τ, y)‖² / Σ ‖f_dense(x_τ, τ, y)‖²

over the images (only the first C output channels: the noise prediction, not a learned
variance). A staged model answers with the stage network of τ, so e(τ) shows where each
stage's pruning costs the most. **[ours]**; docs/method.md §3.12.

`recorded_stage_errors` is the free version: the greedy OBS passes already recorded, per
stage, the error of the removals the allocation made (no forward pass at all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class SensitivityCurve:
    """e(τ) at a grid of model timesteps (ascending), and the images it was measured on."""

    timesteps: np.ndarray  # int64 (K,)
    relative_error: np.ndarray  # float64 (K,)
    num_images: int


def _noise_prediction(model, x_t: torch.Tensor, timestep: torch.Tensor, condition) -> torch.Tensor:
    from mosaic_core.models.adapters.base import as_condition

    out = model(x_t, timestep=timestep, **as_condition(condition).model_kwargs())
    out = out.sample if hasattr(out, "sample") else out[0]
    return out[:, : x_t.shape[1]]


@torch.no_grad()
def measure_sensitivity(
    dense: torch.nn.Module,
    pruned: torch.nn.Module,
    x0: torch.Tensor,
    condition,
    alphas_cumprod: torch.Tensor,
    timesteps: Sequence[int],
    seed: int = 0,
) -> SensitivityCurve:
    """e(τ) of `pruned` against `dense` at every τ of `timesteps` on clean inputs `x0` (module docstring).

    `condition` is what the model is called with (class labels (N,) or a condition object);
    `alphas_cumprod` the training schedule ᾱ (T,). The noise depends only on `seed`.
    """
    steps = np.unique(np.asarray(list(timesteps), dtype=np.int64))
    num_train = int(alphas_cumprod.shape[0])
    if steps.size == 0 or steps[0] < 0 or steps[-1] >= num_train:
        raise ValueError(f"timesteps must be a non-empty list in [0, {num_train - 1}], got {list(timesteps)[:8]}")
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    errors = []
    for t in steps:
        a = alphas_cumprod[int(t)].to(x0.device, torch.float64)
        x_t = (a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()).to(x0.dtype)
        tb = torch.full((x0.shape[0],), int(t), device=x0.device, dtype=torch.long)
        reference = _noise_prediction(dense, x_t, tb, condition).double()
        moved = _noise_prediction(pruned, x_t, tb, condition).double()
        errors.append(float(((moved - reference) ** 2).sum() / (reference**2).sum().clamp_min(1e-30)))
    return SensitivityCurve(steps, np.asarray(errors, dtype=np.float64), int(x0.shape[0]))


def recorded_stage_errors(result) -> tuple[float, ...]:
    """Per stage, the recorded OBS error of the removals a `PruneResult` made (per model call).

    Measured allocation: its own per-stage errors divided by the stage's steps; otherwise the
    errors of the paper's counts are not kept, and this returns NaN for every stage.
    """
    measured = getattr(result, "measured", None)
    if measured is None:
        return (float("nan"),) * 3
    steps = result.plan.step_counts
    return tuple(e / n if n else 0.0 for e, n in zip(measured.stage_errors, steps))


def staged_sensitivity(loaded, staged, num_images: int = 8, points: int = 24, seed: int = 0) -> SensitivityCurve | None:
    """e(τ) of a staged model against `loaded`'s dense network on `points` evenly spaced τ.

    Clean inputs are the model's dataset images (`CleanSet` of the "data" source); a model
    without a dataset would need the dense model's own samples, a job of its own, so this
    returns None for it (the caller shows the recorded per-stage errors instead).
    """
    from mosaic_core.models.samplers import sampler_alphas_cumprod
    from mosaic_core.prune.calibration import CalibrationConfig, clean_inputs, default_calibration_source

    if default_calibration_source(loaded.spec) != "data":
        return None
    clean = clean_inputs(loaded, CalibrationConfig(size=num_images, batch_size=num_images, source="data", seed=seed))
    alphas_cumprod = sampler_alphas_cumprod(loaded.scheduler_config)
    num_train = int(alphas_cumprod.shape[0])
    timesteps = np.unique(np.linspace(0, num_train - 1, points).round().astype(np.int64))
    x0 = clean.x0.to(loaded.device, loaded.dtype)
    labels = clean.labels.to(loaded.device) if torch.is_tensor(clean.labels) else clean.labels
    return measure_sensitivity(loaded.transformer, staged, x0, labels, alphas_cumprod, timesteps, seed)
