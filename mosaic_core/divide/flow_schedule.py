"""Flow-matching schedules and their Divide importance score (docs/method.md §8).

SD3 and Flux noise a clean latent by a straight line to the noise (rectified flow):

    x_σ = (1 − σ) x₀ + σ ε,        σ ∈ [0, 1],  ε ~ N(0, I) independent of x₀      (eq. 8.1)

and diffusers' `FlowMatchEulerDiscreteScheduler` hands the transformer the timestep
t = σ · T (T = `num_train_timesteps`, 1000). The sampler steps uniformly in an unshifted
time u ∈ (0, 1] and maps it through a shift s:

    σ(u) = s u / (1 + (s − 1) u)                                                     (eq. 8.2)

with s = `shift` (SD3: 3.0), or, with `use_dynamic_shifting` (Flux), s = e^μ where μ is
interpolated linearly in the image token count between (base_image_seq_len, base_shift)
and (max_image_seq_len, max_shift) (eq. 8.3; `time_shift_type="linear"` uses s = μ).

Everything here is float64 numpy, pure: a scheduler config in, arrays and frozen
dataclasses out. The score curve is a `noise_schedule.ScoreCurve` over the integer
scheduler timesteps t = 0 … T−1 (σ = t/T), so `stages.divide_stages`, the allocation and
`stages.stage_of_timesteps` work on it unchanged; stage bounds are in the units the
scheduler's `timesteps` (and SD3's transformer) use.

| code name             | symbol       | meaning                                                   |
|-----------------------|--------------|-----------------------------------------------------------|
| `sigmas`              | σ(t)         | noise fraction at scheduler timestep t: t/T (t = 0: ½/T)  |
| `shift`               | s            | the effective shift (static, e^μ, or μ)                   |
| `mu`                  | μ            | dynamic-shift exponent from the image token count (8.3)   |
| `image_seq_len`       | n            | image tokens per sample                                   |
| `cx`                  | c_x          | E‖x₀‖²/d                                                  |
| `flow_expected_mse`   | E[MSE(σ)]    | σ² (1 + c_x)                                      (eq. 8.4) |
| `flow_learning_speed` | Grad(σ)      | dE[MSE]/du = 2 (1 + c_x) σ (s − (s−1)σ)² / s      (eq. 8.6) |
| `flow_log_snr`        | ln SNR(σ)    | 2 ln((1 − σ)/σ)                                   (eq. 8.7) |
| `flow_importance_score` | score(t)   | Grad / max Grad + λ ln SNR                        (eq. 8.8) |

The premise behind the score (slow–fast–slow learning along the trajectory) was reported
for DDPM-trained DiTs; it has not been measured for any flow-matching model (§8.6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np

from mosaic_core.divide.noise_schedule import ScoreCurve, check_cx, check_lam
from mosaic_core.limits import shown

FLOW_SCHEDULER_CLASSES = ("FlowMatchEulerDiscreteScheduler",)
TIME_SHIFT_TYPES = ("exponential", "linear")
# Options of FlowMatchEulerDiscreteScheduler that change σ(u) away from eq. 8.2; the Divide
# math for flow matching does not model them, so a config that sets one is refused.
UNSUPPORTED_OPTIONS = ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling")

# diffusers' FlowMatchEulerDiscreteScheduler defaults, for keys a config leaves out.
_DEFAULTS = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}
MAX_IMAGE_SEQ_LEN = 1 << 20


def is_flow_matching(scheduler_config: Mapping[str, Any]) -> bool:
    """True when the scheduler config is a flow-matching one (its `_class_name`)."""
    return dict(scheduler_config).get("_class_name") in FLOW_SCHEDULER_CLASSES


def _number(config: Mapping[str, Any], key: str) -> float:
    value = config.get(key, _DEFAULTS[key])
    if value is None:
        value = _DEFAULTS[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"flow-matching scheduler config: '{key}' must be a finite number, got {shown(value)}")
    return float(value)


def uses_dynamic_shifting(scheduler_config: Mapping[str, Any]) -> bool:
    """True when σ is shifted by the image token count (Flux's `use_dynamic_shifting`)."""
    return bool(dict(scheduler_config).get("use_dynamic_shifting", False))


def check_flow_config(scheduler_config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as a dict, or ValueError naming a field the Divide math cannot model."""
    config = dict(scheduler_config)
    for key in UNSUPPORTED_OPTIONS:
        if config.get(key):
            raise ValueError(
                f"flow-matching scheduler config sets '{key}': not supported by the Divide math "
                f"(only σ = s·u/(1+(s−1)·u) with a static or dynamic shift); unset it"
            )
    num_train = config.get("num_train_timesteps", _DEFAULTS["num_train_timesteps"])
    if isinstance(num_train, bool) or not isinstance(num_train, int) or not 2 <= num_train <= 100_000:
        raise ValueError(f"num_train_timesteps must be a whole number in [2, 100000], got {shown(num_train)}")
    if not _number(config, "shift") > 0:
        raise ValueError(f"shift must be > 0, got {config.get('shift')}")
    kind = config.get("time_shift_type", _DEFAULTS["time_shift_type"])
    if kind not in TIME_SHIFT_TYPES:
        raise ValueError(f"time_shift_type must be one of {', '.join(TIME_SHIFT_TYPES)}, got {shown(kind)}")
    if uses_dynamic_shifting(config):
        low, high = _number(config, "base_image_seq_len"), _number(config, "max_image_seq_len")
        if not high > low:
            raise ValueError(f"max_image_seq_len ({high:g}) must exceed base_image_seq_len ({low:g})")
        _number(config, "base_shift"), _number(config, "max_shift")
    return config


def check_image_seq_len(image_seq_len: Any) -> int:
    """The image token count as an int, or ValueError when it is not a whole number in [1, 2^20]."""
    value = image_seq_len
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        isinstance(value, float) and not (math.isfinite(value) and value.is_integer())
    ):
        raise ValueError(f"image_seq_len (image tokens per sample) must be a whole number in [1, {MAX_IMAGE_SEQ_LEN}], got {shown(value)}")
    if not 1 <= int(value) <= MAX_IMAGE_SEQ_LEN:
        raise ValueError(f"image_seq_len (image tokens per sample) must be in [1, {MAX_IMAGE_SEQ_LEN}], got {int(value)}")
    return int(value)


def dynamic_shift_mu(scheduler_config: Mapping[str, Any], image_seq_len: int) -> float:
    """μ = base_shift + (n − base_len)·(max_shift − base_shift)/(max_len − base_len)   (eq. 8.3).

    The straight line through (base_image_seq_len, base_shift) and (max_image_seq_len,
    max_shift), evaluated at n image tokens (extrapolated outside), as the Flux and SD3
    pipelines' `calculate_shift` computes it.
    """
    config = check_flow_config(scheduler_config)
    n = check_image_seq_len(image_seq_len)
    low_len, high_len = _number(config, "base_image_seq_len"), _number(config, "max_image_seq_len")
    low_shift, high_shift = _number(config, "base_shift"), _number(config, "max_shift")
    slope = (high_shift - low_shift) / (high_len - low_len)
    return low_shift + slope * (n - low_len)


def effective_shift(scheduler_config: Mapping[str, Any], image_seq_len: Optional[int] = None) -> tuple[float, Optional[float]]:
    """(s, μ): the shift of eq. 8.2 and, with dynamic shifting, the μ it came from (else None).

    Static: s = `shift`. Dynamic: s = e^μ ("exponential", diffusers' default) or s = μ
    ("linear"), since e^μ/(e^μ + (1/u − 1)) = s u/(1 + (s − 1) u) with s = e^μ.
    Raises ValueError when dynamic shifting is on and `image_seq_len` is not given.
    """
    config = check_flow_config(scheduler_config)
    if not uses_dynamic_shifting(config):
        return _number(config, "shift"), None
    if image_seq_len is None:
        raise ValueError(
            "this scheduler shifts σ by the image size (use_dynamic_shifting): give image_seq_len, "
            "the number of image tokens per sample (e.g. 4096 for a 1024×1024 Flux image)"
        )
    mu = dynamic_shift_mu(config, image_seq_len)
    if config.get("time_shift_type", "exponential") == "linear":
        if not mu > 0:
            raise ValueError(f"a linear time shift needs μ > 0, got μ = {mu:.4g} for image_seq_len = {image_seq_len}")
        return mu, mu
    return math.exp(mu), mu


def shift_sigmas(u: np.ndarray, shift: float) -> np.ndarray:
    """σ(u) = s u / (1 + (s − 1) u)   (eq. 8.2), float64."""
    u = np.asarray(u, dtype=np.float64)
    return shift * u / (1.0 + (shift - 1.0) * u)


@dataclass(frozen=True, eq=False)
class FlowSchedule:
    """σ at every integer scheduler timestep t = 0 … T−1, and the shift the sampler uses.

    `sigmas[t] = t / T` (the noise fraction whose scheduler timestep is t), except
    `sigmas[0] = ½ / T`: at σ = 0, ln SNR is infinite, and ½ is where rounding starts to
    send a timestep to t = 0 (eq. 1.5). `shift` is the effective s of eq. 8.2 (static,
    or e^μ); `mu` and `image_seq_len` are set with dynamic shifting only.
    """

    num_train_timesteps: int
    sigmas: np.ndarray
    shift: float
    mu: Optional[float] = None
    image_seq_len: Optional[int] = None

    @property
    def timesteps(self) -> np.ndarray:
        """The integer scheduler timesteps t = 0 … T−1 the arrays are indexed by."""
        return np.arange(self.num_train_timesteps)

    def unshifted_time(self) -> np.ndarray:
        """u(σ) = σ / (s − (s − 1) σ), the inverse of eq. 8.2: where the sampler's uniform steps sit."""
        return self.sigmas / (self.shift - (self.shift - 1.0) * self.sigmas)


def flow_schedule(scheduler_config: Mapping[str, Any], image_seq_len: Optional[int] = None) -> FlowSchedule:
    """The `FlowSchedule` of a flow-matching scheduler config (docs/method.md §8.1).

    `image_seq_len` (image tokens per sample) is needed when the config uses dynamic
    shifting; it is ignored (and not recorded) otherwise.
    """
    config = check_flow_config(scheduler_config)
    num_train = int(config.get("num_train_timesteps", _DEFAULTS["num_train_timesteps"]))
    shift, mu = effective_shift(config, image_seq_len)
    sigmas = np.arange(num_train, dtype=np.float64) / num_train
    sigmas[0] = 0.5 / num_train
    sigmas.setflags(write=False)
    return FlowSchedule(
        num_train_timesteps=num_train,
        sigmas=sigmas,
        shift=float(shift),
        mu=mu,
        image_seq_len=None if mu is None else check_image_seq_len(image_seq_len),
    )


def _check_sigmas(sigmas: np.ndarray) -> np.ndarray:
    values = np.asarray(sigmas, dtype=np.float64)
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"sigmas must be a 1-D array of length >= 2, got shape {values.shape}")
    if not (np.all(values > 0.0) and np.all(values < 1.0)):
        raise ValueError(f"sigmas must lie in (0, 1) so that ln SNR is finite, got [{values.min()}, {values.max()}]")
    return values


def flow_expected_mse(sigmas: np.ndarray, cx: float = 1.0) -> np.ndarray:
    """E[MSE(σ)] = E‖x_σ − x₀‖²/d = σ² (1 + c_x)   (docs/method.md §8.2, eq. 8.4)."""
    cx = check_cx(cx)
    sigma = np.asarray(sigmas, dtype=np.float64)
    return sigma**2 * (1.0 + cx)


def flow_learning_speed(sigmas: np.ndarray, shift: float, cx: float = 1.0) -> np.ndarray:
    """Grad(σ) = dE[MSE]/du = 2 (1 + c_x) σ (s − (s − 1) σ)² / s   (docs/method.md §8.3, eq. 8.6).

    The growth of eq. 8.4 per unit of the sampler's unshifted time u (eq. 8.2), i.e. per
    sampler step up to the constant step size: dE/dσ = 2(1 + c_x)σ times dσ/du.
    """
    cx = check_cx(cx)
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift}")
    sigma = np.asarray(sigmas, dtype=np.float64)
    dsigma_du = (shift - (shift - 1.0) * sigma) ** 2 / shift
    return 2.0 * (1.0 + cx) * sigma * dsigma_du


def flow_log_snr(sigmas: np.ndarray) -> np.ndarray:
    """ln SNR(σ) = ln((1 − σ)² / σ²) = 2 (ln(1 − σ) − ln σ)   (docs/method.md §8.4, eq. 8.7)."""
    sigma = np.asarray(sigmas, dtype=np.float64)
    return 2.0 * (np.log1p(-sigma) - np.log(sigma))


def flow_importance_score(schedule: FlowSchedule, lam: float = 0.01, cx: float = 1.0) -> ScoreCurve:
    """score(t) = Grad(σ_t) / max Grad + λ ln SNR(σ_t) over t = 0 … T−1   (docs/method.md §8.5, eq. 8.8).

    The same roles as eq. 1.3: the normalised learning speed (eq. 8.6) plus λ times ln SNR
    (eq. 8.7). c_x cancels in the normalisation (eq. 8.6 is (1 + c_x) times a function of
    σ), so it is checked and recorded but does not move the curve.
    """
    lam = check_lam(lam)
    cx = check_cx(cx)
    sigma = _check_sigmas(schedule.sigmas)
    grad = flow_learning_speed(sigma, schedule.shift, cx)  # 1. Grad(σ), eq. 8.6
    grad_term = grad / float(grad.max())  # 2. normalised to [0, 1]
    snr_term = lam * flow_log_snr(sigma)  # 3. λ ln SNR, eq. 8.7
    score = grad_term + snr_term  # 4. eq. 8.8
    timesteps = np.arange(sigma.size)
    for array in (grad_term, snr_term, score, timesteps):
        array.setflags(write=False)
    return ScoreCurve(
        timesteps=timesteps,
        grad_term=grad_term,
        snr_term=snr_term,
        score=score,
        lam=lam,
        cx=cx,
        max_score=float(score.max()),
    )
