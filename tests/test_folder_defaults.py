"""A local model folder samples as its own pipeline does: its scheduler, its step count, its guidance.

A user who brings a PixArt-Σ folder expects what `PixArtSigmaPipeline` gives them (DPM-Solver,
20 steps, guidance 4.5), not DDIM at 50 steps; the values below are those pipelines' documented
defaults, written out here rather than read back from the code under test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mosaic_core.models.registry import resolve_model
from mosaic_core.models.samplers import default_sampler, model_default_sampler
from mosaic_core.requests import PlanRequest

CONFIGS = Path(__file__).resolve().parent.parent / "assets" / "configs"


def folder_of(tmp_path: Path, entry: str, pipeline: str | None, denoiser: str = "transformer") -> Path:
    """A diffusers-layout folder holding the shipped public configs of `entry` (no weights)."""
    folder = tmp_path / entry
    (folder / "scheduler").mkdir(parents=True)
    shutil.copy(CONFIGS / entry / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json")
    (folder / denoiser).mkdir()
    shutil.copy(CONFIGS / entry / f"{denoiser}_config.json", folder / denoiser / "config.json")
    if pipeline is not None:
        (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    return folder


@pytest.mark.parametrize(
    "entry, pipeline, denoiser, steps, cfg, sampler",
    [
        ("pixart-sigma", "PixArtSigmaPipeline", "transformer", 20, 4.5, "dpm"),
        ("sdxl-base", "StableDiffusionXLPipeline", "unet", 50, 5.0, "euler"),
        ("sd3-medium", "StableDiffusion3Pipeline", "transformer", 28, 7.0, "flow-euler"),
        ("flux-dev", "FluxPipeline", "transformer", 28, 1.0, "flow-euler-1/n"),  # guidance-distilled: no CFG
        ("flux-schnell", "FluxPipeline", "transformer", 4, 1.0, "flow-euler-1/n"),  # timestep-distilled: 4 steps
    ],
)
def test_a_folder_takes_its_pipelines_sampler_steps_and_guidance(tmp_path, entry, pipeline, denoiser, steps, cfg, sampler):
    spec = resolve_model(str(folder_of(tmp_path, entry, pipeline, denoiser)))
    assert (spec.default_steps, spec.default_cfg, model_default_sampler(spec)) == (steps, cfg, sampler)
    plan = PlanRequest.from_values(str(tmp_path / entry), sampler=None).plan()
    assert plan.num_inference_steps == steps and len(plan.timesteps) == steps
    # the registry entry plans with the same sampler as a folder holding its configs
    assert model_default_sampler(resolve_model(entry)) == sampler


def test_without_model_index_a_folder_keeps_the_plain_defaults(tmp_path):
    spec = resolve_model(str(folder_of(tmp_path, "pixart-sigma", None)))
    assert (spec.default_steps, spec.default_cfg, model_default_sampler(spec)) == (50, 5.0, "dpm")


@pytest.mark.parametrize("index", ['{"_class_name": "NotAPipelineAtAll"}', '{"_class_name": ["PixArtSigmaPipeline"]}', "not json", '{"_class_name": "os.system"}'])
def test_an_unusable_model_index_falls_back_to_the_plain_defaults(tmp_path, index):
    folder = folder_of(tmp_path, "pixart-sigma", None)
    (folder / "model_index.json").write_text(index)
    spec = resolve_model(str(folder))
    assert (spec.default_steps, spec.default_cfg) == (50, 5.0)


def test_a_class_conditional_folder_keeps_its_cfg_but_takes_the_pipelines_steps(tmp_path):
    """DiTPipeline's guidance 4.0 is not the 1.5 class-conditional models are measured at; its 50 steps are."""
    folder = tmp_path / "dit"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler", "num_train_timesteps": 1000}))
    (folder / "transformer").mkdir()
    (folder / "transformer" / "config.json").write_text(json.dumps({
        "_class_name": "DiTTransformer2DModel", "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4,
        "out_channels": 4, "num_layers": 2, "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10,
    }))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    spec = resolve_model(str(folder))
    assert (spec.default_steps, spec.default_cfg, model_default_sampler(spec)) == (50, 1.5, "ddim")


@pytest.mark.parametrize(
    "scheduler_class, sampler",
    [("DDPMScheduler", "ddim"), ("PNDMScheduler", "ddim"), (["EulerDiscreteScheduler"], "ddim"), (None, "ddim")],
)
def test_a_scheduler_class_without_its_own_sampler_runs_ddim(scheduler_class, sampler):
    assert default_sampler({"_class_name": scheduler_class, "num_train_timesteps": 1000}) == sampler


@pytest.mark.parametrize("pipeline", ["DiTPipeline", "PixArtAlphaPipeline", "PixArtSigmaPipeline", "StableDiffusionXLPipeline",
                                      "StableDiffusion3Pipeline", "FluxPipeline"])
def test_the_written_out_pipeline_defaults_are_the_installed_diffusers_own(pipeline):
    """The table spares planning a pipeline import; diffusers' own signature is the reference it must match."""
    import inspect

    import diffusers

    from mosaic_core.models.registry import PIPELINE_DEFAULTS

    parameters = inspect.signature(getattr(diffusers, pipeline).__call__).parameters
    assert PIPELINE_DEFAULTS[pipeline] == (parameters["num_inference_steps"].default, parameters["guidance_scale"].default)


def test_a_pipeline_outside_the_table_is_read_from_its_signature(tmp_path):
    folder = folder_of(tmp_path, "pixart-sigma", "StableDiffusionPipeline")  # any pipeline: steps and guidance of its __call__
    spec = resolve_model(str(folder))
    assert (spec.default_steps, spec.default_cfg) == (50, 7.5)
