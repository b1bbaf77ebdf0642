"""Sampling any family's denoiser with classifier-free guidance and any diffusers scheduler.

`sample_steps` is a generator that yields one `StepEvent` per denoising step (step index,
timestep, seconds of that step, the current latents and predicted x₀) and returns a
`SampleResult`; `sample` runs it to the end. Callers get progress bars, previews and per-step
timing for free (the facebookresearch/DiT style).

Determinism: image i's initial noise is drawn from its own generator seeded with
(seed, i), so an image does not change with the batch size or with the other labels, and a
dense and a pruned model given the same seed start from identical noise. Stochastic
samplers (DDPM) draw their per-step noise from per-image generators in the same way.

Classifier-free guidance (Ho & Salimans 2022, eq. 6), with the condition's null ∅ (the
null label num_classes for class labels; the family adapter's null for other conditions,
e.g. zero prompt embeddings for SDXL):
    ε̂ = ε(x, ∅) + g · (ε(x, c) − ε(x, ∅))
g = 1 runs only the conditional branch; otherwise each call doubles the batch [x, x].

Flow-matching samplers (`flow-euler`, `flow-euler-1/n`; docs/method.md §8.7) drive
diffusers' `FlowMatchEulerDiscreteScheduler`: the model predicts the velocity
v = ε − x₀, guided the same way, and x̂₀ = x_σ − σ v. The denoiser receives the scheduler's
t = σ·T times its family adapter's `timestep_scale` (1 for SD3, 1/1000 for Flux).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Mapping, Sequence

import numpy as np
import torch

from mosaic_core import limits
from mosaic_core.jobs import run_to_end  # noqa: F401  (re-exported: callers import it from here)
from mosaic_core.models.samplers import (
    DEFAULT_SCHEDULER,
    FLOW_SAMPLERS,
    check_drop_steps,
    check_num_steps,
    check_sampler_fits,
    check_scheduler_name,
    kept_step_indices,
    make_scheduler,
    set_sampler_timesteps,
)

MAX_GUIDANCE = 20.0
MAX_BATCH = 4096


@dataclass(frozen=True)
class SampleConfig:
    """How to sample: sampler, step count, guidance scale, seed. Validated on creation."""

    num_inference_steps: int = 50
    guidance_scale: float = 1.5
    scheduler: str = DEFAULT_SCHEDULER
    seed: int = 0
    # of the N steps, drop this many evenly and jump DDIM over them (`kept_step_indices`; docs/method.md §4.6)
    drop_steps: int = 0

    def __post_init__(self) -> None:
        check_num_steps(self.num_inference_steps)
        object.__setattr__(self, "scheduler", check_scheduler_name(self.scheduler))
        object.__setattr__(self, "drop_steps", check_drop_steps(self.drop_steps, int(self.num_inference_steps), self.scheduler))
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or not 0.0 <= g <= MAX_GUIDANCE:
            raise ValueError(f"guidance scale (cfg) must be a finite number in [0, {MAX_GUIDANCE:g}], got {limits.shown(g)}")
        seed = self.seed
        if (
            isinstance(seed, bool)
            or not isinstance(seed, (int, float))
            or (isinstance(seed, float) and not (math.isfinite(seed) and seed.is_integer()))
            or not 0 <= seed < 2**31
        ):
            raise ValueError(f"seed must be a whole number in [0, 2^31), got {limits.shown(seed)}")
        object.__setattr__(self, "seed", int(seed))


@dataclass(frozen=True)
class StepEvent:
    """One finished denoising step."""

    step: int  # 0-based
    num_steps: int
    timestep: float
    seconds: float
    latents: torch.Tensor = field(repr=False)
    pred_original: torch.Tensor | None = field(default=None, repr=False)  # x̂₀ of this step (see sample_steps)


@dataclass(frozen=True)
class SampleResult:
    """Images (uint8 N×H×W×C), their labels, the visited timesteps and per-step seconds."""

    images: np.ndarray
    labels: np.ndarray
    timesteps: np.ndarray
    step_seconds: np.ndarray
    decode_seconds: float

    @property
    def total_seconds(self) -> float:
        return float(self.step_seconds.sum() + self.decode_seconds)


def check_labels(labels: Sequence[int] | np.ndarray | torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class labels as a LongTensor, or ValueError naming a bad id and the allowed range."""
    values = torch.as_tensor(np.asarray(labels)).reshape(-1)
    if values.numel() == 0:
        raise ValueError("at least one class label is needed")
    if values.numel() > MAX_BATCH:
        raise ValueError(f"at most {MAX_BATCH} images per call, got {values.numel()}")
    if values.is_floating_point() and not torch.equal(values, values.round()):
        raise ValueError(f"class labels must be whole numbers, got {values.tolist()[:8]}")
    values = values.long()
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.numel():
        raise ValueError(f"class id {int(bad[0])} is out of range: allowed 0..{num_classes - 1}")
    return values


def initial_noise(num_images: int, shape: tuple[int, ...], seed: int, offset: int = 0) -> torch.Tensor:
    """N×shape float32 noise on CPU; image i comes from its own generator (seed, offset + i)."""
    noise = torch.empty((num_images,) + tuple(shape))
    for i in range(num_images):
        generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + offset + i)
        noise[i] = torch.randn(shape, generator=generator)
    return noise


def labels_for(num_images: int, num_classes: int) -> np.ndarray:
    """The `sample` command's labels: image i gets class i mod num_classes."""
    return np.arange(num_images) % num_classes


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _denoise(model, x: torch.Tensor, t: torch.Tensor, condition, null, g: float, rows_t: torch.Tensor | None = None) -> torch.Tensor:
    """One guided ε prediction. x: N×C×H×W; condition, null: N samples each (adapters' conditions).
    `rows_t`, if given, is the call's per-row timestep tensor itself (a `TrajectoryConditioning`'s)."""
    from mosaic_core.models.adapters import concat_conditions
    from mosaic_core.models.adapters.base import denoiser_adapter

    adapter = denoiser_adapter(model)  # the family's input form: packed tokens, timestep units

    def call(inputs: torch.Tensor, timestep: torch.Tensor, **kwargs):  # N×C×H×W in and out
        timestep = rows_t if rows_t is not None and rows_t.shape[0] == inputs.shape[0] else timestep
        out = model(adapter.pack_latents(inputs), timestep=adapter.model_timestep(timestep), **kwargs)
        return type(out)(sample=adapter.unpack_latents(out.sample, inputs))

    channels = x.shape[1]
    if g == 1.0:
        out = call(x, timestep=t.expand(x.shape[0]), **condition.model_kwargs()).sample
        return out[:, :channels]  # learned-σ models output 2C channels: keep ε
    if g == 0.0:
        out = call(x, timestep=t.expand(x.shape[0]), **null.model_kwargs()).sample
        return out[:, :channels]
    both = torch.cat([x, x])  # 2N×C×H×W
    out = call(both, timestep=t.expand(both.shape[0]), **concat_conditions(condition, null).model_kwargs()).sample
    eps_cond, eps_uncond = out[:, :channels].chunk(2)
    return eps_uncond + g * (eps_cond - eps_uncond)


def is_compiled(model: torch.nn.Module) -> bool:
    """Whether `model` or any module inside it runs through `torch.compile` (`torch.compile(m)`
    or `m.compile()`). Such a model samples without `TrajectoryConditioning`: TorchDynamo
    guards on the identity of the table's per-step timestep tensors, so every step would
    compile a new graph until the recompile limit (8) sent the rest back to eager."""
    from torch._dynamo.eval_frame import OptimizedModule

    return any(isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def _trajectory_conditioning(model, timesteps, condition, null, g: float, device: torch.device):
    """The `TrajectoryConditioning` of the calls `_denoise` will make, or None (nothing to precompute)."""
    from mosaic_core.conquer.conditioning import TrajectoryConditioning
    from mosaic_core.models.adapters import concat_conditions
    from mosaic_core.models.adapters.base import denoiser_adapter

    call_condition = condition if g == 1.0 else null if g == 0.0 else concat_conditions(condition, null)
    labels = call_condition.model_kwargs().get("class_labels")
    if labels is None or len(timesteps) == 0:
        return None
    if denoiser_adapter(model).timestep_scale != 1.0:  # the network would get t · scale, a new tensor
        return None
    if is_compiled(model):  # the table's lookup by tensor identity would recompile the graph every step
        return None
    rows = labels.shape[0]
    per_call = torch.stack([t.to(device).expand(rows) for t in timesteps])
    table = TrajectoryConditioning(model, per_call, labels)
    return table if table else None


def _pred_original(scheduler, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, clip: float | None) -> torch.Tensor:
    """x̂₀ = (x_t − √(1−ᾱ) ε̂) / √ᾱ at the rounded timestep (for samplers that do not report it)."""
    alphas = scheduler.alphas_cumprod
    index = int(min(max(math.floor(float(t) + 0.5), 0), alphas.numel() - 1))
    a = alphas[index].to(device=x_t.device, dtype=torch.float32)
    x0 = (x_t.float() - torch.sqrt(1 - a) * eps.float()) / torch.sqrt(a)
    return x0 if clip is None else x0.clamp(-clip, clip)


def _flow_pred_original(x_t: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x̂₀ = x_σ − σ v: from x_σ = (1 − σ) x₀ + σ ε and v = ε − x₀ (docs/method.md eq. 8.9)."""
    return x_t.float() - sigma.to(device=x_t.device, dtype=torch.float32) * velocity.float()


def _ddim_jumps(scheduler, kept: Sequence[int]) -> list[int]:
    """The timestep each kept step of a DDIM schedule lands on: the next kept one; the last kept
    step (always the schedule's last) lands where DDIM's own last step does, t − T/N."""
    config = scheduler.config
    if config.prediction_type != "epsilon" or config.thresholding:
        raise ValueError(
            f"dropping steps jumps DDIM for ε-predicting models without thresholding; this schedule has "
            f"prediction_type '{config.prediction_type}', thresholding {config.thresholding}"
        )
    timesteps = [int(t) for t in scheduler.timesteps]
    last = timesteps[-1] - config.num_train_timesteps // scheduler.num_inference_steps
    return [timesteps[kept[k + 1]] if k + 1 < len(kept) else last for k in range(len(kept))]


@dataclass(frozen=True)
class _Jump:
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def _ddim_jump(scheduler, eps: torch.Tensor, t: torch.Tensor, to: int, x: torch.Tensor) -> _Jump:
    """One deterministic DDIM update (η = 0) from t straight to `to` (Song et al. 2021, eq. 12):
    x̂₀ = (x − √(1−ᾱ_t) ε̂) / √ᾱ_t, clipped as the scheduler clips; x_to = √ᾱ_to x̂₀ + √(1−ᾱ_to) ε̂,
    with ᾱ past t = 0 the scheduler's `final_alpha_cumprod`. Where `to` is DDIM's own next step
    this is the scheduler's `step` (tests/test_drop_steps.py holds them equal)."""
    alphas = scheduler.alphas_cumprod
    a = alphas[int(t)]
    a_to = alphas[to] if to >= 0 else scheduler.final_alpha_cumprod
    x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
    if scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)
    return _Jump(a_to**0.5 * x0 + (1 - a_to) ** 0.5 * eps, x0)


def vae_shift(vae) -> float:
    """The VAE's latent mean (`shift_factor`; SD3 and Flux VAEs have one, SD/SDXL's none → 0)."""
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


def decode_images(latents: torch.Tensor, vae=None) -> np.ndarray:
    """Model-space samples -> uint8 N×H×W×C images. Pixels in [-1, 1], or latents via the VAE:
    z / scaling_factor + shift_factor, as diffusers' pipelines decode (the inverse of encoding)."""
    with torch.no_grad():
        if vae is not None:
            latents = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + vae_shift(vae)).sample
        pixels = ((latents.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()  # N×C×H×W -> N×H×W×C


def sample_steps(
    model: torch.nn.Module,
    scheduler_config: Mapping[str, Any],
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    config: SampleConfig = SampleConfig(),
    *,
    num_classes: int,
    sample_shape: tuple[int, int, int],
    vae=None,
    noise: torch.Tensor | None = None,
    should_stop: Callable[[], bool] | None = None,
    index_offset: int = 0,
    image_seq_len: int | None = None,
    precompute_conditioning: bool = True,
) -> Generator[StepEvent, None, SampleResult]:
    """Sample images for `labels`, yielding a `StepEvent` per step; returns a `SampleResult`.

    `labels` are class ids (checked against `num_classes`) or a family's condition object
    (`mosaic_core.models.adapters`, e.g. SDXL's `TextCondition` from `encode_prompts`);
    the result's `labels` are then -1 (no class).

    `sample_shape` is (C, H, W) of the model's input; `noise`, if given, replaces the seeded
    initial noise (N×C×H×W). `should_stop` is polled between steps; stopping raises
    `mosaic_core.jobs.Cancelled`. `index_offset` is the global index of the first image:
    image j of this call draws its noise as image `index_offset + j` of the whole run, so a
    run split into batches (or over processes) gives the images of one call.
    `image_seq_len` (image tokens per sample) sets μ of a dynamically shifted flow schedule.
    With `precompute_conditioning` (the default), a class-conditioned DiT's per-block adaLN
    embedding and modulation of all steps run as one batched call inside step 0's time
    (`conditioning.TrajectoryConditioning`; same values, less time per call); not for a model
    that runs through `torch.compile` (`is_compiled`), which computes it inside its graph.

    Every event carries x̂₀, the step's prediction of the clean sample: the scheduler's own
    `pred_original_sample` when it gives one (DDIM, DDPM, Euler); otherwise (DPM-Solver)
    x̂₀ = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t (Ho et al. 2020, eq. 15) from the guided ε̂, with ᾱ at the
    rounded timestep, clipped like DDIM/DDPM clip theirs when the schedule clips samples;
    for the flow samplers x̂₀ = x_σ − σ v (docs/method.md eq. 8.9).
    """
    from mosaic_core.jobs import Cancelled
    from mosaic_core.models.adapters import ClassCondition, move_condition

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if hasattr(labels, "model_kwargs"):
        condition = move_condition(labels, device, dtype)
        y = torch.full((condition.batch_size,), -1, dtype=torch.long)
    else:
        y = check_labels(labels, num_classes)
        condition = ClassCondition(y.to(device), num_classes)
    if config.guidance_scale != 1.0 and not getattr(condition, "unconditional", True):
        raise ValueError(
            f"cfg (guidance scale) must be 1 for this model, got {config.guidance_scale:g}: Flux is guidance-distilled, "
            "with no unconditional branch to guide against (FLUX.1-dev is fed FluxPipeline's distilled guidance 3.5)"
        )
    check_sampler_fits(config.scheduler, scheduler_config)
    flow = config.scheduler in FLOW_SAMPLERS
    scheduler = make_scheduler(config.scheduler, scheduler_config)
    set_sampler_timesteps(scheduler, config.scheduler, scheduler_config, config.num_inference_steps, image_seq_len)
    if flow:
        scheduler.set_begin_index(0)  # step k uses σ_k, σ_{k+1} (as diffusers' flow pipelines do)
    if noise is None:
        noise = initial_noise(len(y), sample_shape, config.seed, index_offset)
    elif tuple(noise.shape) != (len(y),) + tuple(sample_shape):
        raise ValueError(f"noise must have shape {(len(y),) + tuple(sample_shape)}, got {tuple(noise.shape)}")
    x = (noise * getattr(scheduler, "init_noise_sigma", 1.0)).to(device=device, dtype=dtype)  # flow: x at σ = 1 is ε
    null = condition.null()
    # DDPM's per-step noise: one generator per image too, so images stay batch-independent.
    step_generators = [
        torch.Generator().manual_seed(int(config.seed) * 1_000_003 + 500_009 + index_offset + i) for i in range(len(y))
    ]
    seconds = []
    timesteps = scheduler.timesteps
    jumps = None
    if config.drop_steps:  # a subset of the reference timesteps; each kept step jumps to the next kept one
        kept = kept_step_indices(len(timesteps), config.drop_steps)
        jumps = _ddim_jumps(scheduler, kept)
        timesteps = timesteps[kept]
    clip = float(scheduler_config.get("clip_sample_range", 1.0)) if scheduler_config.get("clip_sample") else None
    table = _trajectory_conditioning(model, timesteps, condition, null, config.guidance_scale, device) if precompute_conditioning else None
    with torch.no_grad(), table if table is not None else contextlib.nullcontext():
        for i, t in enumerate(timesteps):
            if should_stop is not None and should_stop():
                raise Cancelled("sampling cancelled")
            _synchronize(device)
            start = time.perf_counter()
            if table is not None and i == 0:
                table.precompute()  # the whole trajectory's conditioning, timed as part of step 0
            # 1. Scale the input (Euler, DPM need it; identity for DDIM/DDPM; flow schedulers have none).
            model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            # 2. Guided ε (flow: v) prediction at this timestep (`_denoise` hands the denoiser t in its
            #    family's units, t · timestep_scale, and its packed input form).
            rows_t = None if table is None else table.call_timesteps[i]
            eps = _denoise(model, model_input, t.to(device), condition, null, config.guidance_scale, rows_t)
            sigma = scheduler.sigmas[i] if flow else None  # σ of this step, before the update
            # 3. Scheduler update x_t -> x_{t-1} (DDPM draws its noise per image).
            kwargs = {"generator": step_generators} if config.scheduler == "ddpm" else {}
            out = scheduler.step(eps, t, x, **kwargs) if jumps is None else _ddim_jump(scheduler, eps, t, jumps[i], x)
            x = out.prev_sample.to(dtype)
            _synchronize(device)
            seconds.append(time.perf_counter() - start)
            pred_original = getattr(out, "pred_original_sample", None)
            if pred_original is None and flow:
                pred_original = _flow_pred_original(model_input, eps, sigma)
            elif pred_original is None:
                pred_original = _pred_original(scheduler, model_input, eps, t, clip)
            yield StepEvent(i, len(timesteps), float(t), seconds[-1], x, pred_original)
    _synchronize(device)
    start = time.perf_counter()
    images = decode_images(x, vae)
    decode_seconds = time.perf_counter() - start
    return SampleResult(
        images=images,
        labels=y.cpu().numpy(),
        timesteps=np.asarray(timesteps, dtype=np.float64),
        step_seconds=np.asarray(seconds),
        decode_seconds=decode_seconds,
    )


def sample(model, scheduler_config, labels, config: SampleConfig = SampleConfig(), **kwargs) -> SampleResult:
    """Plain call: run `sample_steps` to the end and return the `SampleResult`."""
    return run_to_end(sample_steps(model, scheduler_config, labels, config, **kwargs))


def sample_loaded(loaded, labels, config: SampleConfig = SampleConfig(), transformer=None, **kwargs):
    """`sample_steps` for a `LoadedModel` (optionally with another transformer, e.g. a staged one)."""
    spec = loaded.spec
    return sample_steps(
        transformer if transformer is not None else loaded.transformer,
        loaded.scheduler_config,
        labels,
        config,
        num_classes=spec.num_classes,
        sample_shape=(spec.in_channels, spec.sample_size, spec.sample_size),
        vae=loaded.vae,
        **{"image_seq_len": getattr(spec, "image_seq_len", None), **kwargs},
    )
