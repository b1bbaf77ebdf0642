"""Measured sensitivity e(τ): zero where the staged model uses the dense network, routed by stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_pixel_dit

from mosaic_core.conquer.staged_denoiser import StagedDiT
from mosaic_core.prune.sensitivity import measure_sensitivity


@pytest.mark.slow
def test_sensitivity_is_zero_outside_the_pruned_stage_and_the_stage_networks_error_inside():
    dense, other = tiny_pixel_dit(seed=0).eval(), tiny_pixel_dit(seed=1).eval()
    staged = StagedDiT(dense, other, dense, 300, 600, 1000)  # only the middle stage differs
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    x0 = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([1, 2, 3])
    steps = [50, 450, 900]
    curve = measure_sensitivity(dense, staged, x0, labels, alphas_cumprod, steps, seed=7)
    assert list(curve.timesteps) == steps and curve.num_images == 3
    assert curve.relative_error[0] == 0.0 and curve.relative_error[2] == 0.0
    # at τ = 450 the staged model is `other`: the error of `other` itself, computed by hand
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    a = alphas_cumprod[450]
    x_t = (a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()).float()
    t = torch.full((3,), 450)
    with torch.no_grad():
        reference = dense(x_t, timestep=t, class_labels=labels).sample[:, :1].double()
        moved = other(x_t, timestep=t, class_labels=labels).sample[:, :1].double()
    expected = float(((moved - reference) ** 2).sum() / (reference**2).sum())
    assert curve.relative_error[1] == pytest.approx(expected, rel=1e-9)
    assert expected > 0
    with pytest.raises(ValueError, match="timesteps must be"):
        measure_sensitivity(dense, staged, x0, labels, alphas_cumprod, [1000])
