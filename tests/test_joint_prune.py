"""SD3 and Flux end to end on tiny folders: prune per stage (OBS), save → load bit-identical,
the checkpoint inside the family's own diffusers pipeline, every step on its stage.

The noise schedule here is the engine's DDPM-derived path (a flow-matching Divide is
separate work): this checks the machinery (Hessians on packed tokens and σ timesteps,
joint/fused slicing from OBS weights, checkpoint keys of both projections), not image quality.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mosaic_core.divide.plan import build_plan
from mosaic_core.divide.stages import STAGE_NAMES
from mosaic_core.jobs import run_to_end
from mosaic_core.models.loading import load_model
from mosaic_core.models.samplers import model_default_sampler
from mosaic_core.prune.calibration import CalibrationConfig
from mosaic_core.prune.checkpoint import load_pruned, save_pruned
from mosaic_core.prune.hessian import prunable_layers
from mosaic_core.prune.stage_pruning import PruneConfig, prune_steps
from tiny_joint import tiny_flux_parts, tiny_sd3_parts

CALIBRATION = CalibrationConfig(size=2, batch_size=2, source="samples", sample_steps=2)


def _folder(tmp_path_factory, family):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    parts = (tiny_sd3_parts if family == "sd3" else tiny_flux_parts)(tmp_path_factory.mktemp(f"{family}-tokenizers"))
    folder = tmp_path_factory.mktemp(f"tiny-{family}")
    (StableDiffusion3Pipeline if family == "sd3" else FluxPipeline)(**parts).save_pretrained(folder)
    return folder


def _outputs(model, loaded):
    adapter = loaded.adapter
    condition = adapter.condition_for(loaded, ["a red fox"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return [model(adapter.pack_latents(x), timestep=adapter.model_timestep(torch.full((1,), t)),
                      **condition.model_kwargs()).sample for t in (950.0, 500.0, 30.0)]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_prune_save_load_and_the_real_pipeline(family, tmp_path_factory, tmp_path):
    from mosaic_core.conquer.pipeline import load_pipeline

    folder = _folder(tmp_path_factory, family)
    loaded = load_model(str(folder), device="cpu")
    assert loaded.spec.family == family
    assert loaded.spec.sample_size == 8  # the tiny VAE's 16 px images
    sampler = model_default_sampler(loaded.spec)  # flow-euler (SD3), flow-euler-1/n (Flux): the pipelines' own
    zero = run_to_end(prune_steps(loaded, build_plan(loaded.spec, 4, sparsity=0.0, scheduler=sampler), PruneConfig(calibration=CALIBRATION)))
    for a, b in zip(_outputs(zero.staged, loaded), _outputs(loaded.transformer, loaded)):
        assert torch.equal(a, b)
    plan = build_plan(loaded.spec, 6, stage_sparsity=(0.5, 0.2, 0.5), scheduler=sampler)
    result = run_to_end(prune_steps(loaded, plan, PruneConfig(calibration=CALIBRATION)))
    for index, network in enumerate(result.staged.networks()):
        if plan.step_counts[index] == 0:  # no sampler step lands in this stage: nothing is pruned for it
            assert network is loaded.transformer
            continue
        assert {layer.name: layer.num_groups for layer in prunable_layers(network)} == plan.layer_keep_counts(index)
    saved = save_pruned(result, loaded, tmp_path / "ckpt")
    reloaded = load_pruned(saved, loaded)
    for a, b in zip(_outputs(result.staged, loaded), _outputs(reloaded, loaded)):
        assert torch.equal(a, b)
    pipeline = load_pipeline(saved, folder, device="cpu")
    pipeline.set_progress_bar_config(disable=True)
    pipeline.transformer.reset_stage_calls()
    images = pipeline("a red fox", num_inference_steps=5, height=16, width=16, output_type="np",
                      generator=torch.manual_seed(0), max_sequence_length=16 if family == "flux" else 256).images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    timesteps = np.asarray(pipeline.scheduler.timesteps, dtype=np.float64)
    assert pipeline.transformer.stage_calls == [STAGE_NAMES[s] for s in plan.bounds.stage_of(timesteps)]


def _cli(*args):
    import subprocess
    import sys

    from mosaic_core.models.registry import PROJECT_ROOT

    return subprocess.run([sys.executable, "-m", "mosaic_core", *map(str, args)], capture_output=True, text=True, cwd=PROJECT_ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cli_plan_prune_sample_on_a_tiny_joint_folder(family, tmp_path_factory, tmp_path):
    """SD3 (joint attention, flow-euler) and Flux (packed latents, σ timesteps, fused projections)
    through the public commands, each with its pipeline's own sampler by default."""
    folder = _folder(tmp_path_factory, family)
    planned = _cli("plan", "--model", folder, "--steps", 6, "--stage-sparsity", "0.5,0.2,0.5")
    assert planned.returncode == 0, planned.stderr
    assert "ideal speed-up" in planned.stdout and "Hessians a prune gathers" in planned.stdout
    pruned = _cli("prune", "--model", folder, "--steps", 6, "--stage-sparsity", "0.5,0.2,0.5",
                  "--calib-size", 2, "--out", tmp_path / "ckpt", "--device", "cpu")
    assert pruned.returncode == 0, pruned.stderr
    archives = {}
    for name, extra in (("dense", []), ("staged", ["--pruned", tmp_path / "ckpt"])):
        out = tmp_path / f"{name}.npz"
        sampled = _cli("sample", "--model", folder, "--prompt", "a red fox", "--n", 1, "--steps", 3,
                       "--device", "cpu", "--out", out, *extra)
        assert sampled.returncode == 0, sampled.stderr
        archives[name] = np.load(out)["images"]
        assert archives[name].shape == (1, 16, 16, 3)
    assert not np.array_equal(archives["dense"], archives["staged"])
