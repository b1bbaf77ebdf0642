"""The PixArt family on the generic engine: layers, prompts, slicing, cost, sampling, staged pipeline.

All on a tiny real PixArt (tests/tiny_pixart.py): a 2-block PixArtTransformer2DModel with
learned σ, a 2-layer T5 encoder and a T5 tokenizer written by the tests, DPM-Solver++.
The references are diffusers' own PixArt pipelines and torch's FLOP counter.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mosaic_core.models.adapters import adapter_for_model, concat_conditions, move_condition, select_rows
from mosaic_core.models.adapters.pixart import PixArtCondition, encode_prompts, pixart_layer_shapes
from mosaic_core.prune.hessian import prunable_layers
from mosaic_core.prune.surgery import BlockKeep, mask_block_, sliced_model

PROMPTS = ["a red fox at sunrise", "The old lighthouse on a koi pond "]
TOKENS = 300  # PixArtSigmaPipeline's max_sequence_length


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from tiny_pixart import tiny_pixart_parts

    return tiny_pixart_parts(tmp_path_factory.mktemp("pixart-tokenizer"))


@pytest.fixture(scope="module")
def condition(parts):
    return encode_prompts({**parts, "max_sequence_length": TOKENS}, PROMPTS, 16, 16, additional_conditions=False)


def _run(model, x, t, condition):
    with torch.no_grad():
        return model(x, timestep=t, **condition.model_kwargs()).sample


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([700, 300])


def _by_block(model):
    blocks = {}
    for layer in prunable_layers(model):
        blocks.setdefault(layer.block, []).append(layer)
    return [blocks[b] for b in sorted(blocks)]  # [attn, cross_attn, mlp] per block


def _pipeline(parts, **overrides):
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline(**{**parts, **overrides})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_config_shape_names_every_prunable_layer_of_the_model(parts):
    """The cost shape from the config alone lists the layers the adapter finds in the model,
    and each is the input of a real output projection of that width."""
    model = parts["transformer"]
    shape = pixart_layer_shapes(model.config, TOKENS)
    layers = prunable_layers(model)
    assert [(l.name, l.kind, l.num_groups, l.group_size) for l in layers] == [
        (l.name, l.kind, l.num_groups, l.group_size) for l in shape.layers
    ]
    assert [l.kind for l in layers[:3]] == ["attn", "cross_attn", "mlp"] and len(layers) == 6
    modules = dict(model.named_modules())
    for layer in layers:
        assert modules[layer.name].in_features == layer.num_groups * layer.group_size
    assert modules["transformer_blocks.0.ff.net.0.proj"].out_features == 128  # GELU(tanh): one row per unit


def test_prompt_encoding_and_null_equal_the_pipelines_own(parts, condition):
    """Prompt embeddings and mask equal PixArtSigmaPipeline.encode_prompt's; the null branch
    equals its embedding of the default empty negative prompt."""
    pipe = _pipeline(parts)
    with torch.no_grad():  # as in the pipeline's __call__ (grad mode picks other kernels)
        embeds, mask, negative, negative_mask = pipe.encode_prompt(
            PROMPTS, do_classifier_free_guidance=True, device="cpu", clean_caption=False, max_sequence_length=TOKENS
        )
    assert torch.equal(condition.prompt_embeds, embeds) and torch.equal(condition.prompt_attention_mask, mask)
    null = condition.null()
    assert torch.equal(null.prompt_embeds, negative) and torch.equal(null.prompt_attention_mask, negative_mask)
    assert condition.prompt_embeds.shape == (2, TOKENS, 16) and int(mask[1].sum()) > int(mask[0].sum())
    assert condition.resolution is None and condition.model_kwargs()["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}
    # a negative prompt is the null branch, embedded as the pipeline's negative_prompt
    with torch.no_grad():
        _, _, steered, steered_mask = pipe.encode_prompt(
            PROMPTS, do_classifier_free_guidance=True, negative_prompt="blurry", device="cpu", clean_caption=False,
            max_sequence_length=TOKENS,
        )
    negative_null = encode_prompts(
        {**parts, "max_sequence_length": TOKENS}, PROMPTS, 16, 16, additional_conditions=False, negative_prompt="blurry"
    ).null()
    assert torch.equal(negative_null.prompt_embeds, steered) and torch.equal(negative_null.prompt_attention_mask, steered_mask)
    assert not torch.equal(steered, negative)


def test_condition_helpers_select_concatenate_and_move(condition):
    """The engine's helpers act on the batch tensors; the shared empty prompt passes through."""
    both = concat_conditions(condition, condition.null())
    assert both.batch_size == 4 and both.empty_prompt is condition.empty_prompt
    row = select_rows(both, torch.tensor([2]), 4)
    assert torch.equal(row.prompt_embeds, condition.null().prompt_embeds[:1])
    moved = move_condition(condition, "cpu", torch.bfloat16)
    assert moved.prompt_embeds.dtype == torch.bfloat16 and moved.prompt_attention_mask.dtype == condition.prompt_attention_mask.dtype
    assert moved.null().prompt_embeds.dtype == torch.bfloat16


def test_zero_pruning_is_bit_identical(parts, condition):
    model = parts["transformer"]
    x, t = _inputs()
    keeps = [BlockKeep.full(a.num_groups, m.num_groups, c.num_groups) for a, c, m in _by_block(model)]
    assert torch.equal(_run(sliced_model(model, keeps), x, t, condition), _run(model, x, t, condition))


def test_sliced_equals_column_masked_with_new_weights(parts, condition):
    """Slicing self-attention heads, cross-attention heads and GELU units with replaced output
    weights computes what the dense model does with those columns zeroed."""
    model = parts["transformer"]
    x, t = _inputs(1)
    generator = torch.Generator().manual_seed(3)
    modules = dict(model.named_modules())
    keeps, weights, full = [], {}, {}
    for attn, cross, mlp in _by_block(model):
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
    sliced = sliced_model(model, keeps, weights)
    masked = copy.deepcopy(model)
    masked_modules = dict(masked.named_modules())
    for path, keep, (attn, cross, mlp) in zip(adapter_for_model(model).block_paths(model), keeps, _by_block(model)):
        mask_block_(masked_modules[path], keep, full[attn.name], full[mlp.name], full[cross.name])
    torch.testing.assert_close(_run(sliced, x, t, condition), _run(masked, x, t, condition), rtol=1e-4, atol=1e-5)
    block = dict(sliced.named_modules())["transformer_blocks.0"]
    assert block.attn1.heads == 2 and block.attn2.heads == 3 and block.ff.net[0].proj.out_features == len(keeps[0].units)
    assert all(layer.num_groups in (4, 128) for layer in prunable_layers(model))  # the dense model is untouched


def _linear_macs(model, x, t, condition, layers):
    """MACs of the pruned linear layers (q/k/v/out, ff in/out) by torch's own FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, timestep=t, **condition.model_kwargs())
    counts = counter.get_flop_counts()
    prefix = type(model).__name__
    total = 0
    for layer in layers:
        base = layer.name.rsplit(".", 2)[0]  # "<block>.attn1" or "<block>.ff"
        linears = ["to_q", "to_k", "to_v", "to_out.0"] if layer.kind != "mlp" else ["net.0.proj", "net.2"]
        for linear in linears:
            total += sum(counts[f"{prefix}.{base}.{linear}"].values())
    return total // 2  # one multiply-accumulate = 2 FLOPs


def _row(condition, i):
    return PixArtCondition(condition.prompt_embeds[i : i + 1], condition.prompt_attention_mask[i : i + 1], condition.empty_prompt)


def test_cost_model_agrees_with_torch_flop_counter(parts, condition):
    """Dense and pruned: the shape's MACs (300 text tokens for K/V) equal the counted ones."""
    model = parts["transformer"]
    shape = pixart_layer_shapes(model.config, TOKENS)
    x, t = _inputs()
    one = _row(condition, 0)
    assert _linear_macs(model, x[:1], t[:1], one, prunable_layers(model)) == shape.macs()
    keeps, counts = [], {}
    for attn, cross, mlp in _by_block(model):
        keeps.append(BlockKeep(heads=(0, 3), units=tuple(range(0, mlp.num_groups, 3)), cross_heads=(1,)))
        counts.update({attn.name: 2, cross.name: 1, mlp.name: len(range(0, mlp.num_groups, 3))})
    sliced = sliced_model(model, keeps)
    counted = _linear_macs(sliced, x[:1], t[:1], one, prunable_layers(sliced))
    assert counted == shape.macs([counts[layer.name] for layer in shape.layers]) < shape.macs()
    # parameters: the shape's count is the sum over the real q/k/v/out and ff modules (biases included)
    modules = dict(sliced.named_modules())
    linears = {"attn": ["to_q", "to_k", "to_v", "to_out.0"], "cross_attn": ["to_q", "to_k", "to_v", "to_out.0"], "mlp": ["net.0.proj", "net.2"]}
    real = sum(p.numel() for l in prunable_layers(sliced) for name in linears[l.kind] for p in modules[f"{l.name.rsplit('.', 2)[0]}.{name}"].parameters())
    assert real == shape.parameters([counts[layer.name] for layer in shape.layers])


def test_staged_model_splits_a_mixed_batch_with_the_text_mask(parts, condition):
    """A mixed batch runs each stage's network on its rows, encoder mask rows included."""
    from mosaic_core.conquer.staged_denoiser import StagedDiT

    model = parts["transformer"]
    early = sliced_model(model, [BlockKeep((0,), tuple(range(0, 128, 4)), (0, 1)) for _ in range(2)])
    late = sliced_model(model, [BlockKeep((1, 2), tuple(range(1, 128, 2)), (3,)) for _ in range(2)])
    staged = StagedDiT(early, model, late, 300, 600, 1000)
    x, _ = _inputs(2)
    t = torch.tensor([900, 100])
    out = staged(x, timestep=t, **condition.model_kwargs())
    assert staged.stage_calls == ["early", "late"]
    rows = [_run(network, x[i : i + 1], t[i : i + 1], _row(condition, i)) for i, network in ((0, early), (1, late))]
    torch.testing.assert_close(out.sample, torch.cat(rows), rtol=1e-5, atol=1e-6)
    assert out.sample.shape == (2, 8, 8, 8)  # ε and the learned variance


def test_engine_sampling_equals_the_pixart_sigma_pipeline(parts):
    """Our sampler (CFG on the first in_channels, the empty prompt as ∅, DPM-Solver++) lands on
    the latents PixArtSigmaPipeline computes from the same initial noise."""
    from tiny_pixart import PIXART_SCHEDULER

    from mosaic_core.conquer.sampling import SampleConfig, initial_noise, run_to_end, sample_steps

    prompts = PROMPTS[:1] * 2
    condition = encode_prompts({**parts, "max_sequence_length": TOKENS}, prompts, 16, 16, additional_conditions=False)
    config = SampleConfig(num_inference_steps=3, guidance_scale=4.5, scheduler="dpm", seed=3)
    events = []
    run_to_end(sample_steps(parts["transformer"], PIXART_SCHEDULER, condition, config, num_classes=0, sample_shape=(4, 8, 8)), events.append)
    noise = initial_noise(2, (4, 8, 8), 3)
    latents = _pipeline(parts)(
        PROMPTS[0], num_images_per_prompt=2, num_inference_steps=3, guidance_scale=4.5, latents=noise.clone(),
        output_type="latent", use_resolution_binning=False, clean_caption=False,
    ).images
    torch.testing.assert_close(events[-1].latents, latents, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sigma_pipeline_runs_the_staged_model_in_the_plans_stages(parts, tmp_path):
    """PixArtSigmaPipeline takes the staged model as its transformer unchanged: with the dense
    network in every stage its images equal the dense pipeline's bit for bit, and with pruned
    stages the stage of every call is the plan's for that step."""
    from tiny_pixart import write_tiny_pixart_folder

    from mosaic_core.conquer.staged_denoiser import StagedDiT
    from mosaic_core.divide.plan import build_plan
    from mosaic_core.divide.stages import STAGE_NAMES
    from mosaic_core.models.registry import resolve_model

    spec = resolve_model(str(write_tiny_pixart_folder(tmp_path / "pixart")))
    plan = build_plan(spec, num_inference_steps=10, stage_sparsity=(0.5, 0.2, 0.5), scheduler="dpm")
    assert min(plan.step_counts) > 0
    model = parts["transformer"]

    def images(denoiser):
        pipe = _pipeline(parts, transformer=denoiser)
        return pipe(PROMPTS[0], num_inference_steps=10, guidance_scale=4.5, generator=torch.manual_seed(0),
                    output_type="np", use_resolution_binning=False).images

    t_min, t_max = plan.bounds.middle
    assert np.array_equal(images(StagedDiT(model, model, model, t_min, t_max, 1000)), images(model))
    pruned = sliced_model(model, [BlockKeep((0, 1), tuple(range(64)), (0, 2)) for _ in range(2)])
    staged = StagedDiT(pruned, model, pruned, t_min, t_max, 1000)
    result = images(staged)
    assert result.shape == (1, 16, 16, 3) and np.isfinite(result).all()
    assert staged.stage_calls == [STAGE_NAMES[s] for s in plan.step_stages]


def test_alpha_folder_reads_120_tokens_and_the_size_conditions(tmp_path):
    """A PixArtAlphaPipeline folder: M = 120 (its max_sequence_length), and a transformer that
    uses additional conditions gets resolution (pixels) and aspect ratio, which change its output."""
    from tiny_pixart import write_tiny_pixart_folder

    from mosaic_core.models.loading import load_model

    folder = write_tiny_pixart_folder(tmp_path / "alpha", pipeline="PixArtAlphaPipeline", use_additional_conditions=True,
                                      num_attention_heads=6)  # D = 48: size conditions take D/3 each
    loaded = load_model(str(folder), device="cpu")
    assert loaded.extras["max_sequence_length"] == 120
    cross = [layer for layer in loaded.spec.shape.layers if layer.kind == "cross_attn"][0]
    assert cross.macs_per_group == (2 * 16 * 48 + 2 * 120 * 48) * 8  # N = 16 image and M = 120 text tokens, width 48
    condition = loaded.adapter.condition_for(loaded, ["a cat"])
    assert condition.prompt_embeds.shape == (1, 120, 16)
    assert torch.equal(condition.resolution, torch.tensor([[16.0, 16.0]])) and torch.equal(condition.aspect_ratio, torch.tensor([[1.0]]))
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    other = PixArtCondition(condition.prompt_embeds, condition.prompt_attention_mask, condition.empty_prompt,
                            torch.tensor([[32.0, 16.0]]), torch.tensor([[2.0]]))
    assert not torch.allclose(_run(loaded.transformer, x, t, condition), _run(loaded.transformer, x, t, other))


def test_a_legacy_transformer2dmodel_folder_loads_as_pixart(tmp_path):
    """Hub PixArt folders name the legacy Transformer2DModel (with arguments it no longer takes);
    as diffusers does, its norm_type ada_norm_single makes it a PixArtTransformer2DModel."""
    import json

    from tiny_pixart import write_tiny_pixart_folder

    from mosaic_core.models.loading import load_model
    from mosaic_core.models.parameters import parameter_split

    folder = write_tiny_pixart_folder(tmp_path / "legacy")
    path = folder / "transformer" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "_class_name": "Transformer2DModel", "use_linear_projection": False, "num_vector_embeds": None}))
    loaded = load_model(str(folder), device="cpu")
    assert loaded.spec.family == "pixart" and type(loaded.transformer).__name__ == "PixArtTransformer2DModel"
    assert parameter_split(loaded.spec).total == sum(p.numel() for p in loaded.transformer.parameters())
    path.write_text(json.dumps({**config, "_class_name": "Transformer2DModel", "norm_type": "layer_norm"}))
    with pytest.raises(ValueError, match="unsupported denoiser class 'Transformer2DModel'"):
        load_model(str(folder), device="cpu")


def test_hostile_configs_are_refused_with_the_field_name(tmp_path):
    """Bad config fields are one ValueError naming the field and its range (never the value);
    an unreadable model_index.json falls back to PixArt-Σ's 300 tokens."""
    from mosaic_core.models.adapters.pixart import context_tokens_of

    with pytest.raises(ValueError, match=r"'num_layers' must be a whole number in \[1, 1024\]"):
        pixart_layer_shapes({"num_layers": 10**9})
    with pytest.raises(ValueError, match="'attention_head_dim'"):
        pixart_layer_shapes({"attention_head_dim": "72"})
    with pytest.raises(ValueError, match="'norm_type' must be 'ada_norm_single'"):
        pixart_layer_shapes({"norm_type": "ada_norm_zero"})
    with pytest.raises(ValueError, match="cross_attention_dim"):
        pixart_layer_shapes({"cross_attention_dim": None})
    (tmp_path / "model_index.json").write_text('{"_class_name": ["PixArtAlphaPipeline"]}')
    assert context_tokens_of(tmp_path) == 300
    (tmp_path / "model_index.json").write_text('{"_class_name": "PixArtAlphaPipeline"}')
    assert context_tokens_of(tmp_path) == 120
    assert pixart_layer_shapes({}).num_layers == 28  # diffusers' defaults: PixArt-XL/2


@pytest.mark.slow
def test_engine_sampling_equals_the_pixart_alpha_pipeline_with_size_conditions(tmp_path):
    """PixArt-α 1024's layout (sample_size 128, size conditions, 120 tokens), in miniature
    (patch 16: 64 tokens): our sampler lands on PixArtAlphaPipeline's latents, so resolution
    (pixels) and aspect ratio are passed as that pipeline passes them, in both CFG branches."""
    from diffusers import PixArtAlphaPipeline
    from tiny_pixart import PIXART_SCHEDULER, tiny_pixart_parts

    from mosaic_core.conquer.sampling import SampleConfig, initial_noise, run_to_end, sample_steps

    parts = tiny_pixart_parts(tmp_path / "tokenizer", sample_size=128, patch_size=16, use_additional_conditions=None,
                              num_attention_heads=6)
    assert parts["transformer"].use_additional_conditions  # diffusers' default for sample_size 128
    condition = encode_prompts({**parts, "max_sequence_length": 120}, PROMPTS[:1], 256, 256, additional_conditions=True)
    events = []
    run_to_end(sample_steps(parts["transformer"], PIXART_SCHEDULER, condition, SampleConfig(2, 4.5, "dpm", 5),
                            num_classes=0, sample_shape=(4, 128, 128)), events.append)
    pipe = PixArtAlphaPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=4.5, latents=initial_noise(1, (4, 128, 128), 5),
                   output_type="latent", use_resolution_binning=False, clean_caption=False).images
    torch.testing.assert_close(events[-1].latents, latents, rtol=1e-4, atol=1e-5)
