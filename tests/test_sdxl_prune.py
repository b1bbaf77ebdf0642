"""Pruning a tiny real SDXL end to end: text calibration, OBS per stage, checkpoint, pipeline, CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from mosaic_core.divide.plan import build_plan
from mosaic_core.divide.stages import STAGE_NAMES
from mosaic_core.jobs import run_to_end
from mosaic_core.models.loading import load_model
from mosaic_core.models.registry import PROJECT_ROOT
from mosaic_core.prune.calibration import CalibrationConfig, CleanSet, calibration_batches, clean_inputs
from mosaic_core.prune.checkpoint import load_pruned, save_pruned
from mosaic_core.prune.hessian import prunable_layers
from mosaic_core.prune.stage_pruning import PruneConfig, prune_steps

CALIBRATION = CalibrationConfig(size=4, batch_size=4, source="samples", sample_steps=3)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_folder):
    return load_model(str(tiny_sdxl_folder), device="cpu")


def _outputs(model, loaded):
    condition = loaded.adapter.condition_for(loaded, ["a red fox at sunrise", "a koi pond in winter"])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return [model(x, torch.full((2,), t), **condition.model_kwargs()).sample for t in (950, 500, 30)]


def test_text_calibration_calibrates_both_guidance_branches(sdxl):
    prompts_condition = sdxl.adapter.condition_for(sdxl, ["a", "b", "c"])
    clean = CleanSet(torch.randn(3, 4, 16, 16), prompts_condition)
    alphas = torch.linspace(0.999, 0.01, 1000)
    batches = list(calibration_batches(clean, alphas, (100, 200), CalibrationConfig(size=3, batch_size=2), null_class=0))
    assert len(batches) == 4
    for (x, t, cond), (x_null, t_null, null) in zip(batches[::2], batches[1::2]):
        assert torch.equal(x, x_null) and torch.equal(t, t_null) and ((t >= 100) & (t <= 200)).all()
        assert cond.prompt_embeds.abs().sum() > 0 and not null.prompt_embeds.any() and not null.pooled_prompt_embeds.any()
        assert torch.equal(cond.time_ids, null.time_ids)
    assert torch.equal(batches[2][2].prompt_embeds, prompts_condition.prompt_embeds[2:3])


def test_folder_calibration_encodes_the_images_with_the_vae(sdxl, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    clean = clean_inputs(sdxl, CalibrationConfig(size=3, batch_size=2, source=f"folder:{tmp_path}"))
    pixels = torch.from_numpy(np.asarray(Image.open(tmp_path / "0.png"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = sdxl.vae.encode(pixels).latent_dist.mean * sdxl.vae.config.scaling_factor
    torch.testing.assert_close(clean.x0[0:1], expected)
    torch.testing.assert_close(clean.x0[2:3], expected)  # the folder is cycled
    assert clean.labels.batch_size == 3
    with pytest.raises(ValueError, match=r"calibration folder '.*none' does not exist: give folder:PATH of an existing folder"):
        clean_inputs(sdxl, CalibrationConfig(size=1, source=f"folder:{tmp_path / 'none'}"))
    with pytest.raises(ValueError, match=r"calibration folder '.*0\.png' is not a folder"):
        clean_inputs(sdxl, CalibrationConfig(size=1, source=f"folder:{tmp_path / '0.png'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"calibration folder '.*empty' has no \.png"):
        clean_inputs(sdxl, CalibrationConfig(size=1, source=f"folder:{tmp_path / 'empty'}"))


@pytest.mark.slow
def test_prune_save_load_and_pipeline(sdxl, tiny_sdxl_folder, tmp_path):
    from mosaic_core.conquer.pipeline import load_pipeline

    dense = build_plan(sdxl.spec, 6, sparsity=0.0, scheduler="euler")
    events = []
    zero = run_to_end(prune_steps(sdxl, dense, PruneConfig(calibration=CALIBRATION)), events.append)
    assert not any(e.phase == "hessian" for e in events)
    for a, b in zip(_outputs(zero.staged, sdxl), _outputs(sdxl.transformer, sdxl)):
        assert torch.equal(a, b)

    plan = build_plan(sdxl.spec, 8, stage_sparsity=(0.5, 0.2, 0.6), scheduler="euler")
    assert min(plan.step_counts) > 0
    result = run_to_end(prune_steps(sdxl, plan, PruneConfig(calibration=CALIBRATION)))
    for index, network in enumerate(result.staged.networks()):
        expected = plan.layer_keep_counts(index)
        assert {layer.name: layer.num_groups for layer in prunable_layers(network)} == expected
    folder = save_pruned(result, sdxl, tmp_path / "ckpt")
    loaded_staged = load_pruned(folder, sdxl)
    for a, b in zip(_outputs(result.staged, sdxl), _outputs(loaded_staged, sdxl)):
        assert torch.equal(a, b)

    pipeline = load_pipeline(folder, tiny_sdxl_folder, device="cpu")
    pipeline.set_progress_bar_config(disable=True)
    assert type(pipeline).__name__ == "StableDiffusionXLPipeline"
    pipeline.unet.reset_stage_calls()
    images = pipeline("a lighthouse", num_inference_steps=8, output_type="np", generator=torch.manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    assert pipeline.unet.stage_calls == [STAGE_NAMES[s] for s in plan.step_stages]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mosaic_core", *map(str, args)], capture_output=True, text=True, cwd=PROJECT_ROOT)


@pytest.mark.slow
def test_cli_plan_prune_sample_on_a_tiny_sdxl_folder(tiny_sdxl_folder, tmp_path):
    planned = _cli("plan", "--model", tiny_sdxl_folder, "--steps", 6, "--scheduler", "euler", "--stage-sparsity", "0.5,0.2,0.5")
    assert planned.returncode == 0, planned.stderr
    assert "Hessians a prune gathers" in planned.stdout
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):  # a local image folder: calibration without sampling the dense model first
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(images / f"{i}.png")
    pruned = _cli(
        "prune", "--model", tiny_sdxl_folder, "--steps", 6, "--scheduler", "euler", "--stage-sparsity", "0.5,0.2,0.5",
        "--calib-size", 4, "--calib-source", f"folder:{images}", "--hessian-budget", 0.2, "--out", tmp_path / "ckpt", "--device", "cpu",
    )
    assert pruned.returncode == 0, pruned.stderr
    assert "Hessians held at once: peak" in pruned.stdout
    archives = {}
    for name, extra in (("dense", []), ("staged", ["--pruned", tmp_path / "ckpt"])):
        out = tmp_path / f"{name}.npz"
        sampled = _cli("sample", "--model", tiny_sdxl_folder, "--prompt", "a red fox", "--n", 2, "--steps", 4,
                       "--scheduler", "euler", "--device", "cpu", "--out", out, *extra)
        assert sampled.returncode == 0, sampled.stderr
        archives[name] = np.load(out)
        assert archives[name]["images"].shape == (2, 32, 32, 3) and (archives[name]["labels"] == -1).all()
    assert not np.array_equal(archives["dense"]["images"], archives["staged"]["images"])
    no_prompt = _cli("sample", "--model", tiny_sdxl_folder, "--n", 1, "--out", tmp_path / "x.npz", "--device", "cpu")
    assert no_prompt.returncode == 2 and "give --prompt" in no_prompt.stderr


def test_compare_runs_dense_and_staged_on_prompts(sdxl):
    """The comparison API takes a family's condition (prompts) where it takes class labels."""
    from mosaic_core.conquer.compare import compare, dense_and_staged
    from mosaic_core.conquer.sampling import SampleConfig
    from mosaic_core.conquer.staged_denoiser import StagedDiT
    from mosaic_core.prune.surgery import BlockKeep, sliced_model

    plan = build_plan(sdxl.spec, 3, stage_sparsity=(0.5, 0.5, 0.5), scheduler="euler")
    dense = sdxl.transformer
    keeps = [BlockKeep((0, 1), tuple(range(64)), (2, 3)) for _ in range(8)]
    pruned = sliced_model(dense, keeps)
    staged = StagedDiT(pruned, pruned, pruned, *plan.bounds.middle, 1000)
    condition = sdxl.adapter.condition_for(sdxl, ["a red fox", "a koi pond"])
    rows = compare(sdxl, dense_and_staged(dense, staged, plan), condition, SampleConfig(3, 5.0, "euler", 0), repeats=1, warmup=False)
    assert [row.name for row in rows] == ["dense", "staged"]
    assert rows[0].images.shape == rows[1].images.shape == (2, 32, 32, 3)
    assert (rows[0].labels == -1).all() and not np.array_equal(rows[0].images, rows[1].images)
