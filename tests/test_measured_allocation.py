"""Measured allocation: the Lagrangian choice is optimal against exhaustive search on small cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaic_core.prune.measured_allocation import LayerCurve, allocate_measured


def _brute_force_best(curves, steps, at_least):
    """min Σ n_s E(k) over every allocation removing ≥ `at_least` MACs (exhaustive)."""
    best = np.inf
    ranges = [range(c.max_remove + 1) for c in curves]
    for choice in itertools.product(*ranges):
        macs = sum(steps[c.stage] * c.cost * k for c, k in zip(curves, choice))
        if macs + 1e-9 < at_least:
            continue
        error = sum(steps[c.stage] * float(np.maximum(c.errors[:k], 0).sum()) for c, k in zip(curves, choice))
        best = min(best, error)
    return best


curve_strategy = st.tuples(
    st.integers(0, 2),  # stage
    st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=1, max_size=4),  # errors
    st.sampled_from([1.0, 2.0, 3.0]),  # cost
)


@settings(max_examples=60, deadline=None)
@given(
    raw=st.lists(curve_strategy, min_size=1, max_size=4),
    steps=st.lists(st.integers(0, 5), min_size=3, max_size=3),
    fraction=st.floats(0.0, 1.0),
)
def test_no_allocation_removing_as_much_has_less_error(raw, steps, fraction):
    curves = [LayerCurve(s, f"layer{i}", np.asarray(e), c, len(e)) for i, (s, e, c) in enumerate(raw)]
    most = sum(steps[c.stage] * c.cost * c.max_remove for c in curves)
    budget = fraction * most
    result = allocate_measured(curves, steps, budget)
    assert result.macs_removed >= budget - 1e-9
    assert all(0 <= result.removals[(c.stage, c.layer)] <= c.max_remove for c in curves)
    # Lagrangian optimality: nothing that removes at least as many MACs has a smaller error
    assert result.error <= _brute_force_best(curves, steps, result.macs_removed) + 1e-7


def test_cheap_errors_go_first_across_stages_and_layers():
    # stage 0's layer is nearly free to prune, stage 1's is costly: the budget goes to stage 0
    cheap = LayerCurve(0, "a", np.full(4, 0.01), 1.0, 4)
    costly = LayerCurve(1, "a", np.full(4, 5.0), 1.0, 4)
    result = allocate_measured([cheap, costly], [10, 10, 0], budget_macs=30.0)
    assert result.removals[(0, "a")] == 3 or result.removals[(0, "a")] == 4
    assert result.removals[(1, "a")] == 0
    # a stage without steps is never pruned (it saves nothing)
    idle = LayerCurve(2, "a", np.zeros(4), 1.0, 4)
    assert allocate_measured([cheap, idle], [10, 0, 0], 20.0).removals[(2, "a")] == 0


def test_impossible_budget_and_bad_curves_are_refused():
    curve = LayerCurve(0, "a", np.ones(3), 2.0, 3)
    with pytest.raises(ValueError, match="lower the sparsity"):
        allocate_measured([curve], [1, 0, 0], budget_macs=7.0)
    with pytest.raises(ValueError, match="cost of a group must be > 0"):
        LayerCurve(0, "a", np.ones(3), 0.0, 3)
    with pytest.raises(ValueError, match="must be finite"):
        LayerCurve(0, "a", np.array([1.0, np.nan]), 1.0, 2)
    with pytest.raises(ValueError, match="max_remove must be in"):
        LayerCurve(0, "a", np.ones(3), 1.0, 4)
