"""GEMM-friendly rounding of kept MLP units (pure arithmetic, checked by hand)."""

import pytest

from mosaic_core.divide.gemm import gemm_friendly_units, round_stage_keep
from mosaic_core.divide.shapes import TransformerShape


def test_units_round_to_the_nearest_multiple_ties_down():
    assert gemm_friendly_units(727, 768) == 736  # 22.7 · 32 -> 23 · 32
    assert gemm_friendly_units(390, 768) == 384
    assert gemm_friendly_units(720, 768) == 704  # 704 and 736 both 16 away: down
    assert gemm_friendly_units(768, 768) == 768 and gemm_friendly_units(0, 768) == 0
    assert gemm_friendly_units(727, 768, 16, "down") == 720 and gemm_friendly_units(721, 768, 16, "up") == 736
    assert gemm_friendly_units(765, 766, 32, "up") == 766  # never past the dense width


def test_round_stage_keep_reports_the_macs_change():
    shape = TransformerShape(num_layers=6, num_heads=6, head_dim=32, mlp_hidden=768, num_tokens=64)
    rounded = round_stage_keep(shape, 5, 727)
    # 9 more units, each 2 · D MACs per token: 9 · 2 · 192 · 64 tokens · 6 layers
    assert (rounded.heads_kept, rounded.units_kept, rounded.macs_delta) == (5, 736, 9 * 2 * 192 * 64 * 6)
    with pytest.raises(ValueError, match="rounding must be one of nearest, down, up, got 'sideways'"):
        gemm_friendly_units(10, 768, rounding="sideways")
