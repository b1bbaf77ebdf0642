"""Greedy structured OBS: optimality against magnitude, closed form, dead columns, edge cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_pixel_dit
from mosaic_core.prune.obs import (
    PruneTrace,
    _remove_groups,
    damped_hessian,
    full_width_weight,
    group_columns,
    layer_reconstruction_error,
    magnitude_prune_order,
    obs_prune,
    obs_prune_order,
    reconstruct_weights,
)


def correlated_layer(out: int, inp: int, tokens: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and a Hessian XᵀX/n of correlated, unevenly scaled inputs (like activations)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(inp, inp, generator=generator, dtype=torch.float64) / inp**0.5
    scales = torch.rand(inp, generator=generator, dtype=torch.float64) * 2 + 0.1
    x = torch.randn(tokens, inp, generator=generator, dtype=torch.float64) @ mixing * scales  # (tokens, in)
    weight = torch.randn(out, inp, generator=generator, dtype=torch.float64)
    return weight, x.T @ x / tokens


def magnitude_error(weight, hessian, trace: PruneTrace, k: int) -> float:
    pruned = weight.clone()
    pruned[:, group_columns(trace.order[:k], trace.group_size)] = 0.0
    return layer_reconstruction_error(weight, pruned, hessian)


def obs_error(weight, hessian, trace: PruneTrace, k: int) -> float:
    keep = trace.kept_groups(k)
    kept = reconstruct_weights(weight, hessian, keep, trace.group_size, trace.damping)
    return layer_reconstruction_error(weight, full_width_weight(kept, keep, trace.group_size, trace.num_groups), hessian)


@pytest.mark.parametrize("group_size", [1, 4])
def test_obs_beats_magnitude_on_the_same_hessian(group_size):
    weight, hessian = correlated_layer(12, 32)
    num_groups = 32 // group_size
    obs = obs_prune_order(weight, hessian, group_size, num_groups - 1)
    magnitude = magnitude_prune_order(weight, group_size, num_groups - 1)
    for fraction in (0.25, 0.5, 0.75):
        k = int(fraction * num_groups)
        assert obs_error(weight, hessian, obs, k) <= magnitude_error(weight, hessian, magnitude, k)
        # Guaranteed part: on magnitude's own kept set, the OBS weights are optimal for H_λ.
        h_damped, _ = damped_hessian(hessian, obs.damping)
        keep = magnitude.kept_groups(k)
        kept = reconstruct_weights(weight, hessian, keep, group_size, obs.damping)
        updated = layer_reconstruction_error(weight, full_width_weight(kept, keep, group_size, num_groups), h_damped)
        assert updated <= magnitude_error(weight, h_damped, magnitude, k) + 1e-9


@pytest.mark.parametrize("group_size", [1, 4])
def test_sequential_updates_equal_closed_form_and_errors_add_up(group_size):
    weight, hessian = correlated_layer(10, 24, seed=3)
    num_groups = 24 // group_size
    h_damped, _ = damped_hessian(hessian, 0.01)
    for k in (1, num_groups // 2, num_groups - 1):
        trace, sequential = obs_prune(weight, hessian, group_size, k)
        assert len(trace.order) == k and all(e >= 0 for e in trace.errors)
        keep = trace.kept_groups(k)
        closed = full_width_weight(reconstruct_weights(weight, hessian, keep, group_size), keep, group_size, num_groups)
        torch.testing.assert_close(sequential, closed, rtol=1e-9, atol=1e-9)
        # Each ε is the exact error increase, so their sum is the total error (with H_λ).
        total = layer_reconstruction_error(weight, sequential, h_damped)
        assert trace.cumulative_error(k) == pytest.approx(total, rel=1e-9)
        # A longer run starts with the same removals.
        assert obs_prune_order(weight, hessian, group_size, num_groups).order[:k] == trace.order


def test_obs_on_a_real_dit_hessian():
    from mosaic_core.prune.hessian import collect_hessians

    model = tiny_pixel_dit(0, num_layers=1)
    batches = [(torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,)))]
    hessians = collect_hessians(model, batches)
    for name, group_size in (("transformer_blocks.0.attn1.to_out.0", 8), ("transformer_blocks.0.ff.net.2", 1)):
        weight = dict(model.named_modules())[name].weight.detach().double()
        hessian = hessians[name]
        num_groups = weight.shape[1] // group_size
        obs = obs_prune_order(weight, hessian, group_size, num_groups - 1)
        magnitude = magnitude_prune_order(weight, group_size, num_groups - 1)
        for k in (1, num_groups // 2, num_groups - 1):
            assert obs_error(weight, hessian, obs, k) <= magnitude_error(weight, hessian, magnitude, k)


def test_column_fast_path_matches_group_path():
    weight, hessian = correlated_layer(6, 20, seed=5)
    trace, fast = obs_prune(weight, hessian, 1, 15)
    h_damped, dead = damped_hessian(hessian, 0.01)
    slow = weight.clone()
    order, errors = _remove_groups(slow, torch.linalg.inv(h_damped), dead, 1, 15)
    assert tuple(order) == trace.order
    torch.testing.assert_close(torch.tensor(errors, dtype=torch.float64), torch.tensor(trace.errors, dtype=torch.float64))
    torch.testing.assert_close(slow, fast)


@pytest.mark.parametrize("group_size", [1, 4])
def test_dead_columns_are_pruned_first(group_size):
    weight, hessian = correlated_layer(8, 16, seed=7)
    dead_group = 2
    dead = group_columns([dead_group], group_size)
    hessian = hessian.clone()
    hessian[dead, :] = 0.0
    hessian[:, dead] = 0.0
    weight = weight.clone()
    weight[:, dead] = 100.0  # large weights: magnitude would prune this group last
    trace, updated = obs_prune(weight, hessian, group_size, 3)
    assert trace.order[0] == dead_group
    assert trace.errors[0] == 0.0
    keep = trace.kept_groups(3)
    closed = reconstruct_weights(weight, hessian, keep, group_size)
    torch.testing.assert_close(updated[:, group_columns(keep, group_size)], closed, rtol=1e-9, atol=1e-9)


def test_partly_dead_group_ignores_dead_weights():
    weight, hessian = correlated_layer(8, 16, seed=8)
    hessian = hessian.clone()
    hessian[5, :] = 0.0
    hessian[:, 5] = 0.0
    bumped = weight.clone()
    bumped[:, 5] = 1e3  # a dead input: its weight never reaches the output
    assert obs_prune_order(weight, hessian, 4, 4).order == obs_prune_order(bumped, hessian, 4, 4).order


def test_removing_nothing_changes_nothing():
    weight, hessian = correlated_layer(5, 12, seed=9)
    for group_size in (1, 3):
        trace, updated = obs_prune(weight, hessian, group_size, 0)
        assert trace.order == () and trace.errors == ()
        assert torch.equal(updated, weight)
        everything = range(12 // group_size)
        torch.testing.assert_close(reconstruct_weights(weight, hessian, everything, group_size), weight)
    weight32 = weight.float()
    assert reconstruct_weights(weight32, hessian, range(12), 1).dtype == torch.float32


def test_magnitude_order_is_by_group_norm():
    weight = torch.tensor([[3.0, 0.0, 1.0, 0.0], [0.0, 0.5, 0.0, 2.0]])
    trace = magnitude_prune_order(weight, 1, 4)
    assert trace.order == (1, 2, 3, 0)
    assert trace.errors == pytest.approx((0.5, 1.0, 2.0, 3.0))
    assert trace.method == "magnitude" and trace.damping == 0.0
    grouped = magnitude_prune_order(weight, 2, 1)
    assert grouped.order == (1,) and grouped.kept_groups(1) == (0,)


def test_trace_json_round_trip():
    import json

    weight, hessian = correlated_layer(4, 12, seed=2)
    trace = obs_prune_order(weight, hessian, 3, 3)
    assert PruneTrace.from_dict(json.loads(json.dumps(trace.to_dict()))) == trace
    with pytest.raises(ValueError, match="distinct groups"):
        PruneTrace((0, 0), (1.0, 2.0), 0.01, 1, 4)


def test_validation_messages():
    weight, hessian = correlated_layer(4, 8)
    with pytest.raises(ValueError, match=r"group_size 3 does not divide the 8"):
        obs_prune_order(weight, hessian, 3, 1)
    with pytest.raises(ValueError, match=r"num_remove must be an integer in \[0, 8\], got 9"):
        obs_prune_order(weight, hessian, 1, 9)
    with pytest.raises(ValueError, match=r"hessian must be 8 × 8"):
        obs_prune_order(weight, hessian[:4, :4], 1, 1)
    with pytest.raises(ValueError, match=r"damping must be"):
        obs_prune_order(weight, hessian, 1, 1, damping=-1.0)
    with pytest.raises(ValueError, match=r"keep_groups must be distinct groups in \[0, 4\)"):
        reconstruct_weights(weight, hessian, [0, 4], 2)
    singular = torch.zeros(8, 8, dtype=torch.float64)
    singular[0, 0] = singular[0, 1] = singular[1, 0] = singular[1, 1] = 1.0  # rank one, no damping
    with pytest.raises(ValueError, match="not positive definite"):
        obs_prune_order(weight, singular, 1, 1, damping=0.0)


@settings(max_examples=25, deadline=None)
@given(
    out=st.integers(1, 5),
    num_groups=st.integers(1, 6),
    group_size=st.integers(1, 3),
    tokens=st.integers(1, 40),
    seed=st.integers(0, 10_000),
    data=st.data(),
)
def test_obs_properties_on_random_layers(out, num_groups, group_size, tokens, seed, data):
    generator = torch.Generator().manual_seed(seed)
    inp = num_groups * group_size
    x = torch.randn(tokens, inp, generator=generator, dtype=torch.float64)  # often rank-deficient
    hessian = x.T @ x / tokens
    weight = torch.randn(out, inp, generator=generator, dtype=torch.float64)
    k = data.draw(st.integers(0, num_groups))
    trace, sequential = obs_prune(weight, hessian, group_size, k)
    assert sorted(trace.order + trace.kept_groups(k)) == list(range(num_groups))
    assert all(e >= 0 for e in trace.errors)
    keep = trace.kept_groups(k)
    closed = full_width_weight(reconstruct_weights(weight, hessian, keep, group_size), keep, group_size, num_groups)
    scale = 1.0 + weight.abs().max().item()
    torch.testing.assert_close(sequential, closed, rtol=1e-7, atol=1e-7 * scale)
    h_damped, _ = damped_hessian(hessian, 0.01)
    total = layer_reconstruction_error(weight, sequential, h_damped)
    assert trace.cumulative_error(k) == pytest.approx(total, rel=1e-6, abs=1e-9 * scale**2)


@pytest.mark.parametrize("group_size", [1, 4])
def test_one_prepared_layer_solves_every_kept_set_as_sequential_obs_does(group_size):
    """`prepare_layer` once, then every kept set of the greedy order: each equals the weights the sequential
    removals reach (an independent path), and is what an unprepared call gives, bit for bit."""
    from mosaic_core.prune.obs import prepare_layer

    weight, hessian = correlated_layer(6, 16, seed=11)
    prepared = prepare_layer(weight, hessian, 0.01)
    num_groups = 16 // group_size
    for k in range(num_groups):
        trace, updated = obs_prune(weight, hessian, group_size, k)
        keep = trace.kept_groups(k)
        solved = reconstruct_weights(weight, None, keep, group_size, prepared=prepared)
        torch.testing.assert_close(updated[:, group_columns(keep, group_size)], solved, rtol=1e-9, atol=1e-9)
        assert torch.equal(solved, reconstruct_weights(weight, hessian, keep, group_size))
    with pytest.raises(ValueError, match="prepared is for a"):
        reconstruct_weights(weight[:, :8], None, [0], 1, prepared=prepared)
