"""Schedules and the importance score: equal to diffusers, formulas hold, bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaic_core.divide.noise_schedule import (
    alphas_cumprod,
    check_cx,
    check_lam,
    expected_mse,
    importance_score,
    learning_speed,
    log_snr,
    snr,
)

LINEAR = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
SCALED_LINEAR = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
COSINE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}
TRAINED = {"num_train_timesteps": 50, "trained_betas": list(np.linspace(0.001, 0.2, 50) ** 1.3)}


@pytest.mark.parametrize("config", [LINEAR, SCALED_LINEAR, COSINE, TRAINED], ids=["linear", "scaled_linear", "cosine", "trained"])
def test_alphas_cumprod_equals_diffusers(config):
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(**config).alphas_cumprod.double().numpy()
    ours = alphas_cumprod(config)
    assert ours.dtype == np.float64
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)


def test_unsupported_schedule_names_the_value():
    with pytest.raises(ValueError, match="sigmoid.*linear, scaled_linear, squaredcos_cap_v2"):
        alphas_cumprod({"beta_schedule": "sigmoid"})


def test_snr_and_log_snr_agree():
    alpha_bar = alphas_cumprod(LINEAR)
    np.testing.assert_allclose(np.log(snr(alpha_bar)), log_snr(alpha_bar), rtol=1e-12)
    assert np.all(np.diff(log_snr(alpha_bar)) < 0)  # SNR falls with τ


@settings(max_examples=50, deadline=None)
@given(
    beta_start=st.floats(1e-5, 1e-3),
    beta_end=st.floats(5e-3, 5e-2),
    cx=st.floats(0.05, 20.0),
    kind=st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"]),
)
def test_learning_speed_is_the_one_step_growth_of_expected_mse(beta_start, beta_end, cx, kind):
    """Grad(τ) = E[MSE(τ)] - E[MSE(τ-1)] with E[MSE(-1)] = 0 (ᾱ(-1) = 1), and Grad ≥ 0."""
    alpha_bar = alphas_cumprod({"beta_schedule": kind, "beta_start": beta_start, "beta_end": beta_end})
    mse = expected_mse(alpha_bar, cx)
    growth = np.diff(np.concatenate(([0.0], mse)))
    grad = learning_speed(alpha_bar, cx)
    np.testing.assert_allclose(grad, growth, rtol=1e-6, atol=1e-12)
    assert np.all(grad >= 0)


def test_expected_mse_closed_form_by_monte_carlo():
    """E‖x_τ - x₀‖²/d for x₀ of power c_x matches (1-√ᾱ)² c_x + (1-ᾱ)."""
    rng = np.random.default_rng(0)
    cx = 0.7
    x0 = rng.standard_normal(200_000) * np.sqrt(cx)
    noise = rng.standard_normal(x0.size)
    for alpha_bar in (0.99, 0.5, 0.01):
        x_t = np.sqrt(alpha_bar) * x0 + np.sqrt(1 - alpha_bar) * noise
        measured = np.mean((x_t - x0) ** 2)
        assert measured == pytest.approx(expected_mse(np.array([alpha_bar]), cx)[0], rel=0.02)


def test_score_curve_parts():
    curve = importance_score(alphas_cumprod(LINEAR), lam=0.01, cx=1.0)
    assert curve.num_train_timesteps == 1000
    np.testing.assert_array_equal(curve.timesteps, np.arange(1000))
    assert curve.grad_term.max() == pytest.approx(1.0)
    np.testing.assert_allclose(curve.snr_term, 0.01 * log_snr(alphas_cumprod(LINEAR)))
    np.testing.assert_allclose(curve.score, curve.grad_term + curve.snr_term)
    assert curve.max_score == curve.score.max()
    assert (curve.lam, curve.cx) == (0.01, 1.0)
    normalised = curve.normalised()
    assert normalised.min() == 0.0 and normalised.max() == 1.0
    with pytest.raises(ValueError):
        curve.score[0] = 1.0  # read-only arrays in a frozen value


@pytest.mark.parametrize("lam", [float("nan"), float("inf"), -float("inf"), "x"])
def test_bad_lam_is_refused(lam):
    with pytest.raises(ValueError, match=r"lam.*finite.*got (nan|inf|-inf|'x')"):
        importance_score(alphas_cumprod(LINEAR), lam=lam)
    with pytest.raises(ValueError):
        check_lam(lam)


@pytest.mark.parametrize("cx", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_cx_is_refused(cx):
    with pytest.raises(ValueError, match=r"cx.*\(0, inf\).*got"):
        importance_score(alphas_cumprod(LINEAR), lam=0.01, cx=cx)
    with pytest.raises(ValueError, match=str(cx)):
        check_cx(cx)
