"""Caches and checkpoints are verified and bounded: each attack of the hardening report reproduced first."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mosaic_core.conquer.sampling import run_to_end
from mosaic_core.divide.plan import build_plan
from mosaic_core.models.loading import load_model
from mosaic_core.prune.cache import (
    AnalysisStore,
    cache_max_bytes,
    cache_usage,
    checkpoint_folder,
    load_cached_staged,
)
from mosaic_core.prune.calibration import CalibrationConfig
from mosaic_core.prune.checkpoint import DIGEST_FIELD, FORMAT_VERSION, load_pruned, read_manifest, save_pruned
from mosaic_core.prune.stage_pruning import PruneConfig, StageAnalysis, prune_steps

CONFIG = PruneConfig(CalibrationConfig(size=16, batch_size=8, source="samples", sample_steps=4))
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pixel(tiny_pixel_folder):
    return load_model(str(tiny_pixel_folder), device="cpu")


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    """An analysis cache folder filled once for the module (by the `pruned` fixture)."""
    return tmp_path_factory.mktemp("clean-cache")


@pytest.fixture(scope="module")
def pruned(pixel, store_root):
    """A plan whose three stages each have their own network, pruned once for the module."""
    plan = build_plan(pixel.spec, num_inference_steps=10, sparsity=0.4)
    result = run_to_end(prune_steps(pixel, plan, CONFIG, analyses=AnalysisStore(store_root)))
    assert len({id(n) for n in result.staged.networks()}) == 3
    return plan, result


def outputs(model):
    torch.manual_seed(0)
    x = torch.randn(3, 1, 8, 8)
    return [model(x, timestep=torch.full((3,), t), class_labels=torch.tensor([1, 2, 3])).sample for t in (950, 400, 20)]


def same_outputs(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(outputs(a), outputs(b)))


def edit_manifest(folder: Path, change, version: int | None = None) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    if version == 1:  # what a version-1 writer produced: no whole-content digest
        manifest.pop(DIGEST_FIELD, None)
        manifest["format_version"] = 1
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def swap_first_two_networks(manifest) -> None:
    stages = manifest["stages"]
    stages[0]["network"], stages[1]["network"] = stages[1]["network"], stages[0]["network"]


def move_boundary(manifest) -> None:
    manifest["stages"][1]["t_min"] += 5
    manifest["plan"]["stages"][1]["t_min"] += 5


def test_checkpoints_are_version_2_and_swapped_networks_or_moved_boundaries_are_refused(pixel, pruned, tmp_path):
    plan, result = pruned
    folder = save_pruned(result, pixel, tmp_path / "ckpt")
    manifest = read_manifest(folder)
    assert FORMAT_VERSION == 2 and manifest["format_version"] == 2 and len(manifest[DIGEST_FIELD]) == 64
    assert same_outputs(load_pruned(folder, pixel), result.staged)
    for attack in (swap_first_two_networks, move_boundary):
        attacked = tmp_path / attack.__name__
        shutil.copytree(folder, attacked)
        edit_manifest(attacked, attack)
        with pytest.raises(ValueError, match="does not match its content"):
            load_pruned(attacked, pixel)


def test_version_1_checkpoints_still_load_and_what_they_carry_is_checked(pixel, pruned, tmp_path):
    plan, result = pruned
    folder = save_pruned(result, pixel, tmp_path / "v1")
    edit_manifest(folder, lambda m: None, version=1)
    assert read_manifest(folder)["format_version"] == 1
    assert same_outputs(load_pruned(folder, pixel), result.staged)  # the old format is still read, bit for bit
    kept = list(zip(plan.allocation.heads_kept, plan.allocation.units_kept))
    assert kept[0] != kept[1]  # the two swapped stages keep different sizes, so v1 can tell
    for attack, words in ((swap_first_two_networks, "kept sizes differ"), (move_boundary, "plan")):
        attacked = tmp_path / attack.__name__
        shutil.copytree(folder, attacked)
        edit_manifest(attacked, attack, version=1)
        with pytest.raises(ValueError, match=words):
            load_pruned(attacked, pixel)


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda m: m.pop("plan"), "'plan' is missing"),
        (lambda m: m.pop("networks"), "'networks' is missing"),
        (lambda m: m.update(stages="three"), "'stages' must be a list"),
        (lambda m: m["networks"][0].update(file="/etc/passwd"), "plain name"),
        (lambda m: m["networks"][0].update(file="../../network_0.safetensors"), "plain name"),
        (lambda m: m["networks"][0].update(file="sub/network_0.safetensors"), "plain name"),
        (lambda m: m["networks"][0].update(sha256=None), "sha256"),
        (lambda m: m["networks"][0].update(keep=[{"heads": "0,1"}]), "keep"),
        (lambda m: m["stages"][0].update(network="0"), "network must be null or a network index"),
        (lambda m: m["stages"][0].update(network=7), "network must be null or a network index"),
        (lambda m: m.update(format_version=99), "readable version"),
        (lambda m: m.update(cx="high"), "'cx' must be a number"),
    ],
)
def test_malformed_manifests_are_refused_with_a_clear_error(pixel, pruned, tmp_path, change, words):
    folder = save_pruned(pruned[1], pixel, tmp_path / "ckpt")
    edit_manifest(folder, change, version=1)  # v1: no digest, so the schema checks themselves answer
    with pytest.raises(ValueError, match=words):
        load_pruned(folder, pixel)


def test_the_app_cache_discards_a_tampered_checkpoint_and_recomputes(pixel, pruned, store_root, tmp_path, caplog):
    from mosaic_core.prune.service import PruneService

    plan, result = pruned
    shutil.copytree(store_root / "analyses", tmp_path / "analyses")  # the Hessians, so only the build reruns
    first = run_to_end(PruneService(tmp_path).prune_steps(pixel, plan, CONFIG))
    assert first.source == "pruned"
    edit_manifest(first.folder, swap_first_two_networks)  # what a disk-cache attacker does
    with caplog.at_level(logging.WARNING, logger="mosaic_core.prune.cache"):
        again = run_to_end(PruneService(tmp_path).prune_steps(pixel, plan, CONFIG))  # a restart: memory is empty
    assert again.source == "pruned"  # not "disk": the tampered entry was not used
    assert any("discarding damaged cache entry" in r.getMessage() for r in caplog.records)
    assert same_outputs(again.staged, first.staged)
    assert load_cached_staged(tmp_path, pixel, plan, CONFIG) is not None  # rewritten, and it verifies


def test_a_cached_checkpoint_must_hold_the_settings_its_key_names(pixel, pruned, tmp_path):
    plan, result = pruned
    other = build_plan(pixel.spec, num_inference_steps=10, sparsity=0.2)
    folder = checkpoint_folder(tmp_path, pixel.weights_hash, other, CONFIG)
    save_pruned(result, pixel, folder)  # a valid checkpoint, under the key of other settings
    assert load_cached_staged(tmp_path, pixel, other, CONFIG) is None
    assert not folder.exists()


def test_flipped_hessian_bytes_are_discarded_and_recomputed_to_the_clean_result(pixel, pruned, store_root, tmp_path, caplog):
    plan, clean = pruned
    attacked = tmp_path / "attacked"
    shutil.copytree(store_root, attacked)  # the cache the clean run wrote, then damaged
    assert len(list((attacked / "analyses").iterdir())) == 3
    for entry in sorted((attacked / "analyses").iterdir()):
        hessians = entry / "hessians.safetensors"
        data = bytearray(hessians.read_bytes())
        data[len(data) // 2] ^= 0x01  # a small flip: the lowest bit of one float64
        hessians.write_bytes(bytes(data))
    events = []
    with caplog.at_level(logging.WARNING, logger="mosaic_core.prune.cache"):
        again = run_to_end(prune_steps(pixel, plan, CONFIG, analyses=AnalysisStore(attacked)), events.append)
    assert sum("discarding damaged cache entry" in r.getMessage() for r in caplog.records) == 3
    assert any(e.phase == "hessian" for e in events)  # recomputed, not used
    assert same_outputs(again.staged, clean.staged)
    fresh = AnalysisStore(attacked)  # the rewritten entries verify
    assert len(fresh) == 3 and all(fresh[key].hessians for key in fresh)


def synthetic_analysis(key: str, megabytes: float) -> StageAnalysis:
    numel = int(megabytes * 2**20 / 8)
    return StageAnalysis(key, (0, 10), {"layer": torch.arange(numel, dtype=torch.float64)}, {}, 1.0)


def test_the_in_memory_hessians_are_an_lru_within_a_byte_budget(tmp_path):
    store = AnalysisStore(tmp_path, memory_bytes=int(2.5 * 2**20), max_disk_bytes=1 << 30)
    for index in range(5):
        store[f"key{index}"] = synthetic_analysis(f"key{index}", 1)
        assert store.memory_used <= 2.5 * 2**20
    assert list(store._memory) == ["key3", "key4"]
    assert torch.equal(store["key0"].hessians["layer"], synthetic_analysis("key0", 1).hessians["layer"])  # from disk
    assert list(store._memory) == ["key4", "key0"]  # and now the most recently used
    big = AnalysisStore(tmp_path / "big", memory_bytes=2**20, max_hessian_bytes=0)
    big["huge"] = synthetic_analysis("huge", 3)  # larger than the whole budget and not on disk
    assert "huge" in big and list(big._memory) == ["huge"]  # the newest entry is kept


def test_the_disk_cache_is_capped_and_evicts_the_least_recently_used(tmp_path, monkeypatch):
    monkeypatch.delenv("MOSAIC_CACHE_MAX_BYTES", raising=False)
    assert cache_max_bytes() == 2 * 2**30
    monkeypatch.setenv("MOSAIC_CACHE_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match="MOSAIC_CACHE_MAX_BYTES"):
        cache_max_bytes()
    monkeypatch.setenv("MOSAIC_CACHE_MAX_BYTES", str(int(3.5 * 2**20)))
    store = AnalysisStore(tmp_path)
    assert store.max_disk_bytes == int(3.5 * 2**20)
    for index in range(3):
        store[f"key{index}"] = synthetic_analysis(f"key{index}", 1)
    folders = {key: tmp_path / "analyses" / key for key in ("key0", "key1", "key2")}
    for age, key in enumerate(("key2", "key1", "key0")):  # key0 oldest
        os.utime(folders[key], (time.time() - 100 * (age + 1),) * 2)
    AnalysisStore(tmp_path, memory_bytes=0)["key0"]  # a hit makes key0 the most recently used
    store["key3"] = synthetic_analysis("key3", 1)
    usage = cache_usage(tmp_path)
    assert usage.bytes <= 3.5 * 2**20 and usage.max_bytes == int(3.5 * 2**20)
    assert sorted(p.name for p in (tmp_path / "analyses").iterdir()) == ["key0", "key2", "key3"]  # key1 was LRU
    assert usage.analyses_entries == usage.entries == 3 and usage.pruned_entries == 0
    assert usage.bytes == sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())


def test_the_prune_service_holds_a_bounded_number_of_models(pixel, pruned, store_root, tmp_path):
    from mosaic_core.prune.service import PruneService

    shutil.copytree(store_root / "analyses", tmp_path / "analyses")

    service = PruneService(tmp_path, memory_size=4, memory_bytes=0)  # no room: only the newest stays
    for sparsity in (0.4, 0.3):
        plan = build_plan(pixel.spec, num_inference_steps=10, sparsity=sparsity)
        run_to_end(service.prune_steps(pixel, plan, CONFIG))
    assert len(service._memory) == 1 and service.cached(pixel.spec, plan, CONFIG) is not None
    assert cache_usage(tmp_path).pruned_entries == 2


HOLDER = """
import sys, time
from mosaic_core.atomic import replace_folder
with replace_folder(sys.argv[1]) as tmp:
    (tmp / "network_0.safetensors").write_bytes(b"x" * 1000)
    print("writing", flush=True)
    time.sleep(120)
"""


def start_writer(target: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(target)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stdout.readline().strip() == "writing"
    return process


def test_a_killed_writes_temp_folder_is_removed_but_a_live_one_is_not(tmp_path):
    from mosaic_core.atomic import clean_stale, replace_folder

    killed = start_writer(tmp_path / "ckpt")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    live = start_writer(tmp_path / "other")
    try:
        leftovers = sorted(p for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
        assert len(leftovers) == 2 and all(p.is_dir() for p in leftovers)
        assert clean_stale(tmp_path) == []  # both too recent to be judged
        old = time.time() - 3600
        for path in leftovers:
            os.utime(path, (old, old))
        with replace_folder(tmp_path / "ckpt") as tmp:  # the next write beside them cleans up
            (tmp / "manifest.json").write_text("{}")
        remaining = sorted(p.name for p in tmp_path.iterdir())
        assert remaining == sorted(["ckpt", next(p.name for p in leftovers if f"-{live.pid}-" in p.name)])
    finally:
        live.kill()
        live.wait()


def test_opening_a_cache_removes_leftovers_of_killed_writes(tmp_path):
    pruned_dir = tmp_path / "pruned"
    pruned_dir.mkdir(parents=True)
    legacy = pruned_dir / ".abc123.k2j4h5g6.tmp"  # an earlier version's temp name, no pid
    legacy.mkdir()
    fresh = pruned_dir / ".abc124.x1y2z3w4.tmp"
    fresh.mkdir()
    os.utime(legacy, (time.time() - 3600,) * 2)
    AnalysisStore(tmp_path)
    assert not legacy.exists() and fresh.exists()  # only the stale one
