"""Cost model: golden DiT-XL/2 MACs, and MACs/parameters equal to a real diffusers DiT's layers."""

from __future__ import annotations

import pytest

from mosaic_core.divide.allocation import uniform_sparsity
from mosaic_core.divide.cost import (
    block_macs_per_step,
    head_macs_per_step,
    ideal_speedup,
    linear_parameter_count,
    sampling_macs,
    staged_parameter_count,
    unit_macs_per_step,
)
from mosaic_core.divide.shapes import TransformerShape
from mosaic_core.models.registry import resolve_model

DIT_XL = TransformerShape(num_layers=28, num_heads=16, head_dim=72, mlp_hidden=4608, num_tokens=256)


def test_dit_xl_dense_ddim50_golden():
    """Paper: dense DiT-XL/2 at DDIM-50 = 5.72 T block-linear MACs (exactly 5.7076e12 here)."""
    macs = sampling_macs(DIT_XL, None, (21, 23, 6))
    assert 5.70e12 <= macs < 5.72e12
    assert macs == 50 * block_macs_per_step(DIT_XL)
    assert resolve_model("facebook/DiT-XL-2-256").shape == DIT_XL
    # 20 steps: paper 2.29 T.
    assert sampling_macs(DIT_XL, None, (8, 9, 3)) == pytest.approx(2.283e12, rel=1e-3)


def test_macs_are_linear_in_kept_heads_and_units():
    assert block_macs_per_step(DIT_XL, 0, 0) == 0
    assert block_macs_per_step(DIT_XL, 16, 0) == 16 * head_macs_per_step(DIT_XL)
    assert block_macs_per_step(DIT_XL, 0, 4608) == 4608 * unit_macs_per_step(DIT_XL)
    # Attention is a third of the block-linear compute when F = 4 D.
    assert block_macs_per_step(DIT_XL, 16, 0) * 3 == block_macs_per_step(DIT_XL)


def test_staged_macs_and_speedup():
    keep = [(8, 2304), (16, 4608), (8, 2304)]  # early and late at half, middle dense
    staged = sampling_macs(DIT_XL, keep, (10, 20, 20))
    dense = sampling_macs(DIT_XL, None, (10, 20, 20))
    assert staged == (10 * 0.5 + 20 + 20 * 0.5) * block_macs_per_step(DIT_XL)
    assert ideal_speedup(dense, staged) == pytest.approx(50 / 35)
    allocation = uniform_sparsity(0.0, (10, 20, 20), DIT_XL)
    assert sampling_macs(DIT_XL, allocation, (10, 20, 20)) == dense


def test_bad_keep_counts_and_step_counts_are_refused():
    with pytest.raises(ValueError, match=r"heads_kept must be in \[0, 16\], got 17"):
        block_macs_per_step(DIT_XL, 17, 10)
    with pytest.raises(ValueError, match=r"units_kept must be in \[0, 4608\], got -1"):
        block_macs_per_step(DIT_XL, 1, -1)
    with pytest.raises(ValueError, match="3 .*pairs"):
        sampling_macs(DIT_XL, [(1, 1)], (1, 1, 1))
    with pytest.raises(ValueError, match="step_counts"):
        sampling_macs(DIT_XL, None, (1, -1, 1))
    with pytest.raises(ValueError, match="staged MACs must be > 0"):
        ideal_speedup(1.0, 0.0)


def test_equals_the_prunable_layers_of_a_real_diffusers_dit():
    """MACs per step = tokens × weights of q, k, v, out, fc1, fc2; parameters = their numel."""
    import torch
    from diffusers import DiTTransformer2DModel

    config = dict(
        num_attention_heads=3, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero",
    )
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**config)
    shape = TransformerShape.from_dit_config(config)
    prunable = []
    for block in model.transformer_blocks:
        attention = block.attn1
        prunable += [attention.to_q, attention.to_k, attention.to_v, attention.to_out[0]]
        prunable += [block.ff.net[0].proj, block.ff.net[2]]
    weights = sum(layer.weight.numel() for layer in prunable)
    parameters = sum(p.numel() for layer in prunable for p in layer.parameters())
    assert block_macs_per_step(shape) == shape.num_tokens * weights
    assert linear_parameter_count(shape) == parameters
    # Staged storage: three copies of the prunable layers at the kept sizes.
    assert staged_parameter_count(shape, None) == 3 * parameters
    assert staged_parameter_count(shape, [(1, 10), (3, 96), (2, 50)]) == sum(
        linear_parameter_count(shape, h, u) for h, u in [(1, 10), (3, 96), (2, 50)]
    )
