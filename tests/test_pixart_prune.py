"""Pruning a tiny real PixArt-Σ end to end: text calibration, OBS per stage, checkpoint, pipeline, CLI."""

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
from mosaic_core.prune.calibration import CalibrationConfig, CleanSet, calibration_batches
from mosaic_core.prune.checkpoint import load_pruned, save_pruned
from mosaic_core.prune.hessian import prunable_layers
from mosaic_core.prune.stage_pruning import PruneConfig, prune_steps

CALIBRATION = CalibrationConfig(size=4, batch_size=4, source="samples", sample_steps=3)


@pytest.fixture(scope="module")
def pixart_folder(tmp_path_factory):
    from tiny_pixart import write_tiny_pixart_folder

    return write_tiny_pixart_folder(tmp_path_factory.mktemp("tiny-pixart") / "pipeline")


@pytest.fixture(scope="module")
def pixart(pixart_folder):
    return load_model(str(pixart_folder), device="cpu")


def _outputs(model, loaded):
    condition = loaded.adapter.condition_for(loaded, ["a red fox at sunrise", "a koi pond in winter"])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return [model(x, timestep=torch.full((2,), t), **condition.model_kwargs()).sample for t in (950, 500, 30)]


def test_text_calibration_calibrates_both_guidance_branches(pixart):
    """Each calibration batch is followed by its null copy: the empty prompt's embedding and mask."""
    condition = pixart.adapter.condition_for(pixart, ["a", "the cat", "an old fox"])
    clean = CleanSet(torch.randn(3, 4, 8, 8), condition)
    alphas = torch.linspace(0.999, 0.01, 1000)
    batches = list(calibration_batches(clean, alphas, (100, 200), CalibrationConfig(size=3, batch_size=2), null_class=0))
    assert len(batches) == 4
    empty = pixart.adapter.condition_for(pixart, [""])
    for (x, t, cond), (x_null, t_null, null) in zip(batches[::2], batches[1::2]):
        assert torch.equal(x, x_null) and torch.equal(t, t_null) and ((t >= 100) & (t <= 200)).all()
        for row in range(cond.batch_size):
            assert torch.equal(null.prompt_embeds[row], empty.prompt_embeds[0])
            assert torch.equal(null.prompt_attention_mask[row], empty.prompt_attention_mask[0])
    assert torch.equal(batches[2][2].prompt_embeds, condition.prompt_embeds[2:3])
    assert torch.equal(batches[2][2].prompt_attention_mask, condition.prompt_attention_mask[2:3])


@pytest.mark.slow
def test_prune_save_load_and_pipeline(pixart, pixart_folder, tmp_path):
    """0 % equals dense bit for bit; a pruned checkpoint loads bit-identical; load_pipeline serves
    the folder's own PixArtSigmaPipeline with the staged transformer, in the plan's stages."""
    from mosaic_core.conquer.pipeline import load_pipeline

    dense = build_plan(pixart.spec, 6, sparsity=0.0, scheduler="dpm")
    zero = run_to_end(prune_steps(pixart, dense, PruneConfig(calibration=CALIBRATION)))
    for a, b in zip(_outputs(zero.staged, pixart), _outputs(pixart.transformer, pixart)):
        assert torch.equal(a, b)

    plan = build_plan(pixart.spec, 10, stage_sparsity=(0.5, 0.2, 0.6), scheduler="dpm")
    assert min(plan.step_counts) > 0
    result = run_to_end(prune_steps(pixart, plan, PruneConfig(calibration=CALIBRATION)))
    for index, network in enumerate(result.staged.networks()):
        assert {layer.name: layer.num_groups for layer in prunable_layers(network)} == plan.layer_keep_counts(index)
    folder = save_pruned(result, pixart, tmp_path / "ckpt")
    loaded_staged = load_pruned(folder, pixart)
    for a, b in zip(_outputs(result.staged, pixart), _outputs(loaded_staged, pixart)):
        assert torch.equal(a, b)

    pipeline = load_pipeline(folder, pixart_folder, device="cpu")
    pipeline.set_progress_bar_config(disable=True)
    assert type(pipeline).__name__ == "PixArtSigmaPipeline"
    pipeline.transformer.reset_stage_calls()
    images = pipeline("a lighthouse", num_inference_steps=10, output_type="np", generator=torch.manual_seed(0),
                      use_resolution_binning=False).images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    assert pipeline.transformer.stage_calls == [STAGE_NAMES[s] for s in plan.step_stages]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mosaic_core", *map(str, args)], capture_output=True, text=True, cwd=PROJECT_ROOT)


@pytest.mark.slow
def test_cli_plan_prune_sample_on_a_tiny_pixart_folder(pixart_folder, tmp_path):
    common = ("--model", pixart_folder, "--steps", 6, "--scheduler", "dpm")
    planned = _cli("plan", *common, "--stage-sparsity", "0.5,0.2,0.5")
    assert planned.returncode == 0, planned.stderr
    assert "Hessians a prune gathers" in planned.stdout and "ideal speed-up" in planned.stdout
    pruned = _cli("prune", *common, "--stage-sparsity", "0.5,0.2,0.5", "--calib-size", 4, "--calib-source", "samples",
                  "--out", tmp_path / "ckpt", "--device", "cpu")
    assert pruned.returncode == 0, pruned.stderr
    archives = {}
    for name, extra in (("dense", []), ("staged", ["--pruned", tmp_path / "ckpt"])):
        out = tmp_path / f"{name}.npz"
        sampled = _cli("sample", "--model", pixart_folder, "--prompt", "a red fox", "--prompt", "a koi pond", "--n", 2,
                       "--steps", 4, "--scheduler", "dpm", "--device", "cpu", "--out", out, *extra)
        assert sampled.returncode == 0, sampled.stderr
        archives[name] = np.load(out)
        assert archives[name]["images"].shape == (2, 16, 16, 3) and (archives[name]["labels"] == -1).all()
        assert archives[name]["prompts"].tolist() == ["a red fox", "a koi pond"]
    assert not np.array_equal(archives["dense"]["images"], archives["staged"]["images"])


def test_a_sentencepiece_only_tokenizer_needs_its_packages(pixart_folder, tmp_path):
    """A hub-style tokenizer folder (spiece.model, no tokenizer.json) is refused with the packages
    to install when sentencepiece/protobuf are absent, not read wrongly by a fallback."""
    import shutil

    from transformers.utils import is_protobuf_available, is_sentencepiece_available

    if is_sentencepiece_available() and is_protobuf_available():
        pytest.skip("sentencepiece and protobuf are installed here: the hub tokenizer loads")
    folder = tmp_path / "hub-like"
    shutil.copytree(pixart_folder, folder)
    (folder / "tokenizer" / "tokenizer.json").unlink()
    (folder / "tokenizer" / "spiece.model").write_bytes(b"\x00")
    with pytest.raises(ValueError, match=r"SentencePiece model .* needs the packages .*pip install"):
        load_model(str(folder), device="cpu")
