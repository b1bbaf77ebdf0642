"""Noise schedules and the Divide importance score (docs/method.md §1).

Everything here is float64 numpy: a scheduler config in, arrays and a frozen `ScoreCurve`
out. The diffusers scheduler objects compute the same schedule in float32; we recompute
it in float64 (as facebookresearch/DiT does) so the stage boundaries do not depend on
float32 round-off. The tests check agreement with `DDPMScheduler(**config).alphas_cumprod`.

Forward process, with model timestep τ = 0..T-1 (Ho et al. 2020, eq. 4):

    x_τ = √ᾱ(τ) x₀ + √(1-ᾱ(τ)) ε,        ᾱ(τ) = Π_{s≤τ} (1 - β_s)

| code name          | symbol            | meaning                                             |
|--------------------|-------------------|-----------------------------------------------------|
| `alphas_cumprod`   | ᾱ(τ)              | cumulative product of (1 - β); ᾱ(-1) := 1           |
| `snr`              | SNR(τ)            | ᾱ / (1 - ᾱ)                                         |
| `log_snr`          | ln SNR(τ)         | natural log of the above                            |
| `cx`               | c_x               | E‖x₀‖² / d, mean power of one clean-latent element  |
| `expected_mse`     | E[MSE(τ)]         | (1 - √ᾱ)² c_x + (1 - ᾱ)                     (eq. 1.1) |
| `learning_speed`   | Grad(τ)           | E[MSE(τ)] - E[MSE(τ-1)]                     (eq. 1.2) |
| `lam`              | λ                 | weight of the ln SNR term                           |
| `importance_score` | score(τ)          | Grad(τ) / max Grad + λ ln SNR(τ)            (eq. 1.3) |

Equation numbers (1.1)-(1.3) are those of docs/method.md §1.
"""

from __future__ import annotations

from mosaic_core.limits import shown

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
COSINE_MAX_BETA = 0.999  # diffusers' cap on β for squaredcos_cap_v2 (betas_for_alpha_bar)

# diffusers' DDPMScheduler defaults, used for keys a config leaves out.
_DEFAULT_NUM_TRAIN_TIMESTEPS = 1000
_DEFAULT_BETA_START = 0.0001
_DEFAULT_BETA_END = 0.02
_DEFAULT_BETA_SCHEDULE = "linear"


MAX_ABS_LAM = 1e6  # the CLI's range too; beyond it λ·ln SNR only overflows, the ordering is long settled


def check_lam(lam: float) -> float:
    """Return λ as a float, or raise ValueError when it is not a finite number."""
    try:
        value = float(lam)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"lam (λ) must be a finite number, got {shown(lam)}") from None
    if not math.isfinite(value) or abs(value) > MAX_ABS_LAM:
        raise ValueError(f"lam (λ) must be a finite number in [-1e6, 1e6] (0.01 recommended), got {value}")
    return value


def check_cx(cx: float) -> float:
    """Return c_x as a float, or raise ValueError when it is not finite and > 0."""
    try:
        value = float(cx)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"cx (c_x) must be a finite number > 0, got {shown(cx)}") from None
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"cx (c_x) must be a finite number in (0, inf), 1.0 as fallback, got {value}")
    return value


def _cosine_betas(num_train_timesteps: int) -> np.ndarray:
    """β of the Glide cosine schedule (Nichol & Dhariwal 2021, eq. 17), capped at 0.999.

    ᾱ(t) = cos²((t + 0.008) / 1.008 · π/2),  β_i = min(1 - ᾱ((i+1)/T) / ᾱ(i/T), 0.999).
    """
    steps = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    alpha_bar = np.cos((steps + 0.008) / 1.008 * np.pi / 2) ** 2
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], COSINE_MAX_BETA)


def betas(scheduler_config: Mapping[str, Any]) -> np.ndarray:
    """β_τ (float64, length T) of a diffusers scheduler config.

    Supports `trained_betas` (taken as given) and `beta_schedule` in linear,
    scaled_linear (linear in √β, Stable Diffusion's) and squaredcos_cap_v2 (cosine).
    Raises ValueError for anything else, naming the value and the allowed choices.
    """
    config = dict(scheduler_config)
    if config.get("rescale_betas_zero_snr"):
        raise ValueError(
            "rescale_betas_zero_snr=True is not supported: its last timestep has SNR = 0 "
            "(ln SNR = -inf), so the importance score is undefined there"
        )
    trained = config.get("trained_betas")
    if trained is not None:
        values = np.asarray(trained, dtype=np.float64).reshape(-1)
        if values.size < 2 or not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values >= 1):
            raise ValueError(
                f"trained_betas must be at least 2 finite values in [0, 1), got {values.size} values "
                f"in [{values.min() if values.size else 'n/a'}, {values.max() if values.size else 'n/a'}]"
            )
        return values
    num_train = int(config.get("num_train_timesteps", _DEFAULT_NUM_TRAIN_TIMESTEPS))
    if num_train < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train}")
    kind = config.get("beta_schedule", _DEFAULT_BETA_SCHEDULE)
    start = float(config.get("beta_start", _DEFAULT_BETA_START))
    end = float(config.get("beta_end", _DEFAULT_BETA_END))
    if kind == "linear":
        values = np.linspace(start, end, num_train, dtype=np.float64)
    elif kind == "scaled_linear":
        values = np.linspace(start**0.5, end**0.5, num_train, dtype=np.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        return _cosine_betas(num_train)
    else:
        raise ValueError(f"unsupported beta_schedule '{kind}': choose one of {', '.join(BETA_SCHEDULES)} or give trained_betas")
    if not (np.all(np.isfinite(values)) and values.min() >= 0.0 and values.max() < 1.0):
        raise ValueError(f"beta_start and beta_end must give betas in [0, 1), got beta_start={start}, beta_end={end}")
    return values


def alphas_cumprod(scheduler_config: Mapping[str, Any]) -> np.ndarray:
    """ᾱ(τ) = Π_{s≤τ} (1 - β_s) for τ = 0..T-1, float64 (equals diffusers' to ~1e-7)."""
    return np.cumprod(1.0 - betas(scheduler_config))


def snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """SNR(τ) = ᾱ(τ) / (1 - ᾱ(τ)), the signal-to-noise ratio of x_τ."""
    alpha_bar = np.asarray(alphas_cumprod, dtype=np.float64)
    return alpha_bar / (1.0 - alpha_bar)


def log_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """ln SNR(τ) = ln ᾱ(τ) - ln(1 - ᾱ(τ)) (computed in that form for accuracy near ᾱ=1)."""
    alpha_bar = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.log(alpha_bar) - np.log1p(-alpha_bar)


def expected_mse(alphas_cumprod: np.ndarray, cx: float = 1.0) -> np.ndarray:
    """E[MSE(τ)] = (1 - √ᾱ(τ))² c_x + (1 - ᾱ(τ))   (docs/method.md §1, eq. 1.1).

    The expected per-element squared distance between x_τ and x₀ when x₀ has mean power
    c_x and is independent of the unit Gaussian noise ε.
    """
    cx = check_cx(cx)
    alpha_bar = np.asarray(alphas_cumprod, dtype=np.float64)
    return (1.0 - np.sqrt(alpha_bar)) ** 2 * cx + (1.0 - alpha_bar)


def learning_speed(alphas_cumprod: np.ndarray, cx: float = 1.0) -> np.ndarray:
    """Grad(τ) = E[MSE(τ)] - E[MSE(τ-1)], with ᾱ(-1) := 1   (docs/method.md §1, eq. 1.2).

    In closed form Grad(τ) = (δ + 2(√ᾱ(τ-1) - √ᾱ(τ))) c_x - δ with δ = ᾱ(τ) - ᾱ(τ-1),
    which is what is computed here (no cancellation between two nearly equal E[MSE]).
    Grad ≥ 0 for every non-increasing ᾱ: the paper's "learning speed" proxy.
    """
    cx = check_cx(cx)
    alpha_bar = np.asarray(alphas_cumprod, dtype=np.float64)
    previous = np.concatenate(([1.0], alpha_bar[:-1]))  # ᾱ(τ-1), ᾱ(-1) := 1
    delta = alpha_bar - previous
    return (delta + 2.0 * (np.sqrt(previous) - np.sqrt(alpha_bar))) * cx - delta


@dataclass(frozen=True, eq=False)
class ScoreCurve:
    """The importance score over all T model timesteps (docs/method.md §1, eq. 1.3).

    score(τ) = grad_term(τ) + snr_term(τ),  grad_term = Grad(τ) / max_τ Grad,
    snr_term = λ ln SNR(τ). Arrays are float64 of length T, indexed by τ.
    """

    timesteps: np.ndarray
    grad_term: np.ndarray
    snr_term: np.ndarray
    score: np.ndarray
    lam: float
    cx: float
    max_score: float

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of model timesteps."""
        return int(self.score.shape[0])

    @property
    def argmax(self) -> int:
        """The timestep τ* of the highest score."""
        return int(np.argmax(self.score))

    def normalised(self) -> np.ndarray:
        """The score mapped affinely onto [0, 1] over all T timesteps (0 = lowest)."""
        low = float(self.score.min())
        span = float(self.score.max()) - low
        if span <= 0.0:
            return np.ones_like(self.score)
        return (self.score - low) / span


def importance_score(alphas_cumprod: np.ndarray, lam: float = 0.01, cx: float = 1.0) -> ScoreCurve:
    """score(τ) = Grad(τ) / max Grad + λ ln SNR(τ)   (docs/method.md §1, eq. 1.3; normalisation ours).

    Grad is `learning_speed` (eq. 1.2). Dividing by its maximum puts the Grad term on
    [0, 1] whatever c_x and T are, so that λ means the same for every schedule.
    Raises ValueError when λ is not finite or c_x is not finite and > 0.
    """
    lam = check_lam(lam)
    cx = check_cx(cx)
    alpha_bar = np.asarray(alphas_cumprod, dtype=np.float64)
    if alpha_bar.ndim != 1 or alpha_bar.size < 2:
        raise ValueError(f"alphas_cumprod must be a 1-D array of length >= 2, got shape {alpha_bar.shape}")
    if not (np.all(alpha_bar > 0.0) and np.all(alpha_bar < 1.0)):
        raise ValueError(
            f"alphas_cumprod must lie in (0, 1) so that ln SNR is finite, got "
            f"[{alpha_bar.min()}, {alpha_bar.max()}]"
        )
    grad = learning_speed(alpha_bar, cx)  # 1. Grad(τ), eq. 1.2
    max_grad = float(grad.max())
    if not max_grad > 0.0:
        raise ValueError("the schedule never adds noise (max Grad <= 0): all betas are 0")
    grad_term = grad / max_grad  # 2. normalised learning speed, in [0, 1]
    snr_term = lam * log_snr(alpha_bar)  # 3. λ ln SNR(τ)
    score = grad_term + snr_term  # 4. eq. 1.3
    for array in (grad_term, snr_term, score):
        array.setflags(write=False)
    timesteps = np.arange(alpha_bar.size)
    timesteps.setflags(write=False)
    return ScoreCurve(
        timesteps=timesteps,
        grad_term=grad_term,
        snr_term=snr_term,
        score=score,
        lam=lam,
        cx=cx,
        max_score=float(score.max()),
    )
