"""Prune end to end on tiny real DiTs: plans, equivalences, checkpoints, cancel, reuse, DiT-XL/2 path."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from mosaic_core.prune.calibration import CalibrationConfig, CleanSet, calibration_batches
from mosaic_core.prune.checkpoint import load_pruned, read_manifest, save_pruned
from mosaic_core.jobs import Cancelled
from mosaic_core.models.loading import load_model
from mosaic_core.divide.plan import build_plan
from mosaic_core.prune.stage_pruning import PruneConfig, prune_steps
from mosaic_core.models.registry import resolve_model
from mosaic_core.conquer.sampling import SampleConfig, run_to_end, sample_loaded

CONFIG = PruneConfig(CalibrationConfig(size=16, batch_size=8, source="samples", sample_steps=4))


@pytest.fixture(scope="module")
def pixel(tiny_pixel_folder):
    return load_model(str(tiny_pixel_folder), device="cpu")


@pytest.fixture(scope="module")
def analyses():
    """A cache of analyses shared by the tests of this module, only to save time: a test that
    asserts what is (not) computed uses its own empty dict, so any order gives the same result."""
    return {}


def _prune(loaded, analyses=None, config=CONFIG, **plan_kwargs):
    plan = build_plan(loaded.spec, num_inference_steps=10, **plan_kwargs)
    events = []
    result = run_to_end(prune_steps(loaded, plan, config, analyses=analyses), events.append)
    return plan, result, events


def _outputs(model, channels=1, size=8):
    torch.manual_seed(0)
    x = torch.randn(3, channels, size, size)
    return [model(x, timestep=torch.full((3,), t), class_labels=torch.tensor([1, 2, 3])).sample for t in (950, 400, 20)]


def test_zero_sparsity_is_bit_identical_and_needs_no_calibration(pixel):
    plan, result, events = _prune(pixel, sparsity=0.0)
    assert not any(e.phase in ("calibrate", "hessian") for e in events)
    for staged_out, dense_out in zip(_outputs(result.staged), _outputs(pixel.transformer)):
        assert torch.equal(staged_out, dense_out)


@pytest.mark.slow
def test_kept_counts_equal_the_plan_and_progress_is_monotone(pixel):
    plan, result, events = _prune(pixel, {}, stage_sparsity=(0.5, 0.25, 0.75))  # fresh: every stage analysed
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {e.stage for e in events if e.phase == "hessian"} == {"early", "middle", "late"}
    for index, network in enumerate(result.staged.networks()):
        for block in network.transformer_blocks:
            assert block.attn1.heads == plan.allocation.heads_kept[index]
            assert block.attn1.to_q.out_features == plan.allocation.heads_kept[index] * 8
            assert block.ff.net[2].in_features == plan.allocation.units_kept[index]
    # the three stages differ, and each differs from dense
    outs = _outputs(result.staged)
    dense = _outputs(pixel.transformer)
    assert all(not torch.allclose(a, b) for a, b in zip(outs, dense))


def test_changing_only_the_sparsity_reuses_the_hessians(pixel, analyses):
    _prune(pixel, analyses, sparsity=0.3)
    cached = dict(analyses)
    plan, result, events = _prune(pixel, analyses, sparsity=0.6)
    assert not any(e.phase in ("hessian", "solve") for e in events)
    assert set(analyses) == set(cached)
    assert plan.overall_sparsity == pytest.approx(0.6, abs=0.02)


def test_random_and_clean_calibration_share_one_analysis(pixel):
    for mode in ("random", "clean"):
        config = PruneConfig(CalibrationConfig(mode=mode, size=8, batch_size=8, source="samples", sample_steps=2))
        _, result, events = _prune(pixel, config=config, stage_sparsity=(0.5, 0.25, 0.5))
        assert {e.stage for e in events if e.phase == "hessian"} == {"all stages"}
        assert len(result.analyses) == 1
        early, middle, late = result.staged.networks()
        assert early is late and early is not middle  # equal stages share one network


def test_magnitude_scorer_slices_without_weight_update(pixel):
    config = PruneConfig(CONFIG.calibration, scorer="magnitude")
    _, result, events = _prune(pixel, config=config, sparsity=0.4)
    assert not any(e.phase == "hessian" for e in events)
    assert all(spec is None or spec[1] == {} for spec in result.stage_networks)


def test_checkpoint_round_trip_is_bit_identical(pixel, analyses, tmp_path):
    _, result, _ = _prune(pixel, analyses, sparsity=0.4)
    folder = save_pruned(result, pixel, tmp_path / "ckpt")
    manifest = read_manifest(folder)
    assert manifest["base_weights_hash"] == pixel.weights_hash and len(manifest["stages"]) == 3
    loaded_staged = load_pruned(folder, pixel)
    for a, b in zip(_outputs(result.staged), _outputs(loaded_staged)):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob(".*"))  # no temporary leftovers


def test_wrong_base_and_damaged_files_are_refused(pixel, analyses, tmp_path):
    from conftest import tiny_pixel_dit

    _, result, _ = _prune(pixel, analyses, sparsity=0.4)
    folder = save_pruned(result, pixel, tmp_path / "ckpt")
    other_folder = tmp_path / "other"
    tiny_pixel_dit(seed=5).save_pretrained(other_folder, safe_serialization=True)
    shutil.copy(pixel.spec.path + "/scheduler_config.json", other_folder)
    other = load_model(str(other_folder), device="cpu")
    with pytest.raises(ValueError, match="was pruned from"):
        load_pruned(folder, other)
    # the same weights named by another path (a copy here; a relative path or a link alike)
    # are the same model: a checkpoint was refused when the name differed, hashes equal
    copy = tmp_path / "copy of the base"
    shutil.copytree(pixel.spec.path, copy)
    same = load_model(str(copy), device="cpu")
    assert same.spec.name != pixel.spec.name and same.weights_hash == pixel.weights_hash
    for a, b in zip(_outputs(result.staged), _outputs(load_pruned(folder, same))):
        assert torch.equal(a, b)
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    tensor_file = damaged / "network_0.safetensors"
    data = bytearray(tensor_file.read_bytes())
    data[-5] ^= 0xFF
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its SHA-256"):
        load_pruned(damaged, pixel)
    (damaged / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="damaged manifest"):
        load_pruned(damaged, pixel)
    with pytest.raises(ValueError, match="manifest.json is missing"):
        load_pruned(tmp_path, pixel)
    with pytest.raises(ValueError, match="'.*nowhere' does not exist: give the folder `prune --out` wrote"):
        load_pruned(tmp_path / "nowhere", pixel)


def test_cancel_stops_cleanly_and_keeps_the_earlier_checkpoint(pixel, analyses, tmp_path):
    _, result, _ = _prune(pixel, analyses, sparsity=0.4)
    folder = save_pruned(result, pixel, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    plan = build_plan(pixel.spec, num_inference_steps=10, sparsity=0.5)
    seen = []
    config = PruneConfig(CalibrationConfig(size=16, batch_size=8, source="samples", sample_steps=4, seed=9))
    with pytest.raises(Cancelled):
        run_to_end(prune_steps(pixel, plan, config, should_stop=lambda: len(seen) >= 3), seen.append)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_calibration_batches_follow_the_mode():
    torch.manual_seed(0)
    clean = CleanSet(torch.randn(10, 1, 4, 4), torch.arange(10) % 3)
    alphas = torch.linspace(0.999, 0.01, 1000)
    batches = list(calibration_batches(clean, alphas, (100, 200), CalibrationConfig(size=10, batch_size=4), null_class=3))
    assert len(batches) == 6  # 3 batches, each followed by its null-label copy
    for (x, t, y), (x_null, t_null, y_null) in zip(batches[::2], batches[1::2]):
        assert ((t >= 100) & (t <= 200)).all() and torch.equal(t, t_null) and torch.equal(x, x_null)
        assert (y_null == 3).all() and (y < 3).all()
    clean_batches = list(calibration_batches(clean, alphas, (100, 200), CalibrationConfig(mode="clean", size=10), null_class=3))
    assert torch.equal(clean_batches[0][0], clean.x0) and (clean_batches[0][1] == 0).all()
    random_t = torch.cat([b[1] for b in calibration_batches(CleanSet(torch.randn(400, 1, 2, 2), torch.zeros(400, dtype=torch.long)), alphas, (100, 200), CalibrationConfig(mode="random", size=400, batch_size=400), null_class=1)])
    assert random_t.min() < 100 and random_t.max() > 200
    with pytest.raises(ValueError, match="unknown calibration mode 'foo'"):
        CalibrationConfig(mode="foo")
    with pytest.raises(ValueError, match=r"calibration size must be in \[1, 8192\], got 0"):
        CalibrationConfig(size=0)


def test_latent_dit_prunes_from_its_own_samples_and_runs_in_dit_pipeline(tiny_latent_folder):
    """The DiT-XL/2 path in miniature: 1000 classes, learned sigma, a VAE, data-free calibration,
    and diffusers' own DiTPipeline running the staged model unchanged."""
    from diffusers import DDIMScheduler, DiTPipeline

    loaded = load_model(str(tiny_latent_folder), device="cpu")
    plan, result, _ = _prune(loaded, stage_sparsity=(0.5, 0.0, 0.5))
    staged = result.staged
    assert staged.networks()[1] is loaded.transformer  # 0 % middle stage = the dense network
    images = run_to_end(sample_loaded(loaded, [3, 7], SampleConfig(num_inference_steps=5), transformer=staged)).images
    assert images.shape == (2, 16, 16, 3)

    pipeline = DiTPipeline(transformer=staged, vae=loaded.vae, scheduler=DDIMScheduler(**dict(loaded.scheduler_config)))
    staged.reset_stage_calls()
    output = pipeline(class_labels=[1, 2], num_inference_steps=10, guidance_scale=1.5, generator=torch.manual_seed(0), output_type="np")
    assert output.images.shape == (2, 16, 16, 3) and np.isfinite(output.images).all()
    expected = [("early", "middle", "late")[stage] for stage in plan.step_stages]
    assert staged.stage_calls == expected


def test_disk_cache_survives_a_restart_and_ignores_damaged_entries(pixel, tmp_path):
    from mosaic_core.prune.cache import AnalysisStore, checkpoint_folder, load_cached_staged

    store = AnalysisStore(tmp_path)
    plan, result, _ = _prune(pixel, store, sparsity=0.4)
    assert len(store) == 3 and all((tmp_path / "analyses" / key / "traces.json").is_file() for key in store)
    # a new process: a fresh store reads the Hessians and orders back, bit for bit
    fresh = AnalysisStore(tmp_path)
    for key in store:
        a, b = store[key], fresh[key]
        assert a.traces == b.traces and all(torch.equal(a.hessians[n], b.hessians[n]) for n in a.hessians)
    events = []
    run_to_end(prune_steps(pixel, build_plan(pixel.spec, num_inference_steps=10, sparsity=0.6), CONFIG, analyses=fresh), events.append)
    assert not any(e.phase == "hessian" for e in events)
    # checkpoints by settings
    assert load_cached_staged(tmp_path, pixel, plan, CONFIG) is None
    save_pruned(result, pixel, checkpoint_folder(tmp_path, pixel.weights_hash, plan, CONFIG))
    cached = load_cached_staged(tmp_path, pixel, plan, CONFIG)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(cached), _outputs(result.staged)))
    # a damaged analysis entry counts as absent
    key = next(iter(store))
    (tmp_path / "analyses" / key / "traces.json").write_text("{")
    assert key not in AnalysisStore(tmp_path)


def test_per_block_allocation_spends_the_same_macs_with_less_error(pixel, analyses):
    """Per-block allocation keeps each stage's MAC budget (within one MLP unit) and lowers the
    summed OBS error of the removals, re-using the per-stage Hessians."""
    plan = build_plan(pixel.spec, num_inference_steps=10, sparsity=0.5)
    per_stage = run_to_end(prune_steps(pixel, plan, CONFIG, analyses=analyses))
    events = []
    config = PruneConfig(CONFIG.calibration, allocation="per-block")
    per_block = run_to_end(prune_steps(pixel, plan, config, analyses=analyses), events.append)
    assert not any(e.phase == "hessian" for e in events)
    width = 32  # 4 heads x 8

    def macs_and_error(result, index):
        keeps, _ = result.stage_networks[index]
        analysis = next(iter(a for a in result.analyses.values() if a.t_range == plan.bounds.ranges[index]))
        macs = error = 0.0
        for block, keep in enumerate(keeps):
            for name, kept, total, unit in (
                (f"transformer_blocks.{block}.attn1.to_out.0", keep.heads, 4, 4 * width * 8),
                (f"transformer_blocks.{block}.ff.net.2", keep.units, 128, 2 * width),
            ):
                macs += unit * len(kept)
                error += analysis.traces[name].cumulative_error(total - len(kept))
        return macs, error

    for index in range(3):
        if per_stage.stage_networks[index] is None:
            continue
        macs_a, error_a = macs_and_error(per_stage, index)
        macs_b, error_b = macs_and_error(per_block, index)
        assert abs(macs_a - macs_b) <= 2 * width
        assert error_b <= error_a + 1e-12
        keeps, _ = per_block.stage_networks[index]
        assert all(len(k.heads) >= 1 and len(k.units) >= 1 for k in keeps)
    with pytest.raises(ValueError, match="per-block allocation needs the OBS scorer"):
        PruneConfig(allocation="per-block", scorer="magnitude")


def test_the_prepared_layer_cache_stays_within_its_bound_and_returns_what_it_kept():
    from dataclasses import dataclass

    from mosaic_core.prune.stage_pruning import _PreparedCache

    @dataclass
    class Entry:
        nbytes: int

    cache = _PreparedCache(max_bytes=100)
    computed = []

    def entry(size):
        def compute():
            computed.append(size)
            return Entry(size)
        return compute

    first = cache.get(("a",), entry(10))
    assert cache.get(("a",), entry(10)) is first and computed == [10]  # the second call is a hit
    for i in range(12):
        cache.get(("b", i), entry(10))
    assert cache._bytes <= 100 and ("a",) not in cache._entries  # the least recently used went first
    big = cache.get(("big",), entry(60))  # more than an eighth of the bound: computed, not kept
    assert big.nbytes == 60 and ("big",) not in cache._entries
