"""Plans for flow-matching models: stages in scheduler units, steps counted on diffusers' own timesteps."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
import pytest

from mosaic_core.divide.plan import Plan, build_plan
from mosaic_core.divide.shapes import TransformerShape
from mosaic_core.models.registry import ModelSpec

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


def _spec(config, image_seq_len=None) -> ModelSpec:
    return ModelSpec(
        name="tiny-flow",
        description="a flow-matching transformer's shape, for planning",
        scheduler_config=MappingProxyType(dict(config)),
        shape=TransformerShape(num_layers=4, num_heads=4, head_dim=16, mlp_hidden=256, num_tokens=256),
        num_classes=0,
        source="folder",
        image_seq_len=image_seq_len,
    )


def _pipeline_timesteps(config, sampler, steps, tokens):
    """Timesteps as diffusers' SD3 (`flow-euler`) and Flux (`flow-euler-1/n`) pipelines set them."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    kwargs = {}
    if config.get("use_dynamic_shifting"):
        kwargs["mu"] = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    if sampler == "flow-euler-1/n":
        kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    scheduler.set_timesteps(steps, **kwargs)
    return scheduler.timesteps.double().numpy()


def _count_inside(timesteps, bounds):
    """(early, middle, late) by counting the timesteps inside each stage's rounding interval.

    The first flow step sits at t = T (σ = 1), beyond the last timestep T − 1: it belongs to
    the stage holding T − 1, so a middle stage that reaches T − 1 is open above.
    """
    low, high = bounds.middle
    t = np.asarray(timesteps)
    top = np.inf if high == bounds.num_train_timesteps - 1 else high + 0.5
    middle = int(np.sum((t >= low - 0.5) & (t < top)))
    late = int(np.sum(t < low - 0.5))
    return (len(t) - middle - late, middle, late)


@pytest.mark.parametrize(
    "config,tokens",
    [(SD3, None), (FLUX, 4096), (FLUX, 1024), ({**SD3, "shift": 1.0}, None)],
    ids=["sd3-shift3", "flux-4096", "flux-1024", "no-shift"],
)
@pytest.mark.parametrize("sampler", ["flow-euler", "flow-euler-1/n"])
@pytest.mark.parametrize("steps", [4, 20, 28, 50])
def test_steps_per_stage_equal_counting_the_schedulers_own_timesteps(config, tokens, sampler, steps):
    plan = build_plan(_spec(config, tokens), steps, scheduler=sampler, sparsity=0.3)
    reference = _pipeline_timesteps(config, sampler, steps, tokens)
    np.testing.assert_allclose(plan.timesteps, reference, rtol=0, atol=1e-3)
    assert plan.step_counts == _count_inside(reference, plan.bounds)
    assert sum(plan.step_counts) == steps


def test_sd3_plan_golden_and_units():
    """SD3 (shift 3), λ = 0.01, M = 0.55: middle [139, 931] in t = σ·1000 (hand check in docs §8.8)."""
    plan = build_plan(_spec(SD3), 28, scheduler="flow-euler")
    assert abs(plan.bounds.middle[0] - 139) <= 1 and abs(plan.bounds.middle[1] - 931) <= 1
    assert plan.timesteps[0] == pytest.approx(1000.0)  # the first step is pure noise, t = T: clipped into early
    assert plan.step_stages[0] == 0
    assert plan.step_counts == (5, 21, 2)
    assert plan.image_seq_len is None and "image_seq_len" not in plan.to_dict()


def test_flux_plan_uses_the_spec_token_count_and_round_trips():
    spec = _spec(FLUX, 4096)
    plan = build_plan(spec, 28, scheduler="flow-euler-1/n", sparsity=0.3)
    assert plan.image_seq_len == 4096
    explicit = build_plan(spec, 28, scheduler="flow-euler-1/n", sparsity=0.3, image_seq_len=1024)
    assert explicit.bounds.middle != plan.bounds.middle  # a smaller image shifts less
    again = Plan.from_dict(plan.to_dict())
    assert again == plan
    np.testing.assert_array_equal(again.curve().score, plan.curve().score)
    from mosaic_core.divide.stages import divide_stages

    assert divide_stages(plan.curve(), plan.M) == plan.bounds


def test_flow_plan_refusals_name_the_problem():
    with pytest.raises(ValueError, match="image_seq_len"):
        build_plan(_spec(FLUX), 28, scheduler="flow-euler")
    with pytest.raises(ValueError, match="does not fit a flow-matching model.*flow-euler"):
        build_plan(_spec(SD3), 28, scheduler="ddim")
    with pytest.raises(ValueError, match="needs a flow-matching model"):
        build_plan("digits-dit", 28, scheduler="flow-euler")


def test_ddpm_plans_are_unchanged_by_the_flow_support():
    """The DiT golden of docs §1.7 and its dict keys (the checkpoint cache keys on them)."""
    plan = build_plan("digits-dit", 50, sparsity=0.3)
    assert plan.bounds.middle == (103, 568) and plan.step_counts == (21, 23, 6)
    assert "image_seq_len" not in plan.to_dict()


def test_cli_plans_each_registry_model_with_its_own_pipelines_sampler():
    """Without --scheduler the CLI takes what the model's pipeline uses: FluxPipeline's
    linspace(1, 1/N, N) grid with μ for 1024² (4096 packed tokens), SD3's flow-euler, DDIM
    for DDPM-style schedules; naming the sampler by hand gives the same plan."""
    import json

    from conftest import run_cli

    expected = {"flux-dev": ("flow-euler-1/n", 4096), "sd3-medium": ("flow-euler", None), "digits-dit": ("ddim", None)}
    for model, (sampler, tokens) in expected.items():
        default = run_cli("plan", "--model", model, "--sparsity", "0.3", "--json")
        named = run_cli("plan", "--model", model, "--sparsity", "0.3", "--json", "--scheduler", sampler)
        assert default.returncode == 0 and named.returncode == 0, default.stderr + named.stderr
        data = json.loads(default.stdout)
        assert data["scheduler"] == sampler and data.get("image_seq_len") == tokens
        assert data == json.loads(named.stdout)
