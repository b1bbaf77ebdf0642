"""The SDXL family on the generic engine: layers, slicing, GEGLU pairing, cost, staged pipeline.

All on a tiny real SDXL (conftest.tiny_sdxl_parts): a 2-level UNet2DConditionModel with 8
transformer blocks, two CLIP text encoders and tokenizers written by the tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mosaic_core.models.adapters import adapter_for_model
from mosaic_core.models.adapters.sdxl import TextCondition, encode_prompts, unet_layer_shapes
from mosaic_core.prune.hessian import prunable_layers
from mosaic_core.prune.surgery import BlockKeep, mask_block_, slice_feed_forward, sliced_model

PROMPTS = ["a cat on the mat", "an old lighthouse at sunrise"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from conftest import tiny_sdxl_parts

    return tiny_sdxl_parts(tmp_path_factory.mktemp("tokenizers"))


@pytest.fixture(scope="module")
def condition(parts):
    return encode_prompts(parts, PROMPTS, 32, 32)


def _run(unet, x, t, condition):
    with torch.no_grad():
        return unet(x, t, **condition.model_kwargs()).sample


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([700, 300])


def test_config_shape_names_every_prunable_layer_of_the_model(parts):
    """The cost shape built from the config alone lists the same layers (names, kinds,
    groups, group widths) that the adapter finds in the built model."""
    unet = parts["unet"]
    shape = unet_layer_shapes(unet.config)
    layers = prunable_layers(unet)
    assert [(l.name, l.kind, l.num_groups, l.group_size) for l in layers] == [
        (l.name, l.kind, l.num_groups, l.group_size) for l in shape.layers
    ]
    assert {l.kind for l in layers} == {"attn", "cross_attn", "mlp"}
    assert len({l.block for l in layers}) == 8
    modules = dict(unet.named_modules())
    for layer in layers:  # the Hessian site is the input of a real output projection
        assert modules[layer.name].in_features == layer.num_groups * layer.group_size


def test_prompt_encoding_equals_the_pipelines_own(parts):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**parts)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    ours = encode_prompts(parts, PROMPTS, 32, 32)
    assert torch.equal(ours.prompt_embeds, embeds) and torch.equal(ours.pooled_prompt_embeds, pooled)
    assert ours.prompt_embeds.shape == (2, 77, 64)
    null = ours.null()
    assert not null.prompt_embeds.any() and torch.equal(null.time_ids, ours.time_ids)


def test_zero_pruning_is_bit_identical(parts, condition):
    unet = parts["unet"]
    x, t = _inputs()
    keeps = [BlockKeep.full(l[0].num_groups, l[2].num_groups, l[1].num_groups) for l in _by_block(unet)]
    assert torch.equal(_run(sliced_model(unet, keeps), x, t, condition), _run(unet, x, t, condition))


def _by_block(unet):
    blocks = {}
    for layer in prunable_layers(unet):
        blocks.setdefault(layer.block, []).append(layer)
    return [blocks[b] for b in sorted(blocks)]  # [attn, cross_attn, mlp] per block


def test_sliced_equals_column_masked_with_new_weights(parts, condition):
    """Slicing self-attention heads, cross-attention heads and GEGLU units with replaced
    output weights computes what the dense model does with those columns zeroed."""
    import copy

    unet = parts["unet"]
    x, t = _inputs(1)
    generator = torch.Generator().manual_seed(3)
    modules = dict(unet.named_modules())
    keeps, weights, full = [], {}, {}
    for attn, cross, mlp in _by_block(unet):
        keep = BlockKeep(
            heads=tuple(sorted(torch.randperm(attn.num_groups, generator=generator)[:2].tolist())),
            units=tuple(sorted(torch.randperm(mlp.num_groups, generator=generator)[: mlp.num_groups // 3].tolist())),
            cross_heads=tuple(sorted(torch.randperm(cross.num_groups, generator=generator)[:3].tolist())),
        )
        keeps.append(keep)
        for layer, kept in ((attn, keep.heads), (cross, keep.cross_heads), (mlp, keep.units)):
            weight = modules[layer.name].weight
            columns = torch.tensor([g * layer.group_size + i for g in kept for i in range(layer.group_size)])
            new = torch.randn(weight.shape[0], len(columns), generator=generator) * 0.1
            weights[layer.name] = new
            scattered = torch.zeros_like(weight)
            scattered[:, columns] = new
            full[layer.name] = scattered
    sliced = sliced_model(unet, keeps, weights)
    masked = copy.deepcopy(unet)
    masked_modules = dict(masked.named_modules())
    for path, keep, (attn, cross, mlp) in zip(adapter_for_model(unet).block_paths(unet), keeps, _by_block(unet)):
        mask_block_(masked_modules[path], keep, full[attn.name], full[mlp.name], full[cross.name])
    torch.testing.assert_close(_run(sliced, x, t, condition), _run(masked, x, t, condition), rtol=1e-4, atol=1e-5)
    # the sliced model really is smaller, and the dense model is untouched
    block = dict(sliced.named_modules())[adapter_for_model(unet).block_paths(unet)[0]]
    assert block.attn1.heads == 2 and block.attn2.heads == 3 and block.ff.net[0].proj.out_features == 2 * len(keeps[0].units)
    assert all(layer.num_groups in (4, 128) for layer in prunable_layers(unet))


def test_geglu_unit_is_two_rows_of_the_input_projection(parts):
    """Pruning unit j of a GEGLU feed-forward equals removing rows j and j+F of the input
    projection and column j of the output by hand; pairing j with any other row does not."""
    ff = parts["unet"].down_blocks[1].attentions[0].transformer_blocks[0].ff
    proj, out = ff.net[0].proj, ff.net[2]
    width = out.in_features  # F
    j = 5
    kept = [u for u in range(width) if u != j]
    x = torch.randn(3, 7, proj.in_features, generator=torch.Generator().manual_seed(0))

    def by_hand(value_rows, gate_rows, columns):
        value = x @ proj.weight[value_rows].T + proj.bias[value_rows]
        gate = x @ proj.weight[gate_rows].T + proj.bias[gate_rows]
        return (value * F.gelu(gate)) @ out.weight[:, columns].T + out.bias

    with torch.no_grad():
        ours = slice_feed_forward(ff, kept)(x)
        reference = by_hand(kept, [u + width for u in kept], kept)
        wrong = by_hand(kept, [u + width for u in range(width) if u != (j + 1) % width], kept)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, wrong, atol=1e-4)
    assert ff.net[0].proj.out_features == 2 * width  # the dense module is untouched


def _linear_macs(unet, x, t, condition, layers):
    """MACs of the pruned linear layers (q/k/v/out, ff in/out) by torch's own FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, t, **condition.model_kwargs())
    counts = counter.get_flop_counts()
    prefix = type(unet).__name__
    total = 0
    for layer in layers:
        base = layer.name.rsplit(".", 2)[0]  # "<block>.attn1" or "<block>.ff"
        linears = ["to_q", "to_k", "to_v", "to_out.0"] if layer.kind != "mlp" else ["net.0.proj", "net.2"]
        for linear in linears:
            total += sum(counts[f"{prefix}.{base}.{linear}"].values())
    return total // 2  # one multiply-accumulate = 2 FLOPs


def test_cost_model_agrees_with_torch_flop_counter(parts, condition):
    unet = parts["unet"]
    shape = unet_layer_shapes(unet.config)
    x, t = _inputs()
    one = TextCondition(condition.prompt_embeds[:1], condition.pooled_prompt_embeds[:1], condition.time_ids[:1])
    assert _linear_macs(unet, x[:1], t[:1], one, prunable_layers(unet)) == shape.macs()
    # a pruned network: the counted MACs of the sliced model equal the shape's for its keep counts
    keeps, counts = [], {}
    for attn, cross, mlp in _by_block(unet):
        keeps.append(BlockKeep(heads=(0, 3), units=tuple(range(0, mlp.num_groups, 3)), cross_heads=(1,)))
        counts.update({attn.name: 2, cross.name: 1, mlp.name: len(range(0, mlp.num_groups, 3))})
    sliced = sliced_model(unet, keeps)
    counted = _linear_macs(sliced, x[:1], t[:1], one, prunable_layers(sliced))
    assert counted == shape.macs([counts[layer.name] for layer in shape.layers]) < shape.macs()


def test_staged_unet_splits_a_mixed_batch_and_forwards_added_cond_kwargs(parts, condition):
    from mosaic_core.conquer.staged_denoiser import StagedDiT

    unet = parts["unet"]
    blocks = _by_block(unet)
    early = sliced_model(unet, [BlockKeep((0,), tuple(range(0, 128, 4)), (0, 1)) for _ in blocks])
    late = sliced_model(unet, [BlockKeep((1, 2), tuple(range(1, 128, 2)), (3,)) for _ in blocks])
    staged = StagedDiT(early, unet, late, 300, 600, 1000)
    x, _ = _inputs(2)
    t = torch.tensor([900, 100])  # one early row, one late row
    out = staged(x, t, encoder_hidden_states=condition.prompt_embeds, added_cond_kwargs=condition.model_kwargs()["added_cond_kwargs"])
    assert staged.stage_calls == ["early", "late"]
    rows = [_run(network, x[i : i + 1], t[i : i + 1], _row(condition, i)) for i, network in ((0, early), (1, late))]
    torch.testing.assert_close(out.sample, torch.cat(rows), rtol=1e-5, atol=1e-6)
    assert type(out).__name__ == "UNet2DConditionOutput"
    assert staged.add_embedding is unet.add_embedding  # what SDXL's pipeline reads from its unet


def _row(condition, i):
    return TextCondition(condition.prompt_embeds[i : i + 1], condition.pooled_prompt_embeds[i : i + 1], condition.time_ids[i : i + 1])


@pytest.mark.slow
def test_sdxl_pipeline_runs_the_staged_unet_in_the_plans_stages(parts, tiny_sdxl_folder):
    """StableDiffusionXLPipeline takes the staged model as its unet unchanged: with the dense
    network in every stage its images are bit-identical to the dense pipeline's, and with
    pruned stages the stage of every call is the plan's for that step."""
    from diffusers import StableDiffusionXLPipeline

    from mosaic_core.conquer.staged_denoiser import StagedDiT
    from mosaic_core.divide.plan import build_plan
    from mosaic_core.divide.stages import STAGE_NAMES
    from mosaic_core.models.registry import resolve_model
    from mosaic_core.models.samplers import make_scheduler

    spec = resolve_model(str(tiny_sdxl_folder))
    plan = build_plan(spec, num_inference_steps=8, stage_sparsity=(0.5, 0.2, 0.5), scheduler="euler")
    assert plan.step_counts[0] > 0 and plan.step_counts[1] > 0 and plan.step_counts[2] > 0
    unet = parts["unet"]

    def images(denoiser):
        pipe = StableDiffusionXLPipeline(**{**parts, "unet": denoiser, "scheduler": make_scheduler("euler", spec.scheduler_config)})
        pipe.set_progress_bar_config(disable=True)
        return pipe(PROMPTS[0], num_inference_steps=8, guidance_scale=5.0, generator=torch.manual_seed(0), output_type="np").images

    t_min, t_max = plan.bounds.middle
    assert np.array_equal(images(StagedDiT(unet, unet, unet, t_min, t_max, 1000)), images(unet))
    blocks = _by_block(unet)
    pruned = sliced_model(unet, [BlockKeep((0, 1), tuple(range(64)), (0, 2)) for _ in blocks])
    staged = StagedDiT(pruned, unet, pruned, t_min, t_max, 1000)
    result = images(staged)
    assert result.shape == (1, 32, 32, 3) and np.isfinite(result).all()
    assert staged.stage_calls == [STAGE_NAMES[s] for s in plan.step_stages]


def test_call_order_is_the_order_a_call_runs_the_blocks_and_reuse_keeps_the_ends(parts, condition):
    # named_modules lists a UNet's mid block after its up blocks; it runs between them, so
    # "the last block always runs" kept the mid block and cached the block that runs last
    from mosaic_core.conquer.caching import BlockReuse, CacheConfig
    from mosaic_core.models.adapters import adapter_for_model

    unet = parts["unet"]
    adapter = adapter_for_model(unet)
    ran = []
    hooks = [unet.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: ran.append(p)) for p in adapter.block_paths(unet)]
    x, t = _inputs()
    _run(unet, x, t, condition)
    order = adapter.call_order(unet)
    assert order == list(dict.fromkeys(ran)) and sorted(order) == sorted(adapter.block_paths(unet))
    assert order != adapter.block_paths(unet)  # this UNet has a mid block to move
    for hook in hooks:
        hook.remove()
    ran.clear()  # a block that runs calls its self-attention; a cached one returns before it
    hooks = [unet.get_submodule(p).attn1.register_forward_pre_hook(lambda m, a, p=p: ran.append(p)) for p in order]
    wrapped = BlockReuse(unet, CacheConfig(interval=2, keep_first=1, keep_last=1))
    _run(wrapped, x, t, condition)
    assert ran == order
    ran.clear()
    _run(wrapped, x, t - 10, condition)  # a cached call: only the first and the last block run
    for hook in hooks:
        hook.remove()
    assert wrapped.history == [True, False] and ran == [order[0], order[-1]]


def test_block_macs_are_each_levels_own_in_call_order(parts):
    # a UNet's blocks differ in width and tokens from level to level (this tiny one has one
    # level): the cost shape's own layers, reordered as a call runs them
    from mosaic_core.conquer.caching import block_macs
    from mosaic_core.models.adapters import adapter_for_model

    unet = parts["unet"]
    adapter = adapter_for_model(unet)
    shape = adapter.shape_from_config(unet.config)
    paths = adapter.block_paths(unet)
    by_path = {paths[b]: sum(l.num_groups * l.macs_per_group for l in shape.layers if l.block == b) for b in range(len(paths))}
    per_block = block_macs(unet, shape)
    assert per_block == [by_path[p] for p in adapter.call_order(unet)] and sum(per_block) == shape.macs()
