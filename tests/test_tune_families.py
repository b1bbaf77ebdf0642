"""The tuner on the other families: a UNet (SDXL, blockwise shapes) and PixArt (text-conditioned DiT)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def _tune_and_check(folder, budget=0.6, steps=6):
    from mosaic_core.conquer.tune import METHODS, tune
    from mosaic_core.models.loading import load_model
    from mosaic_core.prune.calibration import CalibrationConfig
    from mosaic_core.prune.stage_pruning import PruneConfig

    loaded = load_model(str(folder), device="cpu")
    config = PruneConfig(CalibrationConfig(size=4, batch_size=4, source="samples", sample_steps=3))
    analyses: dict = {}
    result = tune(loaded, budget, config, reference_steps=steps, steps_grid=(3, 5, steps), images=2, analyses=analyses,
                  methods=METHODS, scheduler="ddim")
    kinds = {p.allocation for p in result.points}
    assert {"dense", "measured"} <= kinds, kinds
    for p in result.points:
        if p.allocation != "dense":
            assert 0 < p.macs_fraction <= budget + 1e-12, p
    chosen = result.points[result.chosen]
    assert chosen.macs_fraction <= budget + 1e-12
    return loaded, config, analyses, result


def test_the_tuner_prices_a_unets_pruned_steps_by_its_own_blocks(tiny_sdxl_folder):
    from mosaic_core.conquer.sampling import run_to_end
    from mosaic_core.divide.plan import build_plan
    from mosaic_core.prune.stage_pruning import prune_steps
    from mosaic_core.conquer.tune import staged_step_macs

    loaded, config, analyses, result = _tune_and_check(tiny_sdxl_folder)
    # a measured network's MACs per step, summed over the steps, are what the plan says it removes
    plan = build_plan(loaded.spec, 6, sparsity=0.4, scheduler="ddim")
    pruned = run_to_end(prune_steps(loaded, plan, config.__class__(config.calibration, allocation="measured"), analyses=analyses))
    removed = plan.macs_dense - sum(staged_step_macs(plan, pruned))
    budget = plan.macs_dense - plan.macs_staged  # what the paper's counts remove: the measured rule's budget
    assert removed >= budget * (1 - 1e-9)
    assert removed <= budget * 1.25  # within a few groups of it


def test_the_tuner_runs_on_pixart(tmp_path):
    from tiny_pixart import write_tiny_pixart_folder

    _tune_and_check(write_tiny_pixart_folder(tmp_path / "pixart"))


def test_a_unets_predicted_candidates_cost_what_its_built_networks_cost(tiny_sdxl_folder):
    """On blockwise shapes too, a re-tune's predicted points carry the recorded error, MACs and stage sparsities
    of the networks an exhaustive tune builds for them."""
    from mosaic_core.conquer.tune import tune
    from mosaic_core.models.loading import load_model
    from mosaic_core.prune.calibration import CalibrationConfig
    from mosaic_core.prune.stage_pruning import PruneConfig

    loaded = load_model(str(tiny_sdxl_folder), device="cpu")
    config = PruneConfig(CalibrationConfig(size=4, batch_size=4, source="samples", sample_steps=3))
    analyses, memo = {}, {}
    kwargs = dict(reference_steps=8, steps_grid=(4, 5, 6, 7, 8), images=1, analyses=analyses, scheduler="ddim",
                  methods=("dense", "paper", "measured"))
    tune(loaded, 0.6, config, memo=memo, **kwargs)
    second = tune(loaded, 0.5, config, memo=memo, check=1, **kwargs)
    exhaustive = {(p.steps, p.allocation): p for p in tune(loaded, 0.5, config, memo={}, check=0, **kwargs).points}
    predicted = [p for p in second.points if p.predicted]
    assert predicted
    for p in predicted:
        reference = exhaustive[(p.steps, p.allocation)]
        assert p.recorded_error == pytest.approx(reference.recorded_error, rel=1e-9)
        assert (p.macs, p.stage_sparsity) == (reference.macs, reference.stage_sparsity)
