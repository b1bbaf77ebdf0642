"""Flux (`FluxTransformer2DModel`): double-stream joint blocks, single-stream blocks with one
fused proj_out, packed latents, σ timesteps, and the real FluxPipeline with a staged denoiser."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from mosaic_core.conquer.staged_denoiser import StagedDiT
from mosaic_core.divide.stages import STAGE_NAMES, stage_of_timesteps
from mosaic_core.models.adapters import adapter_for_model
from mosaic_core.models.adapters.flux import GUIDANCE, encode_prompts, flux_condition, pack_latents, unpack_latents
from mosaic_core.prune.hessian import collect_hessians, prunable_layers
from mosaic_core.prune.surgery import BlockKeep, sliced_model
from tiny_joint import check_reuse_against_hooks, random_keeps, tiny_flux_parts


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return tiny_flux_parts(tmp_path_factory.mktemp("flux-tokenizers"))


def _inputs(parts, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    condition = flux_condition(parts, ["a red fox", "the koi"][:n], 8, GUIDANCE, max_sequence_length=16)
    return torch.randn(n, 4, 8, 8, generator=g), torch.tensor([900.0, 250.0][:n]), condition


def _run(model, x, t, condition):
    """One engine-side call: packed latents in, σ = t/1000, N×C×H×W out."""
    adapter = adapter_for_model(model)
    with torch.no_grad():
        out = model(adapter.pack_latents(x), timestep=t * adapter.timestep_scale, **condition.model_kwargs()).sample
    return adapter.unpack_latents(out, x)


def test_layers_are_joint_heads_feed_forwards_and_the_fused_projections_parts(parts):
    layers = prunable_layers(parts["transformer"])
    assert [(l.block, l.kind, l.name, l.group_size, l.num_groups) for l in layers] == [
        (0, "joint_attn", "transformer_blocks.0.attn.to_out.0", 16, 4),
        (0, "mlp", "transformer_blocks.0.ff.net.2", 1, 128),
        (0, "context_mlp", "transformer_blocks.0.ff_context.net.2", 1, 128),
        (1, "joint_attn", "transformer_blocks.1.attn.to_out.0", 16, 4),
        (1, "mlp", "transformer_blocks.1.ff.net.2", 1, 128),
        (1, "context_mlp", "transformer_blocks.1.ff_context.net.2", 1, 128),
        (2, "attn", "single_transformer_blocks.0.proj_out[attn]", 8, 4),
        (2, "mlp", "single_transformer_blocks.0.proj_out[mlp]", 1, 128),
        (3, "attn", "single_transformer_blocks.1.proj_out[attn]", 8, 4),
        (3, "mlp", "single_transformer_blocks.1.proj_out[mlp]", 1, 128),
    ]
    assert [(p.module, p.offset) for p in layers[-1].parts] == [("single_transformer_blocks.1.proj_out", 32)]


def test_packing_is_the_pipelines(parts):
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 8, 6)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 8, 6))
    assert torch.equal(unpack_latents(packed, 8, 6), x)


def test_condition_is_the_pipelines_own_encoding(parts):
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**parts)
    embeds, pooled, text_ids = pipe.encode_prompt(["a red fox"], None, max_sequence_length=16)
    condition = flux_condition(parts, ["a red fox"], 8, GUIDANCE, max_sequence_length=16)
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(condition.prompt_embeds, embeds.detach(), **close)
    torch.testing.assert_close(condition.pooled_prompt_embeds, pooled.detach(), **close)
    kwargs = condition.model_kwargs()
    assert torch.equal(kwargs["txt_ids"], text_ids)
    assert torch.equal(kwargs["img_ids"], FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32))
    assert kwargs["guidance"].tolist() == [GUIDANCE] and condition.null() is condition  # no unconditional branch


def test_keeping_everything_is_bit_identical(parts):
    model = parts["transformer"]
    keeps = random_keeps(adapter_for_model(model), model, seed=0, fraction=1.0)
    x, t, c = _inputs(parts)
    assert torch.equal(_run(sliced_model(model, keeps), x, t, c), _run(model, x, t, c))


def _masked(model, keeps):
    """Dense model with the removed groups' input columns zeroed (both streams; both proj_out parts)."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        def zero(linear, kept, size, offset=0, count=None):
            count = linear.in_features if count is None else count
            removed = torch.zeros(linear.in_features, dtype=torch.bool)
            removed[offset : offset + count] = True
            for g in kept:
                removed[offset + g * size : offset + (g + 1) * size] = False
            linear.weight[:, removed] = 0

        for block, keep in zip(masked.transformer_blocks, keeps):
            zero(block.attn.to_out[0], keep.heads, 8)
            zero(block.attn.to_add_out, keep.heads, 8)
            zero(block.ff.net[2], keep.units, 1)
            zero(block.ff_context.net[2], keep.context_units, 1)
        for block, keep in zip(masked.single_transformer_blocks, keeps[len(masked.transformer_blocks):]):
            zero(block.proj_out, keep.heads, 8, 0, 32)
            zero(block.proj_out, keep.units, 1, 32, 128)
    return masked


def test_sliced_equals_masked(parts):
    model = parts["transformer"]
    keeps = random_keeps(adapter_for_model(model), model, seed=1)
    x, t, c = _inputs(parts)
    torch.testing.assert_close(_run(sliced_model(model, keeps), x, t, c), _run(_masked(model, keeps), x, t, c), atol=1e-5, rtol=1e-5)


def test_single_block_matches_a_hand_sliced_reference(parts):
    """Kept heads and MLP units of the fused block, computed from the dense weights by hand."""
    model = parts["transformer"]
    block = model.single_transformer_blocks[0]
    heads, units, hd = (1, 2), torch.tensor([0, 5, 17, 100]), 8
    keep = BlockKeep(heads, tuple(units.tolist()))
    new = adapter_for_model(model).slice_block(block, keep, {})
    g = torch.Generator().manual_seed(4)
    text, image, temb = torch.randn(2, 5, 32, generator=g), torch.randn(2, 16, 32, generator=g), torch.randn(2, 32, generator=g)
    rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])
    attn = block.attn

    def rms(x, norm):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight

    with torch.no_grad():
        x = torch.cat([text, image], dim=1)  # 2 × 21 × D
        normed, gate = block.norm(x, emb=temb)
        mlp = F.gelu(normed @ block.proj_mlp.weight[units].T + block.proj_mlp.bias[units], approximate="tanh")

        def project(linear):
            return (normed @ linear.weight[rows].T + linear.bias[rows]).view(2, 21, len(heads), hd).transpose(1, 2)

        q, k, v = rms(project(attn.to_q), attn.norm_q), rms(project(attn.to_k), attn.norm_k), project(attn.to_v)
        o = (torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, -1) @ v).transpose(1, 2).reshape(2, 21, len(heads) * hd)
        w = block.proj_out.weight
        expected = x + gate.unsqueeze(1) * (o @ w[:, rows].T + mlp @ w[:, 32 + units].T + block.proj_out.bias)
        got_text, got_image = new(image, text, temb)
    assert new.proj_out.weight.shape == (32, 16 + 4) and new.proj_mlp.weight.shape == (4, 32)
    torch.testing.assert_close(torch.cat([got_text, got_image], 1), expected, atol=1e-5, rtol=1e-5)


def test_fused_projection_parts_have_their_own_hessians(parts):
    model = parts["transformer"]
    x, t, c = _inputs(parts)
    layers = [layer for layer in prunable_layers(model) if layer.block == 2]
    hessians = collect_hessians(model, [(x, t, c)], layers=layers)
    recorded = []
    handle = model.single_transformer_blocks[0].proj_out.register_forward_pre_hook(lambda m, a: recorded.append(a[0].reshape(-1, 160)) and None)
    _run(model, x, t, c)
    handle.remove()
    X = recorded[0].double()
    full = X.T @ X / X.shape[0]  # 160 × 160
    torch.testing.assert_close(hessians[layers[0].name], full[:32, :32])
    torch.testing.assert_close(hessians[layers[1].name], full[32:, 32:])


def test_cost_model_agrees_with_torch_flop_counter(parts):
    from torch.utils.flop_counter import FlopCounterMode

    model = parts["transformer"]
    adapter = adapter_for_model(model)
    pruned = sliced_model(model, random_keeps(adapter, model, seed=2))
    x, t, c = _inputs(parts, n=1)
    shape = adapter.shape_from_config(model.config, latent_size=8, context_tokens=16)
    counts = {layer.name: layer.num_groups for layer in prunable_layers(pruned)}
    assert [layer.name for layer in shape.layers] == list(counts)
    with FlopCounterMode(display=False) as counter:
        _run(pruned, x, t, c)
    linear = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out", "net.0.proj",
              "net.2", "proj_mlp", "proj_out")
    flops = sum(
        sum(ops.values()) for name, ops in counter.get_flop_counts().items()
        if "transformer_blocks." in name and name.endswith(linear)
    )
    assert flops == 2 * shape.macs(tuple(counts[layer.name] for layer in shape.layers))


@pytest.mark.slow
def test_the_real_pipeline_runs_each_step_on_its_stage(parts):
    from diffusers import FluxPipeline

    model = parts["transformer"]
    adapter = adapter_for_model(model)
    networks = [sliced_model(model, random_keeps(adapter, model, seed=s)) for s in (3, 4)]
    bounds = (400, 800)  # middle stage in t = σ·1000 units; the network receives σ
    staged = StagedDiT(networks[0], model, networks[1], *bounds, num_train_timesteps=1000, timestep_scale=adapter.timestep_scale)
    pipe = FluxPipeline(**{**parts, "transformer": staged})
    out = pipe("a red fox", num_inference_steps=5, height=16, width=16, max_sequence_length=16,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert np.isfinite(out.images).all()
    expected = stage_of_timesteps(np.asarray(pipe.scheduler.timesteps, dtype=np.float64), bounds, 1000)
    assert staged.stage_calls == [STAGE_NAMES[s] for s in expected]
    assert set(staged.stage_calls) == {"early", "middle", "late"}


def test_flux_entries_plan_from_their_shipped_configs():
    """Dense block-linear MACs of one call counted by hand: D = 3072 (24 heads of 128), N = 4096
    packed image tokens (1024² px), M = 512 T5 tokens; 19 double blocks, 38 single blocks over N + M."""
    from mosaic_core.models.registry import resolve_model

    D, N, M = 3072, 4096, 512
    double = 4 * (N + M) * D * D + 2 * (N + M) * D * 4 * D
    single = 4 * (N + M) * D * D + 2 * (N + M) * D * 4 * D
    for name, cfg in (("flux-dev", 1.0), ("flux-schnell", 1.0)):
        spec = resolve_model(name)
        assert (spec.family, spec.in_channels, spec.sample_size, spec.default_cfg) == ("flux", 16, 128, cfg)
        assert spec.shape.macs() == 19 * double + 38 * single
        assert spec.shape.num_heads == 57 * 24 and spec.shape.mlp_hidden == (19 * 2 + 38) * 4 * D
    assert resolve_model("flux-schnell").default_steps == 4


def test_block_reuse_skips_the_joint_blocks_and_adds_both_streams_residuals(parts):
    # the joint blocks return (encoder_hidden_states, hidden_states): reuse stored nothing
    # for them and ran every block on every step while counting their MACs as saved
    model = parts["transformer"]
    x0, t, condition = _inputs(parts, seed=0)
    x1, _, _ = _inputs(parts, seed=1)
    adapter = adapter_for_model(model)

    def call(m, inputs):  # `_run`, with the adapter of the model a wrapper wraps
        x, timestep = inputs
        with torch.no_grad():
            out = m(adapter.pack_latents(x), timestep=timestep * adapter.timestep_scale, **condition.model_kwargs()).sample
        return adapter.unpack_latents(out, x)

    check_reuse_against_hooks(model, call, (x0, t), (x1, t * 0.98), ["transformer_blocks.1", "single_transformer_blocks.0"])


def test_block_macs_add_up_to_the_cost_shapes_macs(parts):
    # each block's MACs from the cost shape's own layers, for the dense and a sliced network
    from mosaic_core.conquer.caching import block_macs

    model = parts["transformer"]
    shape = adapter_for_model(model).shape_from_config(model.config, latent_size=8, context_tokens=16)
    per_block = block_macs(model, shape)
    by_block = [sum(l.num_groups * l.macs_per_group for l in shape.layers if l.block == b) for b in range(4)]
    assert per_block == by_block and sum(per_block) == shape.macs()
    keeps = random_keeps(adapter_for_model(model), model, seed=3)
    sliced = sliced_model(model, keeps)
    kept = [layer.num_groups for layer in adapter_for_model(sliced).prunable_layers(sliced)]
    assert sum(block_macs(sliced, shape)) == shape.macs(kept) < shape.macs()


def test_guidance_other_than_1_is_refused_for_a_distilled_model(parts, tmp_path, capsys):
    # Flux's null() is its condition: a cfg of 3 sampled both branches (twice the work) and
    # gave the images of cfg 1; `tune --cfg-grid` sampled every candidate again for nothing
    from diffusers import FluxPipeline

    from mosaic_core.cli import main
    from mosaic_core.conquer.sampling import SampleConfig, sample_steps
    from mosaic_core.jobs import run_to_end
    from tiny_joint import FLUX_SCHEDULER

    condition = flux_condition(parts, ["a red fox"], 8, GUIDANCE, max_sequence_length=16)
    config = {**FLUX_SCHEDULER, "_class_name": "FlowMatchEulerDiscreteScheduler"}
    for cfg, fine in ((3.0, False), (0.0, False), (1.0, True)):
        steps = sample_steps(parts["transformer"], config, condition, SampleConfig(2, cfg, "flow-euler"), num_classes=0,
                             sample_shape=(4, 8, 8), image_seq_len=16)
        if fine:
            assert run_to_end(steps).images.shape[0] == 1
        else:
            with pytest.raises(ValueError, match=rf"cfg \(guidance scale\) must be 1 for this model, got {cfg:g}: Flux is guidance-distilled"):
                run_to_end(steps)
    folder = tmp_path / "flux"
    FluxPipeline(**parts).save_pretrained(folder)
    code = main(["tune", "--model", str(folder), "--budget", "0.5", "--steps", "4", "--cfg-grid", "2", "--calib-size", "2", "--images", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "is guidance-distilled (Flux): it samples at cfg 1 only" in err and "Traceback" not in err
