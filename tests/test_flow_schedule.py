"""Flow-matching Divide math (docs/method.md §8) against Monte Carlo and diffusers' own scheduler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mosaic_core.divide.flow_schedule import (
    dynamic_shift_mu,
    effective_shift,
    flow_expected_mse,
    flow_importance_score,
    flow_learning_speed,
    flow_log_snr,
    flow_schedule,
    shift_sigmas,
)

SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
# Random "latents": x₀ ~ N(0.3, 0.8²) per element, so c_x = E[x₀²] = 0.3² + 0.8² = 0.73 (not 1).
MEAN, STD = 0.3, 0.8
CX = MEAN**2 + STD**2
NUM_ELEMENTS = 400_000
Z = 4.5  # |estimate − truth| < 4.5 standard errors: a false alarm is a ~1e-5 event per check


def _latents_and_noise(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x0 = MEAN + STD * torch.randn(NUM_ELEMENTS, generator=generator, dtype=torch.float64)
    eps = torch.randn(NUM_ELEMENTS, generator=generator, dtype=torch.float64)
    return x0, eps


def _diffusers_training_grid(config):
    """The scheduler's own training grid: σ_j at t_j = σ_j·T, j = 0..T−1, σ descending from 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    return scheduler, scheduler.sigmas.double(), scheduler.timesteps.double()


def _noised(scheduler, x0, eps, index):
    """x_σ by diffusers' own forward process (`scale_noise`) at its training timestep `index`."""
    timestep = scheduler.timesteps[index : index + 1]
    return scheduler.scale_noise(x0[None], timestep, eps[None])[0]


@pytest.mark.parametrize("index", [0, 150, 500, 700, 900, 990])
def test_expected_distance_matches_monte_carlo(index):
    """E‖x_σ − x₀‖²/d = σ²(1 + c_x) (eq. 8.4), x_σ from diffusers' scale_noise on random latents."""
    scheduler, sigmas, _ = _diffusers_training_grid(SD3)
    x0, eps = _latents_and_noise(1)
    squared = (_noised(scheduler, x0, eps, index) - x0) ** 2
    estimate, standard_error = squared.mean().item(), squared.std().item() / math.sqrt(NUM_ELEMENTS)
    sigma = sigmas[index].item()
    expected = float(flow_expected_mse(np.array([sigma]), CX)[0])
    assert abs(estimate - expected) < Z * standard_error, (sigma, estimate, expected, standard_error)


@pytest.mark.parametrize("u_low,u_high", [(0.05, 0.2), (0.3, 0.5), (0.6, 0.9), (0.9, 0.999)])
def test_learning_speed_integrates_to_the_monte_carlo_growth(u_low, u_high):
    """∫ Grad du over [u_a, u_b] = E[MSE(σ_b)] − E[MSE(σ_a)] (eq. 8.6), both ends from diffusers' grid.

    The growth is estimated on paired samples (the same x₀ and ε at both ends), so its
    standard error is that of the per-element difference.
    """
    scheduler, sigmas, timesteps = _diffusers_training_grid(SD3)
    num_train = SD3["num_train_timesteps"]
    # The training grid holds u = (T − j)/T at index j (σ_j = shift(u_j)).
    high_index, low_index = num_train - round(u_high * num_train), num_train - round(u_low * num_train)
    x0, eps = _latents_and_noise(2)
    difference = (_noised(scheduler, x0, eps, high_index) - x0) ** 2 - (_noised(scheduler, x0, eps, low_index) - x0) ** 2
    estimate, standard_error = difference.mean().item(), difference.std().item() / math.sqrt(NUM_ELEMENTS)
    u_a, u_b = (num_train - low_index) / num_train, (num_train - high_index) / num_train
    u = np.linspace(u_a, u_b, 20_001)
    grad = flow_learning_speed(shift_sigmas(u, SD3["shift"]), SD3["shift"], CX)
    integral = float(np.sum((grad[1:] + grad[:-1]) / 2 * np.diff(u)))  # trapezoid; its error is ~1e-9 here
    assert abs(estimate - integral) < Z * standard_error, (u_a, u_b, estimate, integral, standard_error)
    # and the grid diffusers stepped on is eq. 8.2 at those u
    assert abs(sigmas[high_index].item() - shift_sigmas(np.array([u_b]), 3.0)[0]) < 1e-6


@pytest.mark.parametrize("index", [20, 300, 500, 800, 950])
def test_log_snr_matches_the_monte_carlo_power_ratio(index):
    """ln SNR = ln(E[((1−σ)x₀)²] / E[(σε)²]) for unit-power data = 2 ln((1−σ)/σ) (eq. 8.7)."""
    _, sigmas, _ = _diffusers_training_grid(SD3)
    sigma = sigmas[index].item()
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(NUM_ELEMENTS, generator=generator, dtype=torch.float64)  # c_x = 1
    eps = torch.randn(NUM_ELEMENTS, generator=generator, dtype=torch.float64)
    signal, noise = ((1 - sigma) * x0) ** 2, (sigma * eps) ** 2
    estimate = math.log(signal.mean().item() / noise.mean().item())
    # delta method: the variance of ln(a/b) for independent means a, b
    standard_error = math.sqrt(
        (signal.std().item() / signal.mean().item()) ** 2 / NUM_ELEMENTS
        + (noise.std().item() / noise.mean().item()) ** 2 / NUM_ELEMENTS
    )
    expected = float(flow_log_snr(np.array([sigma]))[0])
    assert abs(estimate - expected) < Z * standard_error


def test_dynamic_mu_equals_the_flux_pipeline_and_shifts_like_diffusers():
    """μ = calculate_shift(n) of diffusers' Flux pipeline; σ(u) with s = e^μ equals set_timesteps(mu=μ)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for tokens in (64, 256, 1024, 4096, 6000):
        mu = dynamic_shift_mu(FLUX, tokens)
        assert mu == pytest.approx(calculate_shift(tokens, 256, 4096, 0.5, 1.15), abs=1e-12)
        shift, reported_mu = effective_shift(FLUX, tokens)
        assert reported_mu == mu and shift == pytest.approx(math.exp(mu))
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLUX)
        u = np.linspace(1.0, 1.0 / 30, 30)
        scheduler.set_timesteps(sigmas=u, mu=mu)
        np.testing.assert_allclose(shift_sigmas(u, shift), scheduler.sigmas[:-1].double().numpy(), atol=1e-6)


def test_static_shift_grid_equals_diffusers_training_grid():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD3)
    u = np.arange(1000, 0, -1) / 1000.0
    np.testing.assert_allclose(shift_sigmas(u, 3.0), scheduler.sigmas.double().numpy(), atol=1e-6)


def test_score_peaks_where_the_hand_derivation_says():
    """λ = 0: Grad ∝ σ(s − (s−1)σ)² peaks at σ* = s / (3(s − 1)) when s > 3/2, else at σ → 1."""
    for config, tokens, peak in ((SD3, None, 500), (FLUX, 4096, None)):
        schedule = flow_schedule(config, tokens)
        curve = flow_importance_score(schedule, lam=0.0)
        s = schedule.shift
        expected = round(1000 * s / (3 * (s - 1))) if peak is None else peak
        assert abs(curve.argmax - expected) <= 1
    no_shift = flow_importance_score(flow_schedule({**SD3, "shift": 1.0}), lam=0.0)
    assert no_shift.argmax == 999  # Grad ∝ σ: no hump without a shift
    assert np.all(np.diff(no_shift.grad_term) > 0)


def test_cx_cancels_in_the_normalised_score():
    schedule = flow_schedule(SD3)
    a, b = flow_importance_score(schedule, 0.01, 0.3), flow_importance_score(schedule, 0.01, 4.0)
    np.testing.assert_allclose(a.score, b.score, rtol=0, atol=1e-13)
    assert (a.cx, b.cx) == (0.3, 4.0)


def test_schedule_is_finite_at_both_ends():
    schedule = flow_schedule(SD3)
    assert schedule.sigmas[0] == 0.5 / 1000 and schedule.sigmas[999] == 0.999
    curve = flow_importance_score(schedule)
    assert np.all(np.isfinite(curve.score)) and curve.score.shape == (1000,)


@pytest.mark.parametrize(
    "config,tokens,match",
    [
        (FLUX, None, "image_seq_len"),
        (FLUX, 0, "image_seq_len"),
        (FLUX, 2.5, "image_seq_len"),
        ({**SD3, "use_karras_sigmas": True}, None, "use_karras_sigmas"),
        ({**SD3, "shift": -1.0}, None, "shift"),
        ({**SD3, "time_shift_type": "cubic"}, None, "time_shift_type"),
        ({**FLUX, "max_image_seq_len": 100}, 512, "max_image_seq_len"),
    ],
)
def test_bad_flow_configs_are_refused_by_name(config, tokens, match):
    with pytest.raises(ValueError, match=match):
        flow_schedule(config, tokens)
