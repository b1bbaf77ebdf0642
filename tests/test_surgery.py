"""Surgery: sliced == masked, 0 % pruning is bit-identical, sharing, the dense model untouched."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from mosaic_core.prune.hessian import collect_hessians, prunable_layers
from mosaic_core.prune.obs import full_width_weight, reconstruct_weights
from mosaic_core.prune.surgery import BlockKeep, block_sizes, mask_block_, slice_block, sliced_model
from conftest import tiny_pixel_dit

HEADS, HEAD_DIM, UNITS = 4, 8, 128


def tiny_dit(seed: int = 0):
    return tiny_pixel_dit(seed, heads=HEADS, head_dim=HEAD_DIM, in_channels=4)


def inputs(seed: int = 1, size: int = 3):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 4, 8, 8, generator=generator)
    t = torch.randint(0, 1000, (size,), generator=generator)
    y = torch.randint(0, 10, (size,), generator=generator)
    return x, t, y


def run(model, x, t, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def test_keeping_everything_is_bit_identical():
    model = tiny_dit()
    x, t, y = inputs()
    full = [BlockKeep.full(HEADS, UNITS)] * 2
    assert torch.equal(run(sliced_model(model, full), x, t, y), run(model, x, t, y))


def test_sliced_equals_masked_with_obs_weights():
    model = tiny_dit()
    before = snapshot(model)
    x, t, y = inputs()
    hessians = collect_hessians(model, [inputs(seed=2, size=4)])
    modules = dict(model.named_modules())
    dense_output = run(model, x, t, y)
    rng = random.Random(0)
    for trial in range(3):
        keeps, kept_weights, full_weights = [], {}, {}
        for block in range(2):
            heads = tuple(sorted(rng.sample(range(HEADS), rng.randint(1, HEADS))))
            units = tuple(sorted(rng.sample(range(UNITS), rng.randint(0, UNITS))))
            if trial == 0 and block == 0:
                heads, units = (rng.randrange(HEADS),), ()  # one head, MLP removed entirely
            keeps.append(BlockKeep(heads, units))
            for layer in prunable_layers(model)[2 * block : 2 * block + 2]:
                groups = heads if layer.kind == "attn" else units
                weight = modules[layer.name].weight
                kept = reconstruct_weights(weight, hessians[layer.name], groups, layer.group_size)
                kept_weights[layer.name] = kept
                full_weights[layer.name] = full_width_weight(kept, groups, layer.group_size, layer.num_groups)
        pruned = sliced_model(model, keeps, kept_weights)
        masked = copy.deepcopy(model)
        for index, (block, keep) in enumerate(zip(masked.transformer_blocks, keeps)):
            mask_block_(
                block,
                keep,
                out_weight_full=full_weights[f"transformer_blocks.{index}.attn1.to_out.0"],
                fc2_weight_full=full_weights[f"transformer_blocks.{index}.ff.net.2"],
            )
        expected = run(masked, x, t, y)
        got = run(pruned, x, t, y)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, dense_output, atol=1e-4)  # pruning did something
        for index, keep in enumerate(keeps):
            block = pruned.transformer_blocks[index]
            assert block_sizes(block) == (len(keep.heads), HEAD_DIM, len(keep.units))
    after = snapshot(model)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_sliced_attributes_and_shapes():
    model = tiny_dit()
    block = model.transformer_blocks[0]
    keep = BlockKeep((1, 3), (0, 5, 9))
    new = slice_block(block, keep)
    attn = new.attn1
    assert (attn.heads, attn.inner_dim, attn.inner_kv_dim, attn.sliceable_head_dim) == (2, 16, 16, 2)
    assert attn.to_q.weight.shape == (16, 32) and attn.to_q.out_features == 16
    assert attn.to_out[0].weight.shape == (32, 16) and attn.to_out[0].in_features == 16
    assert new.ff.net[0].proj.weight.shape == (3, 32) and new.ff.net[0].proj.bias.shape == (3,)
    assert new.ff.net[2].weight.shape == (32, 3) and new.ff.net[2].in_features == 3
    # The kept rows/columns are the original ones, in order.
    original_k = block.attn1.to_k.weight
    assert torch.equal(attn.to_k.weight, torch.cat([original_k[8:16], original_k[24:32]]))  # heads 1 and 3
    assert torch.equal(new.ff.net[2].weight, block.ff.net[2].weight[:, [0, 5, 9]])
    assert torch.equal(new.ff.net[0].proj.bias, block.ff.net[0].proj.bias[[0, 5, 9]])
    # The original block still has every head and unit.
    assert (block.attn1.heads, block.attn1.inner_dim, block.ff.net[2].in_features) == (4, 32, 128)
    # attention slicing (diffusers checks the head count) still works on the sliced module
    attn.set_attention_slice(1)


def test_unpruned_modules_are_shared_and_pruned_ones_are_new():
    model = tiny_dit()
    pruned = sliced_model(model, [BlockKeep((0, 2), tuple(range(64)))] * 2)
    for name in ("pos_embed", "norm_out", "proj_out_1", "proj_out_2"):
        assert getattr(pruned, name) is getattr(model, name)
    assert pruned.config is model.config
    assert pruned.transformer_blocks is not model.transformer_blocks
    for new, old in zip(pruned.transformer_blocks, model.transformer_blocks):
        assert new is not old
        assert new.norm1 is old.norm1 and new.norm1.emb is old.norm1.emb and new.norm3 is old.norm3
        assert new.attn1 is not old.attn1 and new.ff is not old.ff
        assert new.attn1.to_out[0].bias is old.attn1.to_out[0].bias  # not pruned: shared
        assert new.ff.net[2].bias is old.ff.net[2].bias
        assert new.attn1.to_out[1] is old.attn1.to_out[1] and new.ff.net[1] is old.ff.net[1]
        assert new.attn1.processor is old.attn1.processor
        assert new.attn1.to_q.weight.data_ptr() != old.attn1.to_q.weight.data_ptr()
    # Containers are the copy's own: a hook on the copy does not reach the original.
    handle = pruned.transformer_blocks[0].register_forward_hook(lambda *args: None)
    assert len(model.transformer_blocks[0]._forward_hooks) == 0
    handle.remove()
    # sliced_model leaves the dense model's block list alone
    assert all(block.attn1.heads == HEADS for block in model.transformer_blocks)


def test_a_sliced_model_keeps_the_dense_models_mode_in_every_module():
    model = tiny_dit().eval()
    pruned = sliced_model(model, [BlockKeep((0, 2), tuple(range(64)))] * 2)
    assert [name for name, module in pruned.named_modules() if module.training] == []
    model.train()
    pruned = sliced_model(model, [BlockKeep((1,), tuple(range(32)))] * 2)
    assert all(module.training for module in pruned.modules())


def test_mask_block_zeroes_removed_columns():
    model = tiny_dit()
    block = model.transformer_blocks[0]
    mask_block_(block, BlockKeep((1,), (3,)))
    out_weight = block.attn1.to_out[0].weight
    assert out_weight[:, :8].abs().sum() == 0 and out_weight[:, 16:].abs().sum() == 0
    assert out_weight[:, 8:16].abs().sum() > 0
    fc2 = block.ff.net[2].weight
    assert fc2[:, 3].abs().sum() > 0
    assert torch.count_nonzero(fc2[:, :3]) == 0 and torch.count_nonzero(fc2[:, 4:]) == 0


def test_validation():
    model = tiny_dit()
    block = model.transformer_blocks[0]
    with pytest.raises(ValueError, match="at least one attention head"):
        slice_block(block, BlockKeep((), (0, 1)))
    with pytest.raises(ValueError, match=r"heads must be in \[0, 4\)"):
        slice_block(block, BlockKeep((0, 4), (0,)))
    with pytest.raises(ValueError, match=r"units must be in \[0, 128\)"):
        slice_block(block, BlockKeep((0,), (128,)))
    with pytest.raises(ValueError, match="strictly increasing"):
        BlockKeep((2, 1), ())
    with pytest.raises(ValueError, match=r"out_weight must have shape \(32, 8\)"):
        slice_block(block, BlockKeep((0,), (0,)), out_weight=torch.zeros(32, 16))
    with pytest.raises(ValueError, match="one BlockKeep per block"):
        sliced_model(model, [BlockKeep.full(HEADS, UNITS)])
    with pytest.raises(ValueError, match="unknown layer names"):
        sliced_model(model, [BlockKeep.full(HEADS, UNITS)] * 2, {"transformer_blocks.0.attn1.to_q": torch.zeros(1)})
    keep = BlockKeep((0, 2), (1,))
    assert BlockKeep.from_dict(keep.to_dict()) == keep
