"""Sparsity allocation (docs/method.md §2): the rule, water-filling, rounding and its tolerance."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaic_core.divide.allocation import (
    MAX_SPARSITY,
    allocate_sparsity,
    manual_sparsity,
    max_achievable_sparsity,
    round_to_structure,
    sparsity_resolution,
    stage_ratios,
    uniform_sparsity,
    water_fill,
)
from mosaic_core.divide.cost import block_macs_per_step
from mosaic_core.divide.shapes import TransformerShape
from mosaic_core.models.registry import resolve_model
from mosaic_core.divide.noise_schedule import ScoreCurve, alphas_cumprod, importance_score
from mosaic_core.divide.stages import EARLY, LATE, MIDDLE, divide_stages

LINEAR = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
DIGITS = resolve_model("digits-dit").shape
DIT_XL = TransformerShape(num_layers=28, num_heads=16, head_dim=72, mlp_hidden=4608, num_tokens=256)


def linear_setup():
    curve = importance_score(alphas_cumprod(LINEAR), 0.01)
    return curve, divide_stages(curve, 0.55)


def ddim_like_timesteps(num_train: int, steps: int) -> np.ndarray:
    """Evenly spaced timesteps from T-1 down to 0 (cheap stand-in for a sampler)."""
    return np.linspace(num_train - 1, 0, steps).round()


@st.composite
def scheduler_configs(draw):
    """linear (random β range), scaled_linear or cosine, T in [200, 1000]."""
    kind = draw(st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"]))
    config = {"num_train_timesteps": draw(st.integers(200, 1000)), "beta_schedule": kind}
    if kind == "linear":
        config.update(beta_start=draw(st.floats(1e-5, 1e-3)), beta_end=draw(st.floats(5e-3, 5e-2)))
    elif kind == "scaled_linear":
        config.update(beta_start=draw(st.floats(1e-4, 2e-3)), beta_end=draw(st.floats(5e-3, 3e-2)))
    return config


@st.composite
def dit_shapes(draw):
    """DiT-like shapes (≥ 4 heads, MLP = 4·D): no clip binds for any target ≤ 0.9."""
    heads, head_dim = draw(st.integers(4, 16)), draw(st.integers(8, 72))
    return TransformerShape(
        num_layers=draw(st.integers(1, 4)),
        num_heads=heads,
        head_dim=head_dim,
        mlp_hidden=4 * heads * head_dim,
        num_tokens=draw(st.integers(1, 256)),
    )


@st.composite
def any_shapes(draw):
    """Small arbitrary shapes, including ones where 0.9 cannot be reached."""
    return TransformerShape(
        num_layers=draw(st.integers(1, 3)),
        num_heads=draw(st.integers(1, 8)),
        head_dim=draw(st.integers(1, 16)),
        mlp_hidden=draw(st.integers(1, 64)),
        num_tokens=draw(st.integers(1, 16)),
    )


@st.composite
def divided(draw):
    """(curve, bounds, step_counts) for a random schedule, M, λ and step count."""
    config = draw(scheduler_configs())
    curve = importance_score(alphas_cumprod(config), draw(st.floats(-0.02, 0.05)))
    bounds = divide_stages(curve, draw(st.floats(0.05, 0.95)))
    timesteps = ddim_like_timesteps(config["num_train_timesteps"], draw(st.integers(1, 100)))
    return curve, bounds, bounds.count_steps(timesteps)


def test_reference_allocation_of_the_digits_model():
    """docs/method.md §2.5: digits DiT, DDIM-50, overall 0.3 → sparsities about 0.49 / 0.10 / 0.40."""
    curve, bounds = linear_setup()
    allocation = allocate_sparsity(curve, bounds, (21, 23, 6), 0.3, DIGITS)
    np.testing.assert_allclose(allocation.requested, (0.49, 0.10, 0.40), atol=0.01)
    assert allocation.overall_requested == pytest.approx(0.3, abs=1e-12)
    assert abs(allocation.overall_achieved - 0.3) <= sparsity_resolution(DIGITS) / 2
    assert allocation.mode == "auto" and not allocation.middle_capped


def test_ratios_follow_eq_2_2():
    curve, bounds = linear_setup()
    ratios = stage_ratios(curve, bounds)
    normalised = curve.normalised()
    for stage in (EARLY, MIDDLE, LATE):
        assert ratios[stage] == pytest.approx(1 - normalised[bounds.indices(stage)].mean())
    assert ratios[MIDDLE] < min(ratios[EARLY], ratios[LATE])


def test_zero_target_keeps_everything():
    curve, bounds = linear_setup()
    allocation = allocate_sparsity(curve, bounds, (21, 23, 6), 0.0, DIT_XL)
    assert allocation.heads_kept == (16, 16, 16) and allocation.units_kept == (4608, 4608, 4608)
    assert allocation.achieved == (0.0, 0.0, 0.0) and allocation.overall_achieved == 0.0


def test_water_fill_hands_the_excess_to_the_other_stages():
    # Proportional shares would be 1.2 / 0.6 / 0.0; the first clips at 0.9, the rest goes on.
    result = water_fill((2.0, 1.0, 0.0), (1, 1, 1), 0.6)
    assert result[0] == pytest.approx(0.9)
    assert result[1] == pytest.approx(0.9)
    assert result[2] == pytest.approx(0.0)
    # A zero-weight stage takes the budget that nobody else can.
    assert water_fill((1.0, 0.0, 1.0), (1, 1, 1), 0.9) == pytest.approx((0.9, 0.9, 0.9))
    # Stages without steps get nothing.
    assert water_fill((1.0, 1.0, 1.0), (0, 5, 5), 0.4) == pytest.approx((0.0, 0.4, 0.4))


def test_middle_ratio_is_capped_when_it_would_be_pruned_hardest():
    """A late stage scoring higher on average than the middle: the middle takes its ratio."""
    # τ 0-9 score 0.99 but cut off from the peak by a dip, so they are "late";
    # middle = τ 15-24 (a peak of 1.0 on a 0.56 shoulder), early = τ 25-39 (score 0).
    score = np.array([0.99] * 10 + [0.0] * 5 + [0.56] * 5 + [1.0] + [0.56] * 4 + [0.0] * 15)
    curve = ScoreCurve(
        timesteps=np.arange(40), grad_term=score, snr_term=np.zeros(40), score=score, lam=0.0, cx=1.0, max_score=1.0
    )
    bounds = divide_stages(curve, 0.55)
    assert bounds.middle == (15, 24)
    ratios = stage_ratios(curve, bounds)
    assert ratios[MIDDLE] > ratios[LATE]  # eq. 2.2 alone would prune the middle harder
    allocation = allocate_sparsity(curve, bounds, (5, 5, 5), 0.3, DIT_XL)
    assert allocation.middle_capped
    assert allocation.requested[MIDDLE] == pytest.approx(allocation.requested[LATE])
    assert allocation.achieved[MIDDLE] <= allocation.achieved[LATE] < allocation.achieved[EARLY]
    # With no late steps the cap compares against the early stage only: no cap needed.
    assert not allocate_sparsity(curve, bounds, (5, 5, 0), 0.3, DIT_XL).middle_capped


def test_stages_without_steps_get_no_sparsity():
    curve, bounds = linear_setup()
    allocation = allocate_sparsity(curve, bounds, (0, 10, 10), 0.4, DIT_XL)
    assert allocation.requested[EARLY] == 0.0 and allocation.heads_kept[EARLY] == 16
    assert allocation.achieved[MIDDLE] <= allocation.achieved[LATE]
    assert allocation.overall_requested == pytest.approx(0.4)


def test_rounding_compensates_heads_with_mlp_units():
    keep = round_to_structure(0.33, DIT_XL)
    assert keep.heads_kept == 16 - 5  # round(0.33 · 16) = 5 heads removed
    assert abs(keep.achieved - 0.33) <= sparsity_resolution(DIT_XL) / 2
    assert keep.achieved == pytest.approx(1 - block_macs_per_step(DIT_XL, keep.heads_kept, keep.units_kept) / block_macs_per_step(DIT_XL))
    assert round_to_structure(0.0, DIT_XL).heads_kept == 16


def test_at_least_one_head_stays_and_unreachable_targets_clip():
    one_head = TransformerShape(num_layers=2, num_heads=1, head_dim=8, mlp_hidden=32, num_tokens=4)
    keep = round_to_structure(0.9, one_head)
    assert keep.heads_kept == 1 and keep.units_kept == 1
    assert keep.achieved == pytest.approx(max_achievable_sparsity(one_head)) and keep.achieved < 0.9


def test_manual_and_uniform():
    manual = manual_sparsity((0.5, 0.1, 0.4), (21, 23, 6), DIT_XL)
    assert manual.requested == (0.5, 0.1, 0.4) and manual.mode == "manual"
    assert manual.overall_requested == pytest.approx((21 * 0.5 + 23 * 0.1 + 6 * 0.4) / 50)
    uniform = uniform_sparsity(0.3, (21, 23, 6), DIT_XL)
    assert uniform.requested == (0.3, 0.3, 0.3) and len(set(uniform.achieved)) == 1
    assert uniform.overall_achieved == pytest.approx(uniform.achieved[0])


@pytest.mark.parametrize("bad", [-0.1, 0.95, 1.0, float("nan"), float("inf")])
def test_sparsity_outside_the_range_is_refused(bad):
    curve, bounds = linear_setup()
    message = rf"sparsity must be in \[0, 0.9\], got {bad}"
    with pytest.raises(ValueError, match=message):
        allocate_sparsity(curve, bounds, (21, 23, 6), bad, DIT_XL)
    with pytest.raises(ValueError, match=message):
        uniform_sparsity(bad, (21, 23, 6), DIT_XL)
    with pytest.raises(ValueError, match=message):
        manual_sparsity((0.1, bad, 0.2), (21, 23, 6), DIT_XL)


@pytest.mark.parametrize("values", [(0.1, 0.2), (0.1, 0.2, 0.3, 0.4), ()])
def test_manual_needs_exactly_three_values(values):
    with pytest.raises(ValueError, match="exactly 3 values"):
        manual_sparsity(values, (21, 23, 6), DIT_XL)


def test_bad_step_counts_are_refused():
    curve, bounds = linear_setup()
    for counts in [(0, 0, 0), (1, -1, 2), (1, 2), (1.5, 2, 3)]:
        with pytest.raises(ValueError, match="step_counts"):
            allocate_sparsity(curve, bounds, counts, 0.3, DIT_XL)


@settings(max_examples=50, deadline=None)
@given(setup=divided(), target=st.floats(0.0, MAX_SPARSITY), shape=dit_shapes())
def test_auto_allocation_properties(setup, target, shape):
    curve, bounds, counts = setup
    allocation = allocate_sparsity(curve, bounds, counts, target, shape)
    resolution = sparsity_resolution(shape)  # one MLP unit's share of the block MACs
    # The water-filled request has the target as its step-weighted mean, each stage in [0, 0.9].
    assert allocation.overall_requested == pytest.approx(target, abs=1e-9)
    assert all(0.0 <= s <= MAX_SPARSITY + 1e-12 for s in allocation.requested)
    # Rounding moves each stage by at most half a unit (no clip binds for these shapes).
    for requested, achieved, n in zip(allocation.requested, allocation.achieved, counts):
        if n > 0:
            assert abs(achieved - requested) <= resolution / 2 + 1e-12
    assert abs(allocation.overall_achieved - target) <= resolution / 2 + 1e-12
    # The middle stage is never pruned more than another stage with steps.
    for stage in (EARLY, LATE):
        if counts[MIDDLE] > 0 and counts[stage] > 0:
            assert allocation.requested[MIDDLE] <= allocation.requested[stage] + 1e-12
            assert allocation.achieved[MIDDLE] <= allocation.achieved[stage]
    # Stages without steps cost nothing and are not pruned; at least one head stays.
    for stage, n in enumerate(counts):
        if n == 0:
            assert allocation.requested[stage] == 0.0 and allocation.heads_kept[stage] == shape.num_heads
    assert min(allocation.heads_kept) >= 1 and min(allocation.units_kept) >= 1
    if target == 0.0:
        assert allocation.heads_kept == (shape.num_heads,) * 3
        assert allocation.units_kept == (shape.mlp_hidden,) * 3


@settings(max_examples=50, deadline=None)
@given(setup=divided(), target=st.floats(0.0, MAX_SPARSITY), shape=any_shapes())
def test_rounding_on_any_shape_stays_in_range_and_is_tight_unless_clipped(setup, target, shape):
    curve, bounds, counts = setup
    allocation = allocate_sparsity(curve, bounds, counts, target, shape)
    resolution = sparsity_resolution(shape)
    for stage in range(3):
        requested, achieved = allocation.requested[stage], allocation.achieved[stage]
        units_removed = shape.mlp_hidden - allocation.units_kept[stage]
        assert allocation.heads_kept[stage] >= 1 and allocation.units_kept[stage] >= 1
        assert -1e-12 <= achieved <= max_achievable_sparsity(shape) + 1e-12
        if 0 < units_removed < shape.mlp_hidden - 1:  # no clip bound: the nearest MAC fraction
            copied = stage == MIDDLE and achieved in (allocation.achieved[EARLY], allocation.achieved[LATE])
            assert abs(achieved - requested) <= resolution / 2 + 1e-12 or copied
    for stage in (EARLY, LATE):
        if counts[MIDDLE] > 0 and counts[stage] > 0:
            assert allocation.achieved[MIDDLE] <= allocation.achieved[stage]
