"""K ≥ 2 stages end to end: `plan --stages K`, `prune --stages K` (checkpoint v3), `sample --pruned`.

K = 3 is checked against the three-stage engine (an independent code path: `build_plan`'s
allocation); the v3 checkpoint against the in-memory K-stage model it was written from.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli
from mosaic_core.divide.k_plan import KStagePlan, build_k_plan
from mosaic_core.divide.plan import build_plan


@pytest.mark.parametrize("sparsity, steps", [(0.3, 50), (0.5, 20), (0.0, 10)])
def test_three_stages_are_the_three_stage_plan(sparsity, steps):
    k = build_k_plan("digits-dit", steps, 0.55, 0.01, sparsity, num_stages=3)
    three = build_plan("digits-dit", steps, 0.55, 0.01, sparsity=sparsity)
    assert k.partition.ranges == tuple(three.bounds.ranges)
    assert k.step_counts == tuple(three.step_counts)
    assert k.allocation.heads_kept == tuple(three.allocation.heads_kept)
    assert k.allocation.units_kept == tuple(three.allocation.units_kept)
    assert (k.macs_dense, k.macs_staged) == (three.macs_dense, three.macs_staged)


def test_a_k_stage_plan_round_trips_and_refuses_edits():
    plan = build_k_plan("digits-dit", 50, 0.55, 0.01, 0.4, num_stages=5)
    data = json.loads(json.dumps(plan.to_dict()))
    assert KStagePlan.from_dict(data) == plan
    # the step counts follow from the stored timesteps: 50 DDIM steps over 5 stages
    assert sum(plan.step_counts) == 50 and plan.num_stages == 5
    edited = json.loads(json.dumps(data))
    edited["stages"][0]["num_steps"] += 1
    with pytest.raises(ValueError, match=r"stage 0 lists \d+ steps, its timesteps give \d+"):
        KStagePlan.from_dict(edited)
    edited = json.loads(json.dumps(data))
    edited["cuts"][0] += 5  # a boundary moved without its stage's timesteps
    with pytest.raises(ValueError, match=r"lists timesteps .* its cuts say"):
        KStagePlan.from_dict(edited)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stages", "4", "--stage-sparsity", "0.1,0.2,0.3"], r"--stage-sparsity sets three stages; with --stages 4 give --sparsity"),
        (["--stages", "4", "--sparsity", "0.3", "--edges", "100,500"], r"--edges sets three stages"),
        (["--stages", "1", "--sparsity", "0.3"], r"--stages must be in \[2, 64\], got 1"),
        (["--stages", "4", "--sparsity", "0.3", "--model", "sdxl-base"], r"K-stage plan needs a DiT-style transformer .* 'sdxl-base' is not one"),
        # the message names only what is accepted: PixArt (cross-attention, priced per layer) is refused, so not named as accepted
        (["--stages", "4", "--sparsity", "0.3", "--model", "pixart-sigma"],
         r"^error: a K-stage plan needs a DiT-style transformer \(one self-attention and one MLP per block[^P]*'pixart-sigma' is not one: use 3 stages$"),
    ],
)
def test_bad_stage_options_are_one_clear_error(args, message):
    import re

    done = run_cli("plan", *args)
    assert done.returncode == 2 and re.search(message, done.stderr.strip()), done.stderr


def test_plan_stages_json_is_the_engine_plan():
    done = run_cli("plan", "--stages", "6", "--sparsity", "0.3", "--json")
    assert done.returncode == 0, done.stderr
    assert KStagePlan.from_dict(json.loads(done.stdout)) == build_k_plan("digits-dit", 50, 0.55, 0.01, 0.3, num_stages=6)


@pytest.mark.slow
def test_prune_stages_writes_a_v3_checkpoint_that_samples_as_the_model_it_saved(tiny_pixel_folder, tmp_path):
    from mosaic_core.conquer.multistage_denoiser import MultiStageDenoiser
    from mosaic_core.conquer.sampling import SampleConfig, labels_for, run_to_end, sample_loaded
    from mosaic_core.models.loading import load_model
    from mosaic_core.prune.calibration import CalibrationConfig
    from mosaic_core.prune.checkpoint import content_digest, load_pruned, read_manifest
    from mosaic_core.prune.multistage_pruning import prune_k_stages
    from mosaic_core.prune.stage_pruning import PruneConfig

    out = tmp_path / "k4"
    common = ["--model", str(tiny_pixel_folder), "--sparsity", "0.4", "--steps", "8", "--calib-size", "8",
              "--calib-batch-size", "8", "--calib-source", "samples", "--device", "cpu"]
    done = run_cli("prune", "--stages", "4", *common, "--out", str(out))
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(out)
    assert manifest["format_version"] == 3 and manifest["num_stages"] == 4
    assert [s["name"] for s in manifest["stages"]] == ["stage 0", "stage 1", "stage 2", "stage 3"]

    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    restored = load_pruned(out, loaded)
    assert isinstance(restored, MultiStageDenoiser) and restored.partition.num_stages == 4
    plan = KStagePlan.from_dict(manifest["plan"])
    config = PruneConfig(CalibrationConfig(size=8, batch_size=8, source="samples"), allocation="per-stage")
    in_memory = run_to_end(prune_k_stages(loaded, plan.partition, plan.allocation, config))
    labels = labels_for(4, loaded.spec.num_classes)
    sample = SampleConfig(8, 1.5, "ddim", 0)
    images = run_to_end(sample_loaded(loaded, labels, sample, transformer=restored)).images
    expected = run_to_end(sample_loaded(loaded, labels, sample, transformer=in_memory)).images
    np.testing.assert_array_equal(images, expected)
    # every sampler step ran its own stage's network, noisiest first
    assert restored.stage_calls == plan.partition.stage_of(np.asarray(plan.timesteps)).tolist()

    # `sample --pruned` reads it too; an edited kept size is refused even with a fresh digest
    done = run_cli("sample", "--model", str(tiny_pixel_folder), "--pruned", str(out), "--n", "2", "--steps", "8",
                   "--device", "cpu", "--out", str(tmp_path / "k4.npz"))
    assert done.returncode == 0, done.stderr
    with_network = next(i for i, s in enumerate(manifest["stages"]) if s["network"] is not None)
    network = manifest["networks"][manifest["stages"][with_network]["network"]]
    network["keep"][0]["heads"] = network["keep"][0]["heads"][:-1]
    manifest.pop("content_sha256")
    manifest["content_sha256"] = content_digest(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"stage 'stage \d' uses a network whose kept sizes differ from its plan"):
        read_manifest(out)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--allocation", "measured"], r"--stages 4 prunes each stage's counts in every block \(--allocation paper\); got --allocation measured"),
        (["--unit-multiple", "16"], r"--unit-multiple rounds the measured allocation; --stages 4 prunes with the paper's"),
    ],
)
def test_prune_stages_refuses_what_it_cannot_do_before_any_work(tmp_path, args, message):
    import re

    out = tmp_path / "k4"
    done = run_cli("prune", "--stages", "4", "--sparsity", "0.3", *args, "--out", str(out))
    assert done.returncode == 2 and re.search(message, done.stderr), done.stderr
    assert not out.exists()
