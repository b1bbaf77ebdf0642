"""Measured allocation: the Lagrangian choice is optimal against exhaustive search on small cases."""

from __future__ import annotations

import itertools
import json

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


# ----- exact fill, the stage allocator, and the wired prune ----------------------------------------

exact_strategy = st.tuples(
    st.integers(0, 2),  # stage
    st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=1, max_size=5),  # errors
    st.sampled_from([1.0, 2.0, 5.0]),  # cost
)


@settings(max_examples=80, deadline=None)
@given(
    raw=st.lists(exact_strategy, min_size=1, max_size=5),
    steps=st.lists(st.integers(1, 6), min_size=3, max_size=3),
    fraction=st.floats(0.0, 1.0),
)
def test_exact_allocation_meets_the_budget_within_one_group(raw, steps, fraction):
    curves = [LayerCurve(s, f"layer{i}", np.asarray(e), c, len(e)) for i, (s, e, c) in enumerate(raw)]
    most = sum(steps[c.stage] * c.cost * c.max_remove for c in curves)
    budget = fraction * most
    result = allocate_measured(curves, steps, budget, exact=True)
    largest_group = max(steps[c.stage] * c.cost for c in curves)
    assert budget - 1e-9 <= result.macs_removed <= budget + largest_group  # short of one more group
    # the reported error is the recorded error of the removals (recomputed by hand)
    error = sum(steps[c.stage] * sum(max(x, 0.0) for x in c.errors[: result.removals[(c.stage, c.layer)]]) for c in curves)
    assert result.error == pytest.approx(error)


@settings(max_examples=60, deadline=None)
@given(
    raw=st.lists(st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=1, max_size=4), min_size=1, max_size=4),
    budget=st.integers(0, 16),
)
def test_exact_allocation_equals_brute_force_knapsack_on_increasing_errors(raw, budget):
    # equal MACs per group and increasing ε (each layer's E is convex): the exact allocation is
    # the knapsack optimum among allocations removing at least the budget
    curves = [LayerCurve(i % 3, f"layer{i}", np.sort(np.asarray(e)), 1.0, len(e)) for i, e in enumerate(raw)]
    steps = [2, 2, 2]
    most = sum(2 * c.max_remove for c in curves)
    budget = 2 * min(budget, most // 2)
    result = allocate_measured(curves, steps, float(budget), exact=True)
    assert result.macs_removed == budget
    assert result.error == pytest.approx(_brute_force_best(curves, steps, budget), abs=1e-9)


def test_stage_allocation_beats_the_paper_counts_and_keeps_its_budget():
    from mosaic_core.prune.measured_allocation import StageLayer, allocate_stages

    layers = [StageLayer("attn", 4, 8.0), StageLayer("mlp", 16, 2.0)]
    # early: cheap errors, middle: costly, late: in between (hand-made recorded ε per removal)
    errors = [
        {"attn": [0.1, 0.2, 0.3], "mlp": np.linspace(0.01, 0.15, 15)},
        {"attn": [5.0, 6.0, 7.0], "mlp": np.linspace(1.0, 3.0, 15)},
        {"attn": [1.0, 1.5, 2.0], "mlp": np.linspace(0.1, 0.9, 15)},
    ]
    paper = [{"attn": 1, "mlp": 4}, {"attn": 1, "mlp": 4}, {"attn": 1, "mlp": 4}]
    result = allocate_stages(layers, errors, [3, 4, 3], paper)
    assert result.budget == 10 * (8.0 + 4 * 2.0)  # Σ n_s · (one head + four units)
    assert result.budget <= result.macs_removed < result.budget + 4 * 8.0
    assert result.error < result.paper_error
    # the paper's per-stage sparsity is the same in every stage: 16 of 64 MACs
    assert result.paper_sparsity == pytest.approx((0.25, 0.25, 0.25))
    # the middle stage's errors are the largest: the measured rule moves its share to the others
    assert result.sparsity[1] < 0.25 < result.sparsity[0]
    assert result.paper_error == pytest.approx(3 * (0.1 + 0.01 + 0.02 + 0.03 + 0.04) + 4 * (5.0 + sum(np.linspace(1.0, 3.0, 15)[:4])) + 3 * (1.0 + sum(np.linspace(0.1, 0.9, 15)[:4])))


@pytest.mark.slow
def test_measured_prune_removes_the_plans_macs_and_round_trips(tiny_pixel_folder, tmp_path):
    import torch

    from mosaic_core.conquer.sampling import run_to_end
    from mosaic_core.divide.cost import sampling_macs
    from mosaic_core.divide.plan import build_plan
    from mosaic_core.models.loading import load_model
    from mosaic_core.prune.calibration import CalibrationConfig
    from mosaic_core.prune.checkpoint import load_pruned, read_manifest, save_pruned
    from mosaic_core.prune.hessian import prunable_layers
    from mosaic_core.prune.stage_pruning import PruneConfig, prune_steps

    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    calibration = CalibrationConfig(size=16, batch_size=8, source="samples", sample_steps=4)
    plan = build_plan(loaded.spec, num_inference_steps=10, sparsity=0.4)
    analyses = {}
    result = run_to_end(prune_steps(loaded, plan, PruneConfig(calibration, allocation="measured"), analyses=analyses), None)
    measured = result.measured
    shape = plan.shape
    # the budget is what the paper's plan removes, by the cost model (per token: divide by tokens)
    removed_by_plan = (sampling_macs(shape, None, plan.step_counts) - plan.macs_staged) / shape.num_tokens
    assert measured.budget == pytest.approx(removed_by_plan)
    # the built networks remove that much, short of one group (a head: 4·D·hd MACs per token, × steps)
    D, hd = shape.hidden_size, shape.head_dim
    dense_per_token = shape.num_layers * (shape.num_heads * 4 * D * hd + shape.mlp_hidden * 2 * D)
    built = 0
    for n, network in zip(plan.step_counts, result.staged.networks()):
        kept = sum(layer.num_groups * (4 * D * hd if layer.kind != "mlp" else 2 * D) for layer in prunable_layers(network))
        built += n * (dense_per_token - kept)
    assert removed_by_plan <= built <= removed_by_plan + max(plan.step_counts) * 4 * D * hd
    assert measured.error <= measured.paper_error
    # the checkpoint says which rule was used, and loads back to the same outputs
    save_pruned(result, loaded, tmp_path / "ckpt")
    manifest = read_manifest(tmp_path / "ckpt")
    assert manifest["prune"]["allocation"] == "measured"
    assert manifest["measured_allocation"]["sparsity"] == pytest.approx(list(measured.sparsity), abs=1e-6)
    # sparsities set per stage stay per stage: each stage removes its own budget, within one group
    manual = build_plan(loaded.spec, num_inference_steps=10, stage_sparsity=(0.5, 0.0, 0.3))
    per_stage = run_to_end(prune_steps(loaded, manual, PruneConfig(calibration, allocation="measured"), analyses=analyses), None)
    group = 4 * D * hd / dense_per_token
    for index, network in enumerate(per_stage.staged.networks()):
        kept = sum(layer.num_groups * (4 * D * hd if layer.kind != "mlp" else 2 * D) for layer in prunable_layers(network))
        assert manual.allocation.achieved[index] <= 1 - kept / dense_per_token <= manual.allocation.achieved[index] + group
    assert per_stage.staged.middle is loaded.transformer  # the stage the user left dense stays dense
    reloaded = load_pruned(tmp_path / "ckpt", loaded)
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    for t in (950, 400, 20):
        kwargs = dict(timestep=torch.full((2,), t), class_labels=torch.tensor([1, 2]))
        assert torch.equal(reloaded(x, **kwargs).sample, result.staged(x, **kwargs).sample)


def test_paper_is_the_per_stage_rule_and_measured_the_prune_default():
    import argparse

    from mosaic_core.commands.prune import add_prune_arguments, prune_config_from_args
    from mosaic_core.models.registry import resolve_model

    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    spec = resolve_model("digits-dit")
    assert prune_config_from_args(parser.parse_args([]), spec).allocation == "measured"
    assert prune_config_from_args(parser.parse_args(["--allocation", "paper"]), spec).allocation == "per-stage"
    assert prune_config_from_args(parser.parse_args(["--scorer", "magnitude"]), spec).allocation == "per-stage"
    with pytest.raises(ValueError, match="needs the OBS scorer"):
        prune_config_from_args(parser.parse_args(["--scorer", "magnitude", "--allocation", "measured"]), spec)


@pytest.mark.slow
def test_studio_result_shows_both_rules_and_the_built_sparsity(tiny_pixel_folder, tmp_path):
    from mosaic_core.conquer.sampling import run_to_end
    from mosaic_core.divide.plan import build_plan
    from mosaic_core.models.loading import load_model
    from mosaic_core.prune.calibration import CalibrationConfig
    from mosaic_core.prune.service import PruneService
    from mosaic_core.prune.stage_pruning import PruneConfig
    from ui.prune_tab import prune_result_html

    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    plan = build_plan(loaded.spec, num_inference_steps=10, sparsity=0.3)
    config = PruneConfig(CalibrationConfig(size=8, batch_size=8, source="samples", sample_steps=4), allocation="measured")
    service = PruneService(tmp_path / "cache")
    pruned = run_to_end(service.prune_steps(loaded, plan, config), None)
    manifest = json.loads((pruned.folder / "manifest.json").read_text())
    # the sparsity read from the built modules equals the allocator's own accounting
    assert [s.sparsity for s in pruned.stages] == pytest.approx(manifest["measured_allocation"]["sparsity"], abs=1e-6)  # JSON keeps 6 decimals
    page = prune_result_html(pruned)
    assert 'data-field="measured-sparsity"' in page and "measured allocation" in page
    assert f"{plan.allocation.achieved[0]:.3f}" in page.split('data-field="paper-sparsity">')[1]


# ----- kept MLP widths in multiples (GEMM-friendly) ------------------------------------------------


def test_a_unit_multiple_rounds_the_cheap_layer_and_takes_the_rest_elsewhere():
    # a: 8 units, ε = 1 each, kept in multiples of 4 (so 0 or 4 may go); b: 8 groups at ε = 1.2.
    # Budget 6 groups: free, a loses 6 (error 6); rounded, a can lose 4 only, and the other
    # 2 come from b: 4 + 2.4 = 6.4, the best any rounded choice does (b alone: 7.2).
    free = [LayerCurve(0, "a", np.ones(7), 1.0, 7), LayerCurve(0, "b", np.full(7, 1.2), 1.0, 7)]
    rounded = [LayerCurve(0, "a", np.ones(7), 1.0, 7, multiple=4, num_groups=8), free[1]]
    assert allocate_measured(free, [1], 6.0, exact=True).removals == {(0, "a"): 6, (0, "b"): 0}
    result = allocate_measured(rounded, [1], 6.0, exact=True)
    assert result.removals == {(0, "a"): 4, (0, "b"): 2} and result.error == pytest.approx(6.4)
    assert list(rounded[0].allowed()) == [0, 4]  # kept 8 or 4 (kept 0 is never allowed)


@settings(max_examples=80, deadline=None)
@given(
    raw=st.lists(st.tuples(st.integers(0, 2), st.integers(2, 12), st.sampled_from([1, 2, 4]), st.sampled_from([1.0, 2.0])),
                 min_size=1, max_size=4),
    seed=st.integers(0, 1000),
    fraction=st.floats(0.0, 1.0),
)
def test_rounded_allocations_keep_multiples_and_meet_the_budget_within_one_step(raw, seed, fraction):
    rng = np.random.default_rng(seed)
    curves = [
        LayerCurve(stage, f"layer{i}", np.sort(rng.uniform(0, 5, groups - 1)), cost, groups - 1, multiple, groups)
        for i, (stage, groups, multiple, cost) in enumerate(raw)
    ]
    steps = [2, 3, 1]
    most = sum(steps[c.stage] * c.cost * int(c.allowed()[-1]) for c in curves)
    budget = fraction * most
    result = allocate_measured(curves, steps, budget, exact=True)
    for c in curves:
        k = result.removals[(c.stage, c.layer)]
        kept = c.num_groups - k
        assert k == 0 or kept % c.multiple == 0, (c, k)  # a whole multiple kept, or the layer untouched
    assert result.macs_removed >= budget - 1e-9
    biggest_step = max(steps[c.stage] * c.cost * c.multiple for c in curves)
    assert result.macs_removed <= budget + biggest_step + 1e-9


@pytest.mark.slow
def test_a_measured_prune_with_a_unit_multiple_keeps_whole_multiples(tiny_pixel_folder):
    from mosaic_core.conquer.sampling import run_to_end
    from mosaic_core.divide.plan import build_plan
    from mosaic_core.models.loading import load_model
    from mosaic_core.prune.calibration import CalibrationConfig
    from mosaic_core.prune.hessian import prunable_layers
    from mosaic_core.prune.stage_pruning import PruneConfig, prune_steps

    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    calibration = CalibrationConfig(size=16, batch_size=8, source="samples", sample_steps=4)
    plan = build_plan(loaded.spec, num_inference_steps=10, sparsity=0.4)
    dense_units = loaded.spec.shape.mlp_hidden
    result = run_to_end(prune_steps(loaded, plan, PruneConfig(calibration, allocation="measured", unit_multiple=8)))
    widths = {layer.num_groups for network in result.staged.networks() for layer in prunable_layers(network) if layer.kind == "mlp"}
    assert widths and all(w == dense_units or w % 8 == 0 for w in widths), widths
    assert widths != {dense_units}  # something was pruned
    with pytest.raises(ValueError, match=r"a unit multiple rounds the measured allocation's kept MLP units; allocation is per-stage"):
        PruneConfig(calibration, unit_multiple=8)
