"""Divide on PixArt's schedule, and the pixart-sigma registry entry planned before any weight exists."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from mosaic_core.divide.plan import Plan, build_plan
from mosaic_core.models.registry import PROJECT_ROOT, resolve_model

CONFIGS = PROJECT_ROOT / "assets" / "configs" / "pixart-sigma"


def test_pixart_sigma_stages_follow_dpm_solvers_own_timesteps():
    """PixArt's default sampler (DPM-Solver++, 20 steps) built from the shipped config visits the
    plan's timesteps, and each step's stage is the plan's rule on the rounded timestep."""
    from diffusers import DPMSolverMultistepScheduler

    config = json.loads((CONFIGS / "scheduler_config.json").read_text())
    scheduler = DPMSolverMultistepScheduler.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    scheduler.set_timesteps(20)
    timesteps = np.asarray(scheduler.timesteps, dtype=np.float64)
    plan = build_plan("pixart-sigma", 20, sparsity=0.3, scheduler="dpm")
    assert np.array_equal(np.asarray(plan.timesteps), timesteps)
    low, high = plan.bounds.middle
    rounded = np.floor(timesteps + 0.5)
    assert plan.step_stages == tuple(np.where(rounded > high, 0, np.where(rounded >= low, 1, 2)).tolist())
    # linear betas 1e-4 → 0.02, as DiT's: the same stage bounds as the DiT-XL/2 entry
    assert plan.bounds.middle == build_plan("facebook/DiT-XL-2-256", 20, sparsity=0.3, scheduler="dpm").bounds.middle


@pytest.mark.slow
def test_pixart_sigma_plan_json_roundtrips_and_reports_memory():
    result = subprocess.run(
        [sys.executable, "-m", "mosaic_core", "plan", "--model", "pixart-sigma", "--sparsity", "0.3", "--scheduler", "dpm",
         "--steps", "20", "--json"],
        capture_output=True, text=True, check=True, cwd=PROJECT_ROOT,
    )
    data = json.loads(result.stdout)
    assert data["shape"]["num_layers"] == 28 and data["shape"]["num_tokens"] == 64 * 64
    assert data["shape"]["num_heads"] == 28 * 2 * 16 and data["shape"]["mlp_hidden"] == 28 * 4608 and data["shape"]["head_dim"] == 72
    assert data["macs_staged"] < data["macs_dense"] and abs(data["ideal_speedup"] - data["macs_dense"] / data["macs_staged"]) < 1e-9
    # Hessians: per block 2 · 1152² + 4608² float64 entries
    assert data["hessian_block_bytes"] == 8 * (2 * 1152**2 + 4608**2) and data["hessian_bytes"] == 28 * data["hessian_block_bytes"]
    assert all(len(stage["layer_keeps"]) == 84 for stage in data["stages"])
    plan = Plan.from_dict(data)
    assert {**plan.to_dict(), **plan.memory_figures()} == data
    assert abs(plan.overall_sparsity - 0.3) < 1e-3


def test_pixart_sigma_parameters_are_the_public_count():
    """PixArt-Σ-XL-2 is the published ~611 M-parameter transformer: built from the shipped config
    on the meta device it has 610,856,096, of which the prunable linear layers hold 595.0 M."""
    from mosaic_core.models.parameters import parameter_split

    spec = resolve_model("pixart-sigma")
    split = parameter_split(spec)
    assert split.exact and split.total == 610_856_096 and abs(split.total - 611e6) < 0.005 * 611e6
    assert split.prunable_linear == spec.shape.parameters() == 594_961_920
    assert spec.default_steps == 20 and spec.default_cfg == 4.5 and spec.family == "pixart"


@pytest.mark.slow
def test_pixart_sigma_shape_matches_the_real_transformer_on_the_meta_device():
    """The config-only shape equals the real PixArtTransformer2DModel (built without memory on
    the meta device): the same 84 layers, their parameters module by module, and the linear
    MACs torch's FLOP counter measures for one 1024×1024 call with 300 T5 tokens."""
    from diffusers import PixArtTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    from mosaic_core.prune.hessian import prunable_layers

    spec = resolve_model("pixart-sigma")
    with torch.device("meta"):
        model = PixArtTransformer2DModel.from_config(json.loads((CONFIGS / "transformer_config.json").read_text()))
    layers = prunable_layers(model)
    assert [(l.name, l.kind, l.num_groups, l.group_size) for l in layers] == [
        (l.name, l.kind, l.num_groups, l.group_size) for l in spec.shape.layers
    ]
    modules = dict(model.named_modules())
    linears = {"attn": ["to_q", "to_k", "to_v", "to_out.0"], "cross_attn": ["to_q", "to_k", "to_v", "to_out.0"], "mlp": ["net.0.proj", "net.2"]}
    parameters = sum(
        p.numel() for l in layers for linear in linears[l.kind] for p in modules[f"{l.name.rsplit('.', 2)[0]}.{linear}"].parameters()
    )
    assert parameters == spec.shape.parameters()
    meta = dict(device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 4, 128, 128, **meta), encoder_hidden_states=torch.randn(1, 300, 4096, **meta),
              encoder_attention_mask=torch.ones(1, 300, **meta), timestep=torch.tensor([500], **meta),
              added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    counts = counter.get_flop_counts()
    flops = sum(
        sum(counts[f"PixArtTransformer2DModel.{l.name.rsplit('.', 2)[0]}.{linear}"].values()) for l in layers for linear in linears[l.kind]
    )
    assert flops // 2 == spec.shape.macs()
