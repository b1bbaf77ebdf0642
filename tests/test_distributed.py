"""Several processes, one result: two real gloo processes (`accelerate launch`) against one.

The launched runs use the tiny pixel DiT folder; calibration and sampling are split into
several batches so that each process really gets a share (3 calibration batches: process 0
runs 2, process 1 runs 1; 4 sampling batches: 2 each).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port
from mosaic_core.conquer.images import load_samples
from mosaic_core.distributed import Processes, batch_ranges, in_batch_order

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).parent / "accelerate"


def launch(arguments: list[str], processes: int) -> subprocess.CompletedProcess:
    """`python -m mosaic_core ...` alone, or under `accelerate launch` with N CPU processes (gloo).

    accelerate 1.15's `--cpu` starts a single process (several need mpirun), so CPU
    multi-process runs go through its torchrun launcher (`--multi_gpu`), which on a machine
    without CUDA joins with gloo.
    """
    if processes == 1:
        command = [sys.executable, "-m", "mosaic_core", *arguments]
    else:
        command = [
            str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            "-m", "mosaic_core", *arguments,
        ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_one_process_is_the_identity():
    one = Processes()
    tensor = torch.arange(4.0)
    assert one.is_main and not one.distributed
    assert one.shard(5) == [0, 1, 2, 3, 4] and all(one.owns(k) for k in range(5))
    assert one.all_reduce_sum(tensor) is tensor
    assert one.gather_to_main("x") == ["x"] and one.all_gather(3) == [3]


def test_shards_partition_the_batches_and_gather_restores_their_order():
    ranges = batch_ranges(10, 3)
    assert ranges == [(0, 3), (3, 6), (6, 9), (9, 10)]
    shards = [Processes(index=r, count=3).shard(len(ranges)) for r in range(3)]
    assert sorted(k for shard in shards for k in shard) == list(range(len(ranges)))  # a partition
    gathered = [[(k, f"batch{k}") for k in shard] for shard in shards]
    assert in_batch_order(gathered) == [f"batch{k}" for k in range(len(ranges))]
    with pytest.raises(RuntimeError, match="twice"):
        in_batch_order([[(0, "a")], [(0, "b")]])


@pytest.mark.slow
def test_two_processes_prune_and_sample_like_one(tiny_pixel_folder, tmp_path):
    prune = [
        "prune", "--model", str(tiny_pixel_folder), "--sparsity", "0.4", "--steps", "6",
        "--calib-size", "12", "--calib-batch-size", "4", "--calib-source", "samples", "--device", "cpu",
    ]
    launch([*prune, "--out", str(tmp_path / "one")], 1)
    launch([*prune, "--out", str(tmp_path / "two")], 2)
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert one["processes"] == 1 and one["calibration_images_per_process"] == [12]
    assert two["processes"] == 2 and two["calibration_images_per_process"] == [8, 4]  # batches 0, 2 | 1
    assert two["cx"] == pytest.approx(one["cx"], rel=1e-6)  # the same gathered clean set
    assert [s["network"] for s in two["stages"]] == [s["network"] for s in one["stages"]]
    assert len(one["networks"]) >= 1
    for network_one, network_two in zip(one["networks"], two["networks"], strict=True):
        assert network_two["keep"] == network_one["keep"]  # the same heads and units in every block
        weights_one = load_file(tmp_path / "one" / network_one["file"])
        weights_two = load_file(tmp_path / "two" / network_two["file"])
        assert weights_one.keys() == weights_two.keys() and weights_one
        for name in weights_one:
            torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-5, atol=1e-6)

    # Sampling the pruned model: 7 images in 4 batches; DDPM draws per-step noise per image.
    sample = [
        "sample", "--model", str(tiny_pixel_folder), "--pruned", str(tmp_path / "one"), "--n", "7", "--steps", "5",
        "--scheduler", "ddpm", "--batch-size", "2", "--device", "cpu",
    ]
    launch([*sample, "--out", str(tmp_path / "one.npz")], 1)
    shown = launch([*sample, "--out", str(tmp_path / "two.npz")], 2)
    launch([*sample[:-4], "--batch-size", "7", "--device", "cpu", "--out", str(tmp_path / "whole.npz")], 1)
    images_one, labels_one = load_samples(tmp_path / "one.npz")
    images_two, labels_two = load_samples(tmp_path / "two.npz")
    images_whole, _ = load_samples(tmp_path / "whole.npz")
    assert images_one.shape == (7, 8, 8, 1) and labels_one.tolist() == [0, 1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(images_two, images_one)
    np.testing.assert_array_equal(labels_two, labels_one)
    # batching changes no image beyond float round-off: at most one grey level anywhere
    assert np.abs(images_whole.astype(int) - images_one.astype(int)).max() <= 1
    assert len(np.unique(images_one.reshape(7, -1), axis=0)) == 7  # every image has its own noise
    assert shown.stdout.count("wrote 7 images") == 1  # only rank 0 reports


@pytest.mark.slow
def test_two_processes_evaluate_like_one(tmp_path):
    from test_eval import TinyDetector

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is the detector file's format
        torch.jit.script(TinyDetector()).save(str(tmp_path / "detector.pt"))
    rng = np.random.default_rng(7)
    generated = rng.integers(0, 256, (23, 12, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "gen.npz", images=generated, labels=np.zeros(23, np.int64))
    np.savez(tmp_path / "ref.npz", np.clip(generated.astype(int) + 30, 0, 255).astype(np.uint8))
    common = ["eval", str(tmp_path / "gen.npz"), "--reference", str(tmp_path / "ref.npz"), "--inception",
              str(tmp_path / "detector.pt"), "--batch-size", "5", "--device", "cpu"]  # 5 batches: 3 on rank 0, 2 on rank 1
    launch([*common, "--out", str(tmp_path / "one.json")], 1)
    launch([*common, "--out", str(tmp_path / "two.json")], 2)
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-9) and one["fid"] > 0
    # IS splits the images in order: equal only if the gathered probabilities keep image order
    assert (two["is"], two["is_std"]) == pytest.approx((one["is"], one["is_std"]), rel=1e-9)
