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


def test_budgeted_hessians_live_on_disk_and_serve_a_new_sparsity_like_in_memory_ones(tiny_pixel_folder, tmp_path):
    """Under a budget the analysis holds no Hessian in memory after the gathering: each chunk
    is a safetensors file, read back one layer at a time. A second prune at another sparsity
    (which re-solves the kept weights from H) gives the weights of the in-memory analysis,
    the disk cache stores and verifies the chunk files, and the files go with the object."""
    import gc

    from mosaic_core.prune.cache import AnalysisStore
    from mosaic_core.prune.spill import SpilledHessians

    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    calibration = CalibrationConfig(size=16, batch_size=8, source="samples", sample_steps=3)
    per_block = 8 * (32**2 + 128**2)
    first = build_plan(loaded.spec, 10, stage_sparsity=(0.5, 0.25, 0.5))
    second = build_plan(loaded.spec, 10, stage_sparsity=(0.25, 0.5, 0.25))  # same stages, other sparsities
    whole, budgeted, store = {}, {}, AnalysisStore(tmp_path / "cache", memory_bytes=1 << 30)
    run_to_end(prune_steps(loaded, first, PruneConfig(calibration=calibration), analyses=whole))
    run_to_end(prune_steps(loaded, first, PruneConfig(calibration=calibration, hessian_budget=per_block), analyses=budgeted))
    for analysis in budgeted.values():
        assert isinstance(analysis.hessians, SpilledHessians) and len(analysis.hessians.files) == 2  # two blocks
        assert analysis.hessians.nbytes == 2 * per_block
        assert sorted(analysis.hessians) == sorted(whole[analysis.key].hessians)
    expected = run_to_end(prune_steps(loaded, second, PruneConfig(calibration=calibration), analyses=whole))
    got = run_to_end(prune_steps(loaded, second, PruneConfig(calibration=calibration, hessian_budget=per_block), analyses=budgeted))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        for t in (900, 500, 50):
            kwargs = dict(timestep=torch.full((3,), t), class_labels=torch.tensor([1, 2, 3]))
            assert torch.equal(expected.staged(x, **kwargs).sample, got.staged(x, **kwargs).sample)
    # The disk cache keeps the chunks as files; a fresh store (nothing in memory) reads them back.
    key, analysis = next(iter(budgeted.items()))
    store[key] = analysis
    entry = tmp_path / "cache" / "analyses" / key
    assert sorted(p.name for p in entry.glob("hessians-*.safetensors")) == [p.name for p in analysis.hessians.files]
    again = AnalysisStore(tmp_path / "cache")[key]
    assert isinstance(again.hessians, SpilledHessians)
    assert all(torch.equal(again.hessians[n], whole[key].hessians[n]) for n in whole[key].hessians)
    # A flipped byte in a chunk file: the entry is discarded, never used.
    chunk = next(entry.glob("hessians-*.safetensors"))
    data = bytearray(chunk.read_bytes())
    data[-9] ^= 0x40
    chunk.write_bytes(bytes(data))
    assert key not in AnalysisStore(tmp_path / "cache") and not entry.exists()
    # The spill folders belong to their objects.
    folders = [a.hessians.folder for a in budgeted.values()] + [again.hessians.folder]
    assert all(folder.is_dir() for folder in folders)
    del analysis, again, got, store
    budgeted.clear()
    gc.collect()
    assert not any(folder.exists() for folder in folders)


def test_stale_spill_folders_of_killed_processes_are_removed(tmp_path):
    import os
    import time

    from mosaic_core.prune.spill import SpilledHessians, clean_stale_spills

    live = SpilledHessians(parent=tmp_path)
    live.add_chunk({"a": torch.eye(3, dtype=torch.float64)})
    stale = tmp_path / "mosaic-hessians-dead"
    stale.mkdir()
    (stale / "hessians-000.safetensors").write_bytes(b"x")
    old = time.time() - 2 * 24 * 3600
    os.utime(stale, (old, old))
    other = tmp_path / "someone-elses"
    other.mkdir()
    os.utime(other, (old, old))
    assert clean_stale_spills(tmp_path) == [stale]
    assert live.folder.is_dir() and other.is_dir() and torch.equal(live["a"], torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="already spilled for a"):
        live.add_chunk({"a": torch.eye(3, dtype=torch.float64)})
