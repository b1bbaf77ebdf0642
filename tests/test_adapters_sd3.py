"""SD3 (`SD3Transformer2DModel`): joint-attention slicing, OBS over both output projections,
cost against torch's FLOP counter, and the real StableDiffusion3Pipeline with a staged denoiser."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from mosaic_core.conquer.staged_denoiser import StagedDiT
from mosaic_core.divide.stages import STAGE_NAMES, stage_of_timesteps
from mosaic_core.models.adapters import adapter_for_model
from mosaic_core.models.adapters.sd3 import encode_prompts, joint_condition
from mosaic_core.prune.hessian import collect_hessians, layer_weight, prunable_layers, split_solved_weight
from mosaic_core.prune.obs import reconstruct_weights
from mosaic_core.prune.surgery import BlockKeep, sliced_model
from tiny_joint import check_reuse_against_hooks, random_keeps, tiny_sd3_parts


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return tiny_sd3_parts(tmp_path_factory.mktemp("sd3-tokenizers"))


def _inputs(parts, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    condition = joint_condition(parts, ["a red fox", "the koi"][:n], encode_prompts, "cpu", torch.float32)
    return torch.randn(n, 4, 8, 8, generator=g), torch.tensor([900.0, 250.0][:n]), condition


def _run(model, x, t, condition):
    with torch.no_grad():
        return model(x, timestep=t, **condition.model_kwargs()).sample


def test_layers_are_joint_heads_dual_heads_and_both_feed_forwards(parts):
    layers = prunable_layers(parts["transformer"])
    assert [(l.block, l.kind, l.name, l.group_size, l.num_groups, len(l.parts)) for l in layers] == [
        (0, "joint_attn", "transformer_blocks.0.attn.to_out.0", 16, 4, 2),
        (0, "dual_attn", "transformer_blocks.0.attn2.to_out.0", 8, 4, 1),
        (0, "mlp", "transformer_blocks.0.ff.net.2", 1, 128, 1),
        (0, "context_mlp", "transformer_blocks.0.ff_context.net.2", 1, 128, 1),
        (1, "joint_attn", "transformer_blocks.1.attn.to_out.0", 16, 4, 2),
        (1, "mlp", "transformer_blocks.1.ff.net.2", 1, 128, 1),
        (1, "context_mlp", "transformer_blocks.1.ff_context.net.2", 1, 128, 1),
        (2, "joint_attn", "transformer_blocks.2.attn.to_out.0", 8, 4, 1),  # context_pre_only: no to_add_out
        (2, "mlp", "transformer_blocks.2.ff.net.2", 1, 128, 1),
    ]
    assert layers[0].parts[1].module == "transformer_blocks.0.attn.to_add_out"


def test_keeping_everything_is_bit_identical(parts):
    model = parts["transformer"]
    keeps = random_keeps(adapter_for_model(model), model, seed=0, fraction=1.0)
    x, t, c = _inputs(parts)
    assert torch.equal(_run(sliced_model(model, keeps), x, t, c), _run(model, x, t, c))


def _masked(model, keeps):
    """The dense model with the removed groups' input columns of every output projection zeroed."""
    masked = copy.deepcopy(model)
    blocks = masked.transformer_blocks
    with torch.no_grad():
        for block, keep in zip(blocks, keeps):
            hd = block.attn.inner_dim // block.attn.heads
            targets = [(block.attn.to_out[0], keep.heads, hd), (block.ff.net[2], keep.units, 1)]
            if block.attn.to_add_out is not None:
                targets.append((block.attn.to_add_out, keep.heads, hd))
            if block.attn2 is not None:
                targets.append((block.attn2.to_out[0], keep.dual_heads, hd))
            if block.ff_context is not None:
                targets.append((block.ff_context.net[2], keep.context_units, 1))
            for linear, kept, size in targets:
                removed = torch.ones(linear.in_features, dtype=torch.bool)
                for g in kept:
                    removed[g * size : (g + 1) * size] = False
                linear.weight[:, removed] = 0
    return masked


def test_sliced_equals_masked(parts):
    model = parts["transformer"]
    keeps = random_keeps(adapter_for_model(model), model, seed=1)
    assert any(len(k.heads) < 4 for k in keeps)
    x, t, c = _inputs(parts)
    torch.testing.assert_close(_run(sliced_model(model, keeps), x, t, c), _run(_masked(model, keeps), x, t, c), atol=1e-5, rtol=1e-5)


def test_joint_attention_matches_a_hand_sliced_reference(parts):
    """Kept heads of both streams, computed from the dense weights' rows/columns by hand."""
    model = parts["transformer"]
    attn = model.transformer_blocks[0].attn
    heads, hd = (0, 3), 8
    keeps = [BlockKeep(heads, tuple(range(128)), context_units=tuple(range(128)), dual_heads=(0, 1, 2, 3))] + \
        random_keeps(adapter_for_model(model), model, 0, 1.0)[1:]
    sliced_attn = sliced_model(model, keeps).transformer_blocks[0].attn
    g = torch.Generator().manual_seed(3)
    image, context = torch.randn(2, 16, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])

    def project(linear, x):  # the kept rows only
        return (x @ linear.weight[rows].T + linear.bias[rows]).view(2, -1, len(heads), hd).transpose(1, 2)

    def rms(x, norm):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight

    with torch.no_grad():
        q = torch.cat([rms(project(attn.to_q, image), attn.norm_q), rms(project(attn.add_q_proj, context), attn.norm_added_q)], 2)
        k = torch.cat([rms(project(attn.to_k, image), attn.norm_k), rms(project(attn.add_k_proj, context), attn.norm_added_k)], 2)
        v = torch.cat([project(attn.to_v, image), project(attn.add_v_proj, context)], 2)
        weights = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, dim=-1)  # 2 × heads × 21 × 21
        o = (weights @ v).transpose(1, 2).reshape(2, 21, len(heads) * hd)
        expected_image = o[:, :16] @ attn.to_out[0].weight[:, rows].T + attn.to_out[0].bias
        expected_context = o[:, 16:] @ attn.to_add_out.weight[:, rows].T + attn.to_add_out.bias
        got_image, got_context = sliced_attn(image, context)
    assert sliced_attn.to_q.weight.shape == (16, 32) and sliced_attn.to_add_out.weight.shape == (32, 16)
    torch.testing.assert_close(got_image, expected_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_context, expected_context, atol=1e-5, rtol=1e-5)


def test_joint_obs_solves_each_output_projection_by_least_squares(parts):
    """The joint layer's kept weights are each part's own least-squares solution, and the
    OBS-pruned sliced model equals the dense model with those weights scattered back (masked)."""
    model = parts["transformer"]
    x, t, c = _inputs(parts)
    layer = prunable_layers(model)[0]
    hessians = collect_hessians(model, [(x, t, c)], layers=[layer])
    modules = dict(model.named_modules())
    kept = (1, 2)
    solved = reconstruct_weights(layer_weight(modules, layer), hessians[layer.name], kept, layer.group_size, damping=1e-9)
    weights = split_solved_weight(modules, layer, solved, len(kept))
    # reference: each part's own least-squares fit, H from its own recorded inputs
    inputs = {}
    def record(key):
        def hook(module, args):
            inputs[key] = args[0].reshape(-1, 32)  # tokens × inner
        return hook

    hooks = [modules[p.module].register_forward_pre_hook(record(p.key)) for p in layer.parts]
    _run(model, x, t, c)
    for hook in hooks:
        hook.remove()
    cols = torch.cat([torch.arange(h * 8, (h + 1) * 8) for h in kept])
    for part in layer.parts:
        X = inputs[part.key].double()
        W = modules[part.module].weight.double()
        reference = torch.linalg.lstsq(X[:, cols], X @ W.T).solution.T  # min ‖X_S W_Sᵀ − X Wᵀ‖
        def error(kept_weight):
            return float((X[:, cols] @ kept_weight.T - X @ W.T).pow(2).sum().detach())
        # the least-squares optimum (weights may differ along near-null directions of X_S)
        assert error(weights[part.key].double()) == pytest.approx(error(reference), rel=1e-5)
    keeps = random_keeps(adapter_for_model(model), model, 0, 1.0)
    keeps[0] = BlockKeep(kept, keeps[0].units, context_units=keeps[0].context_units, dual_heads=keeps[0].dual_heads)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for part in layer.parts:
            linear = dict(masked.named_modules())[part.module]
            linear.weight.zero_()
            linear.weight[:, cols] = weights[part.key]
    torch.testing.assert_close(_run(sliced_model(model, keeps, weights), x, t, c), _run(masked, x, t, c), atol=1e-5, rtol=1e-5)


def test_cost_model_agrees_with_torch_flop_counter(parts):
    from torch.utils.flop_counter import FlopCounterMode

    model = parts["transformer"]
    adapter = adapter_for_model(model)
    keeps = random_keeps(adapter, model, seed=2)
    pruned = sliced_model(model, keeps)
    x, t, c = _inputs(parts, n=1)
    context_tokens = c.prompt_embeds.shape[1]
    shape = adapter.shape_from_config(model.config, context_tokens=context_tokens)
    counts = {layer.name: layer.num_groups for layer in prunable_layers(pruned)}
    assert [layer.name for layer in shape.layers] == list(counts)
    with FlopCounterMode(display=False) as counter:
        _run(pruned, x, t, c)
    linear = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out", "net.0.proj", "net.2")
    flops = sum(
        sum(ops.values()) for name, ops in counter.get_flop_counts().items()
        if ".transformer_blocks." in name and name.endswith(linear)
    )
    assert flops == 2 * shape.macs(tuple(counts[layer.name] for layer in shape.layers))


def test_condition_is_the_pipelines_own_encoding(parts):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**parts)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(["a red fox"], None, None, do_classifier_free_guidance=True)
    condition = joint_condition(parts, ["a red fox"], encode_prompts, "cpu", torch.float32)
    close = dict(atol=1e-5, rtol=1e-5)  # the pipeline runs with autograd on: other kernels, same values
    torch.testing.assert_close(condition.prompt_embeds, embeds.detach(), **close)
    torch.testing.assert_close(condition.pooled_prompt_embeds, pooled.detach(), **close)
    null = condition.null()
    torch.testing.assert_close(null.prompt_embeds, negative.detach(), **close)
    torch.testing.assert_close(null.pooled_prompt_embeds, negative_pooled.detach(), **close)
    assert embeds.shape == (1, 77 + 256, 64) and negative.abs().sum() > 0  # "" is encoded, not zeros
    # a negative prompt is the unconditional branch, encoded as the pipeline's negative_prompt
    _, steered, _, steered_pooled = pipe.encode_prompt(
        ["a red fox"], None, None, do_classifier_free_guidance=True, negative_prompt="blurry", negative_prompt_2="blurry",
        negative_prompt_3="blurry",
    )
    null = joint_condition(parts, ["a red fox"], encode_prompts, "cpu", torch.float32, negative_prompt="blurry").null()
    torch.testing.assert_close(null.prompt_embeds, steered.detach(), **close)
    torch.testing.assert_close(null.pooled_prompt_embeds, steered_pooled.detach(), **close)
    assert (steered - negative).abs().max() > 1e-3


@pytest.mark.slow
def test_the_real_pipeline_runs_each_step_on_its_stage(parts):
    from diffusers import StableDiffusion3Pipeline

    model = parts["transformer"]
    adapter = adapter_for_model(model)
    networks = [sliced_model(model, random_keeps(adapter, model, seed=s)) for s in (3, 4)]
    bounds = (300, 700)  # middle stage in t = σ·1000 units
    staged = StagedDiT(networks[0], model, networks[1], *bounds, num_train_timesteps=1000, timestep_scale=adapter.timestep_scale)
    pipe = StableDiffusion3Pipeline(**{**parts, "transformer": staged})
    out = pipe("a red fox", num_inference_steps=5, height=16, width=16, guidance_scale=2.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert np.isfinite(out.images).all()
    expected = stage_of_timesteps(np.asarray(pipe.scheduler.timesteps, dtype=np.float64), bounds, 1000)
    assert staged.stage_calls == [STAGE_NAMES[s] for s in expected]
    assert set(staged.stage_calls) == {"early", "middle", "late"}


def test_sd3_medium_plans_from_its_shipped_config():
    """Dense block-linear MACs of one call, counted by hand from the published architecture:
    24 joint blocks, D = 1536 (24 heads of 64), N = (128/2)² = 4096 image tokens, M = 77 + 256
    text tokens; the last block's context stream stops after its q/k/v."""
    from mosaic_core.divide.cost import sampling_macs
    from mosaic_core.models.registry import resolve_model

    spec = resolve_model("sd3-medium")
    D, N, M = 1536, 4096, 333
    per_block = 4 * N * D * D + 4 * M * D * D + 2 * N * D * 4 * D + 2 * M * D * 4 * D  # attention both streams + two FFs
    last = 4 * N * D * D + 3 * M * D * D + 2 * N * D * 4 * D
    assert spec.family == "sd3" and spec.in_channels == 16 and spec.sample_size == 128
    assert spec.shape.macs() == 23 * per_block + last
    assert sampling_macs(spec.shape, None, (1, 0, 0)) == 23 * per_block + last
    assert spec.shape.num_heads == 24 * 24 and spec.shape.mlp_hidden == (24 + 23) * 4 * D
    # float64 Hessians: a joint layer is 2·D wide (image + context columns), the last one D
    assert spec.shape.hessian_bytes() == 8 * (23 * (2 * D) ** 2 + D**2 + 24 * (4 * D) ** 2 + 23 * (4 * D) ** 2)


def test_images_decode_with_the_vaes_shift_as_the_pipeline_does(parts):
    """SD3's VAE has a shift_factor (the tiny one: 0.1): a latent decodes as z / scaling + shift.
    With the transformer's output projection zeroed, the velocity is 0, so the real pipeline
    decodes exactly the latents it was given; ours must give the same image."""
    from diffusers import StableDiffusion3Pipeline

    from mosaic_core.conquer.sampling import decode_images

    assert parts["vae"].config.shift_factor == 0.1
    transformer = copy.deepcopy(parts["transformer"])
    with torch.no_grad():
        transformer.proj_out.weight.zero_()
        transformer.proj_out.bias.zero_()
    pipe = StableDiffusion3Pipeline(**{**parts, "transformer": transformer})
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    image = pipe("a red fox", num_inference_steps=2, latents=latents.clone(), output_type="np", guidance_scale=1.0).images
    expected = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)  # the pipeline's [0, 1] floats
    ours = decode_images(latents, parts["vae"])
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1  # rounding of [-1, 1] vs [0, 1]
    shifted_wrong = decode_images(latents - 0.1 * parts["vae"].config.scaling_factor, parts["vae"])
    assert np.abs(shifted_wrong.astype(int) - ours.astype(int)).max() > 1  # the shift is visible at this size


def test_block_reuse_skips_the_joint_blocks_and_adds_both_streams_residuals(parts):
    # the joint blocks return (encoder_hidden_states, hidden_states): reuse stored nothing
    # for them and ran every block on every step while counting their MACs as saved
    model = parts["transformer"]
    x0, t, condition = _inputs(parts, seed=0)
    x1, _, _ = _inputs(parts, seed=1)
    call = lambda m, inputs: _run(m, inputs[0], inputs[1], condition)  # noqa: E731
    check_reuse_against_hooks(model, call, (x0, t), (x1, t * 0.98), ["transformer_blocks.1"])
