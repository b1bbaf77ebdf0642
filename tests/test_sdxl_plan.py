"""Divide on SDXL's schedule, and the sdxl-base registry entry planned before any weight exists."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli

from mosaic_core.divide.plan import Plan, build_plan
from mosaic_core.models.registry import PROJECT_ROOT, resolve_model

CONFIGS = PROJECT_ROOT / "assets" / "configs" / "sdxl-base"


def test_scaled_linear_middle_stage_is_the_reference():
    """SDXL's scaled_linear schedule (β 0.00085 → 0.012) at M = 0.55, λ = 0.01, c_x = 1
    puts the middle stage at τ ∈ [105, 846]."""
    plan = build_plan("sdxl-base", 50, M=0.55, lam=0.01, cx=1.0, sparsity=0.3, scheduler="euler")
    assert plan.bounds.middle == (105, 846)
    assert plan.bounds.num_train_timesteps == 1000


@pytest.mark.parametrize("name, cls", [("euler", "EulerDiscreteScheduler"), ("dpm", "DPMSolverMultistepScheduler"), ("ddim", "DDIMScheduler")])
def test_stages_follow_each_sdxl_scheduler_own_timesteps(name, cls):
    import diffusers

    config = json.loads((CONFIGS / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, cls).from_config({k: v for k, v in config.items() if not k.startswith("_")})
    scheduler.set_timesteps(30)
    timesteps = np.asarray(scheduler.timesteps, dtype=np.float64)
    plan = build_plan("sdxl-base", 30, sparsity=0.3, scheduler=name)
    assert np.array_equal(np.asarray(plan.timesteps), timesteps)
    low, high = plan.bounds.middle
    rounded = np.floor(timesteps + 0.5)
    expected = np.where(rounded > high, 0, np.where(rounded >= low, 1, 2))
    assert plan.step_stages == tuple(expected.tolist())
    if name == "dpm":
        assert scheduler.config.algorithm_type == "dpmsolver++"


def test_sdxl_base_plan_json_roundtrips_and_reports_memory():
    result = run_cli("plan", "--model", "sdxl-base", "--sparsity", "0.3", "--scheduler", "euler", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["shape"]["num_layers"] == 70  # SDXL-base's transformer blocks: 4 + 20 down, 10 mid, 30 + 6 up
    assert data["shape"]["num_heads"] == 2 * 1300 and data["shape"]["mlp_hidden"] == 332800
    assert data["macs_staged"] < data["macs_dense"] and abs(data["ideal_speedup"] - data["macs_dense"] / data["macs_staged"]) < 1e-9
    assert data["hessian_block_bytes"] < data["hessian_bytes"]
    assert all(len(stage["layer_keeps"]) == 210 for stage in data["stages"])
    plan = Plan.from_dict(data)
    assert {**plan.to_dict(), **plan.memory_figures()} == data
    assert abs(plan.overall_sparsity - 0.3) < 1e-3


@pytest.mark.slow
def test_sdxl_base_shape_matches_the_real_unet_built_on_the_meta_device():
    """The config-only cost shape of sdxl-base equals the real diffusers UNet (built without
    memory on the meta device): the same 210 layers, parameters and linear MACs as torch's
    FLOP counter measures for one 1024×1024 call with 77 text tokens."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from mosaic_core.prune.hessian import prunable_layers

    spec = resolve_model("sdxl-base")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((CONFIGS / "unet_config.json").read_text()))
    layers = prunable_layers(unet)
    assert [(l.name, l.kind, l.num_groups, l.group_size) for l in layers] == [
        (l.name, l.kind, l.num_groups, l.group_size) for l in spec.shape.layers
    ]
    modules = dict(unet.named_modules())
    linears = {"attn": ["to_q", "to_k", "to_v", "to_out.0"], "cross_attn": ["to_q", "to_k", "to_v", "to_out.0"], "mlp": ["net.0.proj", "net.2"]}
    parameters = sum(
        p.numel() for l in layers for linear in linears[l.kind] for p in modules[f"{l.name.rsplit('.', 2)[0]}.{linear}"].parameters()
    )
    assert parameters == spec.shape.parameters()
    meta = dict(device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(
            torch.randn(1, 4, 128, 128, **meta), torch.tensor([500], **meta), encoder_hidden_states=torch.randn(1, 77, 2048, **meta),
            added_cond_kwargs={"text_embeds": torch.randn(1, 1280, **meta), "time_ids": torch.randn(1, 6, **meta)},
        )
    counts = counter.get_flop_counts()
    flops = sum(
        sum(counts[f"UNet2DConditionModel.{l.name.rsplit('.', 2)[0]}.{linear}"].values()) for l in layers for linear in linears[l.kind]
    )
    assert flops // 2 == spec.shape.macs()


def test_sdxl_base_parameters_are_the_public_count():
    """SDXL-base-1.0's UNet has 2,567,463,684 parameters; built from the shipped config on
    the meta device, so are ours; 2.18 B of them are in the prunable linear layers."""
    from mosaic_core.models.parameters import parameter_split

    split = parameter_split(resolve_model("sdxl-base"))
    assert split.total == 2_567_463_684 and split.exact
    assert split.prunable_linear == resolve_model("sdxl-base").shape.parameters() == 2_184_902_400
