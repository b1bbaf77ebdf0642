"""The trajectory's adaLN conditioning computed once (conquer/conditioning.py).

The reference is the sampler with the precompute turned off, i.e. diffusers' own
`AdaLayerNormZero` and DiT forward on every call; the precompute must give the same
latents, do the embedder work once per module instead of once per call, and leave every
module as it found it whatever order tables end in.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import LINEAR_SCHEDULER, tiny_pixel_dit
from mosaic_core.conquer import conditioning
from mosaic_core.conquer.conditioning import TrajectoryConditioning
from mosaic_core.conquer.sampling import SampleConfig, sample_steps
from mosaic_core.conquer.staged_denoiser import StagedDiT
from mosaic_core.jobs import Cancelled, run_to_end
from mosaic_core.prune.surgery import BlockKeep, sliced_model

SHAPE = (1, 8, 8)


def final_latents(model, labels, precompute: bool, **config):
    events = []
    result = run_to_end(
        sample_steps(
            model, LINEAR_SCHEDULER, labels, SampleConfig(**config), num_classes=10, sample_shape=SHAPE,
            precompute_conditioning=precompute,
        ),
        events.append,
    )
    return events[-1].latents, result


def embedder_rows(model):
    """Rows fed to each block embedder's first timestep linear, per call (a hook of the test's own)."""
    rows: list[int] = []
    hooks = [
        block.norm1.emb.timestep_embedder.linear_1.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
        for block in model.transformer_blocks
    ]
    return rows, hooks


def patched(model) -> list[str]:
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("guidance", [0.0, 1.0, 1.5])
def test_precomputed_conditioning_gives_the_same_latents_and_images(guidance):
    model = tiny_pixel_dit(seed=1)
    plain, plain_result = final_latents(model, [0, 3, 7], False, num_inference_steps=6, guidance_scale=guidance)
    fast, fast_result = final_latents(model, [0, 3, 7], True, num_inference_steps=6, guidance_scale=guidance)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)  # batched GEMMs round differently
    np.testing.assert_array_equal(fast_result.images, plain_result.images)
    assert patched(model) == []  # every module back to its class's forward


def test_embedder_runs_once_per_module_over_all_steps_and_rows():
    model = tiny_pixel_dit(seed=2)
    rows, hooks = embedder_rows(model)
    final_latents(model, [1, 2], False, num_inference_steps=5, guidance_scale=1.5)
    per_call = list(rows)
    rows.clear()
    final_latents(model, [1, 2], True, num_inference_steps=5, guidance_scale=1.5)
    for hook in hooks:
        hook.remove()
    # without: each of the 5 calls runs every block's embedder on its 4 rows (2 images, cond + null),
    # plus block 0's again for the final layer; with: one call per block on 5 × 4 rows
    assert per_call == [4] * (5 * (len(model.transformer_blocks) + 1))
    assert rows == [20] * len(model.transformer_blocks)


def test_staged_networks_share_one_table_and_match_the_plain_sampler():
    dense = tiny_pixel_dit(seed=3)
    keeps = [BlockKeep(heads=(0, 2), units=tuple(range(0, 128, 2))), BlockKeep(heads=(1, 3), units=tuple(range(64)))]
    pruned = sliced_model(dense, keeps)
    staged = StagedDiT(dense, pruned, dense, 300, 700)
    table = TrajectoryConditioning(staged, torch.zeros(3, 2, dtype=torch.long), torch.tensor([1, 2]))
    assert len(table.norms) == len(dense.transformer_blocks)  # the sliced network shares the dense norms
    plain, _ = final_latents(staged, [4, 5], False, num_inference_steps=8, guidance_scale=1.5)
    fast, _ = final_latents(staged, [4, 5], True, num_inference_steps=8, guidance_scale=1.5)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)  # batched GEMMs round differently
    assert patched(staged) == []


@pytest.mark.parametrize("how", ["module", "stage network"])
def test_a_compiled_model_samples_on_one_graph_without_the_table(how):
    # TorchDynamo (with its eager backend: the guards, not inductor's code, are what is tested)
    # guards on the table's timestep tensors by identity: with the table, each step of a
    # compiled model compiled a graph of its own (8 for 12 steps, then eager).
    import torch._dynamo
    from torch._dynamo.utils import counters

    dense = tiny_pixel_dit(seed=4)
    if how == "module":
        model = tiny_pixel_dit(seed=4)
        model.compile(backend="eager")
        reference = dense
    else:
        pruned = sliced_model(dense, [BlockKeep(heads=(0, 2), units=tuple(range(64)))] * 2)
        compiled = sliced_model(dense, [BlockKeep(heads=(0, 2), units=tuple(range(64)))] * 2)
        compiled.compile(backend="eager")
        model, reference = StagedDiT(dense, compiled, dense, 300, 700), StagedDiT(dense, pruned, dense, 300, 700)
    plain, _ = final_latents(reference, [1, 6], False, num_inference_steps=12, guidance_scale=1.5)
    torch._dynamo.reset()
    counters.clear()
    fast, _ = final_latents(model, [1, 6], True, num_inference_steps=12, guidance_scale=1.5)
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs == 1
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
    assert patched(model) == []


def test_a_call_that_is_not_the_tables_runs_the_modules_own_forward():
    model = tiny_pixel_dit(seed=4)
    steps = torch.tensor([[900, 900], [500, 500]])
    labels = torch.tensor([3, 10])
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x, timestep=torch.tensor([500, 500]), class_labels=labels).sample
        with TrajectoryConditioning(model, steps, labels) as table:
            table.precompute()
            assert patched(model)  # the dispatchers are installed
            mine = model(x, timestep=table.call_timesteps[1], class_labels=labels).sample
            # the same values in a tensor of the caller's own: not looked up, computed
            foreign = model(x, timestep=torch.tensor([500, 500]), class_labels=torch.tensor([4, 10])).sample
            reference = None
        reference = model(x, timestep=torch.tensor([500, 500]), class_labels=torch.tensor([4, 10])).sample
    torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(foreign, reference, rtol=0, atol=0)
    assert not torch.allclose(foreign, expected)  # the label mattered: a table lookup would have hidden it
    assert patched(model) == []


def test_tables_ending_in_any_order_restore_every_module():
    model = tiny_pixel_dit(seed=5)
    labels = torch.tensor([1, 2])
    first = TrajectoryConditioning(model, torch.tensor([[900, 900]]), labels)
    second = TrajectoryConditioning(model, torch.tensor([[100, 100]]), labels)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first one out is not the last one in
    second.precompute()
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        via_table = model(x, timestep=second.call_timesteps[0], class_labels=labels).sample
    second.__exit__(None, None, None)
    assert patched(model) == [] and conditioning._ACTIVE == {}
    with torch.no_grad():
        plain = model(x, timestep=torch.tensor([100, 100]), class_labels=labels).sample
    torch.testing.assert_close(via_table, plain, rtol=1e-5, atol=1e-6)


def test_a_cancelled_sampler_leaves_no_module_patched():
    model = tiny_pixel_dit(seed=6)
    calls = iter(range(100))
    generator = sample_steps(
        model, LINEAR_SCHEDULER, [1], SampleConfig(num_inference_steps=6), num_classes=10, sample_shape=SHAPE,
        should_stop=lambda: next(calls) >= 3,
    )
    with pytest.raises(Cancelled):
        run_to_end(generator)
    assert patched(model) == [] and conditioning._ACTIVE == {}


def test_a_sampler_abandoned_mid_trajectory_restores_the_modules_when_closed():
    model = tiny_pixel_dit(seed=7)
    generator = sample_steps(model, LINEAR_SCHEDULER, [1, 2], SampleConfig(num_inference_steps=6), num_classes=10, sample_shape=SHAPE)
    next(generator)
    assert patched(model)
    generator.close()
    assert patched(model) == [] and conditioning._ACTIVE == {}


def test_bad_table_shapes_are_refused_with_the_shapes_given():
    model = tiny_pixel_dit()
    with pytest.raises(ValueError, match=r"steps×rows.*\(3,\) and \(3,\)"):
        TrajectoryConditioning(model, torch.zeros(3, dtype=torch.long), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"\(2, 4\) and \(3,\)"):
        TrajectoryConditioning(model, torch.zeros(2, 4, dtype=torch.long), torch.tensor([1, 2, 3]))


def test_a_plain_dit_block_under_a_table_computes_diffusers_values_and_others_keep_their_forward():
    from diffusers.models.attention_processor import AttnProcessor

    model = tiny_pixel_dit(seed=8)
    steps = torch.tensor([[700, 700, 700]])
    labels = torch.tensor([2, 5, 10])
    x = torch.randn(3, 16, model.transformer_blocks[0].norm1.linear.in_features, generator=torch.Generator().manual_seed(2))
    odd = model.transformer_blocks[1]
    odd.attn1.set_processor(AttnProcessor())  # a processor the fast path does not reproduce
    with torch.no_grad(), TrajectoryConditioning(model, steps, labels) as table:
        table.precompute()
        t = table.call_timesteps[0]
        assert [name for name in patched(model) if name.startswith("transformer_blocks.") and name.count(".") == 1] == [
            f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks)) if i != 1
        ]
        for block in model.transformer_blocks:
            fast = block(x, timestep=t, class_labels=labels)
            # diffusers' own forward, its norm answered from the same table
            reference = type(block).forward(block, x, timestep=t, class_labels=labels)
            assert torch.equal(fast, reference)
        block = model.transformer_blocks[0]
        block.train()  # dropout would act: diffusers' forward runs
        assert torch.equal(block(x, timestep=t, class_labels=labels), type(block).forward(block, x, timestep=t, class_labels=labels))
        block.eval()
    assert patched(model) == [] and conditioning._BLOCKS == {}
