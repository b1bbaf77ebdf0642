"""The engine's flow-matching sampler equals stepping diffusers' FlowMatchEulerDiscreteScheduler by hand.

The denoiser is a tiny random `SD3Transformer2DModel` built from a config; its condition is a
test-local dataclass (prompt embeddings and pooled embeddings, zeros for CFG's null), so
these tests need no family adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from mosaic_core.conquer.sampling import SampleConfig, initial_noise, sample_steps

SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_LIKE = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
SHAPE = (4, 8, 8)  # C, H, W of the latents
TOKENS = (8 // 2) * (8 // 2)  # image tokens at patch size 2


def tiny_sd3(seed: int = 0, cls=None):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    cls = cls or SD3Transformer2DModel
    model = cls(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        pos_embed_max_size=16,
    )
    with torch.no_grad():  # SD3 zero-initialises nothing that matters here, but make the output layer lively
        for parameter in model.proj_out.parameters():
            parameter.normal_(0, 0.2, generator=torch.Generator().manual_seed(seed + 1))
    return model.eval()


@dataclass(frozen=True)
class PromptCondition:
    """A test-only text condition: the fields SD3's forward takes, batch first."""

    encoder_hidden_states: torch.Tensor
    pooled_projections: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.encoder_hidden_states.shape[0])

    def model_kwargs(self) -> dict:
        return {"encoder_hidden_states": self.encoder_hidden_states, "pooled_projections": self.pooled_projections}

    def null(self) -> "PromptCondition":
        return PromptCondition(torch.zeros_like(self.encoder_hidden_states), torch.zeros_like(self.pooled_projections))


def _condition(batch: int) -> PromptCondition:
    generator = torch.Generator().manual_seed(7)
    return PromptCondition(torch.randn(batch, 5, 16, generator=generator), torch.randn(batch, 8, generator=generator))


def _by_hand(model, config, condition, noise, steps, guidance, *, sigmas=None, mu=None, timestep_scale=1.0):
    """diffusers' SD3 pipeline loop, written out: CFG on [uncond, cond], scheduler.step per timestep."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    kwargs = {} if mu is None else {"mu": mu}
    if sigmas is not None:
        kwargs["sigmas"] = sigmas
    scheduler.set_timesteps(steps, **kwargs)
    latents = noise.clone()
    null = condition.null()
    predictions = []
    with torch.no_grad():
        for index, t in enumerate(scheduler.timesteps):
            both = torch.cat([latents, latents])
            velocity = model(
                both,
                encoder_hidden_states=torch.cat([null.encoder_hidden_states, condition.encoder_hidden_states]),
                pooled_projections=torch.cat([null.pooled_projections, condition.pooled_projections]),
                timestep=(t * timestep_scale).expand(both.shape[0]),
            ).sample
            uncond, cond = velocity.chunk(2)
            velocity = uncond + guidance * (cond - uncond)
            predictions.append(latents - scheduler.sigmas[index] * velocity)
            latents = scheduler.step(velocity, t, latents).prev_sample
    return latents, scheduler.timesteps, predictions


def _run(model, config, condition, sampler, steps, guidance, **kwargs):
    events = []
    generator = sample_steps(
        model, config, condition, SampleConfig(steps, guidance, sampler, seed=3),
        num_classes=0, sample_shape=SHAPE, **kwargs,
    )
    while True:
        try:
            events.append(next(generator))
        except StopIteration as stop:
            return events, stop.value


def test_flow_euler_equals_stepping_the_scheduler_by_hand():
    model, condition = tiny_sd3(), _condition(2)
    events, result = _run(model, SD3, condition, "flow-euler", 4, 3.0)
    noise = initial_noise(2, SHAPE, seed=3)
    latents, timesteps, predictions = _by_hand(model, SD3, condition, noise, 4, 3.0)
    assert [event.timestep for event in events] == pytest.approx(timesteps.tolist())
    torch.testing.assert_close(events[-1].latents, latents, atol=2e-5, rtol=1e-5)
    for event, x0 in zip(events, predictions):  # x̂₀ = x_σ − σ v at every step
        torch.testing.assert_close(event.pred_original, x0, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(result.timesteps, timesteps.double().numpy())
    assert not torch.allclose(events[0].latents, events[-1].latents)  # it did move


def test_dynamic_shift_with_flux_sigmas_equals_the_flux_recipe():
    """flow-euler-1/n with μ from the token count: σ = linspace(1, 1/N, N), shifted by e^μ."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    model, condition = tiny_sd3(1), _condition(1)
    events, _ = _run(model, FLUX_LIKE, condition, "flow-euler-1/n", 5, 1.0, image_seq_len=TOKENS)
    noise = initial_noise(1, SHAPE, seed=3)
    # g = 1 runs the conditional branch only; with g = 1 CFG's formula gives the same v
    latents, timesteps, _ = _by_hand(
        model, FLUX_LIKE, condition, noise, 5, 1.0,
        sigmas=np.linspace(1.0, 1 / 5, 5), mu=calculate_shift(TOKENS, 256, 4096, 0.5, 1.15),
    )
    assert [event.timestep for event in events] == pytest.approx(timesteps.tolist())
    torch.testing.assert_close(events[-1].latents, latents, atol=2e-5, rtol=1e-5)


def test_dynamic_shift_without_token_count_is_refused():
    with pytest.raises(ValueError, match="image_seq_len"):
        _run(tiny_sd3(), FLUX_LIKE, _condition(1), "flow-euler", 3, 1.0)


def test_ddpm_sampler_on_a_flow_schedule_is_refused():
    with pytest.raises(ValueError, match="does not fit a flow-matching model"):
        _run(tiny_sd3(), SD3, _condition(1), "ddim", 3, 1.0)


def test_timestep_scale_reaches_the_denoiser_and_the_staged_model_unscales_it(monkeypatch):
    """A family whose denoiser takes t/1000: the sampler passes it so, and StagedDiT picks stages on t."""
    from diffusers import SD3Transformer2DModel

    from mosaic_core.conquer.staged_denoiser import StagedDiT
    from mosaic_core.models.adapters import base

    class ThousandthTimestepTransformer(SD3Transformer2DModel):  # a test-only "family"
        pass

    class ThousandthAdapter(base.FamilyAdapter):
        name = "test-thousandth"
        model_classes = ("ThousandthTimestepTransformer",)
        timestep_scale = 1 / 1000

    base._ensure_registered()
    monkeypatch.setitem(base._ADAPTERS, "ThousandthTimestepTransformer", ThousandthAdapter())  # removed after the test
    model, condition = tiny_sd3(2, ThousandthTimestepTransformer), _condition(1)
    events, _ = _run(model, SD3, condition, "flow-euler", 4, 2.0)
    noise = initial_noise(1, SHAPE, seed=3)
    latents, timesteps, _ = _by_hand(model, SD3, condition, noise, 4, 2.0, timestep_scale=1 / 1000)
    torch.testing.assert_close(events[-1].latents, latents, atol=2e-5, rtol=1e-5)
    # the same network in every stage: stage choice must follow t = σ·1000, not t/1000
    staged = StagedDiT(model, model, model, t_min=300, t_max=700, num_train_timesteps=1000)
    _run(staged, SD3, condition, "flow-euler", 4, 1.0)
    expected = ["early" if t > 700.5 else "late" if t < 299.5 else "middle" for t in timesteps.tolist()]
    assert staged.stage_calls == expected


def test_flow_calibration_inputs_are_the_schedulers_own_noising():
    """Calibration x_t for a flow model = diffusers' scale_noise at σ = t/T, t in the stage's bounds."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from mosaic_core.models.samplers import sampler_alphas_cumprod, sampler_noising
    from mosaic_core.prune.calibration import CalibrationConfig, CleanSet, calibration_batches

    x0 = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(5))
    clean = CleanSet(x0, torch.zeros(6, dtype=torch.long))
    config = CalibrationConfig(size=6, batch_size=3)
    batches = list(calibration_batches(clean, sampler_noising(SD3), (139, 931), config, null_class=0))
    # the same draws as calibration_batches makes (its generator, seeded by the config)
    generator = torch.Generator().manual_seed(config.seed + 1)
    t = torch.randint(139, 932, (6,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)  # unshifted: σ = t/T exactly
    scheduler.set_timesteps(sigmas=np.arange(1000, 0, -1) / 1000.0)
    # its timesteps are 1000, 999, …, 1: timestep t sits at index 1000 − t
    reference = torch.cat([
        scheduler.scale_noise(x0[i : i + 1], scheduler.timesteps[1000 - int(t[i])].reshape(1), noise[i : i + 1])
        for i in range(6)
    ])
    x_t = torch.cat([batches[0][0], batches[2][0]])
    torch.testing.assert_close(x_t, reference, atol=1e-6, rtol=1e-6)
    assert torch.equal(torch.cat([batches[0][1], batches[2][1]]), t)
    with pytest.raises(ValueError, match="noised by σ"):
        sampler_alphas_cumprod(SD3)
