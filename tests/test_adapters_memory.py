"""Hessians gathered a few blocks at a time under a memory budget give the same analysis."""

from __future__ import annotations

import pytest
import torch

from mosaic_core.divide.plan import build_plan
from mosaic_core.jobs import run_to_end
from mosaic_core.models.loading import load_model
from mosaic_core.prune.calibration import CalibrationConfig
from mosaic_core.prune.hessian import prunable_layers
from mosaic_core.prune.stage_pruning import PruneConfig, hessian_chunks, prune_steps


def test_chunks_are_whole_blocks_within_the_budget():
    from conftest import tiny_pixel_dit

    layers = prunable_layers(tiny_pixel_dit(num_layers=4))
    per_block = 8 * (32**2 + 128**2)
    assert hessian_chunks(layers, None) == [layers]
    chunks = hessian_chunks(layers, 2 * per_block)
    assert [len({l.block for l in chunk}) for chunk in chunks] == [2, 2]
    assert [l for chunk in chunks for l in chunk] == layers
    assert len(hessian_chunks(layers, 1)) == 4  # a block larger than the budget is its own chunk
    with pytest.raises(ValueError, match="hessian budget must be a positive number"):
        PruneConfig(hessian_budget=0)


def test_budgeted_prune_equals_the_all_at_once_prune(tiny_pixel_folder):
    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    plan = build_plan(loaded.spec, 10, stage_sparsity=(0.5, 0.25, 0.5))
    calibration = CalibrationConfig(size=16, batch_size=8, source="samples", sample_steps=3)
    whole = run_to_end(prune_steps(loaded, plan, PruneConfig(calibration=calibration)))
    per_block = 8 * (32**2 + 128**2)  # the tiny DiT: D = 32, F = 128
    events = []
    budgeted = run_to_end(prune_steps(loaded, plan, PruneConfig(calibration=calibration, hessian_budget=per_block)), events.append)
    assert whole.hessian_peak_bytes == 2 * per_block and budgeted.hessian_peak_bytes == per_block
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions)
    for key, analysis in whole.analyses.items():
        other = budgeted.analyses[key]
        assert all(torch.equal(analysis.hessians[n], other.hessians[n]) for n in analysis.hessians)
        assert all(analysis.traces[n].order == other.traces[n].order for n in analysis.traces)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        for t in (900, 500, 50):
            kwargs = dict(timestep=torch.full((2,), t), class_labels=torch.tensor([1, 2]))
            assert torch.equal(whole.staged(x, **kwargs).sample, budgeted.staged(x, **kwargs).sample)
