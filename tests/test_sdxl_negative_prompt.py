"""Negative prompts on a tiny real SDXL: the null branch of CFG, checked against StableDiffusionXLPipeline.

The reference is diffusers' own pipeline loaded from the same folder, sampling the same
prompts from the same initial latents with the same Euler scheduler: its `negative_prompt`
and our `condition_for(..., negative_prompt=...)` must give the same final latents, and no
negative prompt must stay the zero null branch (the pipeline's `negative_prompt=None`).
"""

from __future__ import annotations

import pytest
import torch

from mosaic_core.conquer.sampling import SampleConfig, initial_noise, sample_loaded
from mosaic_core.models.adapters import concat_conditions
from mosaic_core.models.loading import load_model
from mosaic_core.models.samplers import make_scheduler

PROMPTS = ["a red fox at sunrise", "a koi pond in winter"]
NEGATIVE = "blurry, low quality"
STEPS, CFG = 4, 5.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one OpenMP thread is many times faster than two competing."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_folder):
    return load_model(str(tiny_sdxl_folder), device="cpu")


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_folder, sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder)
    pipe.scheduler = make_scheduler("euler", sdxl.spec.scheduler_config)  # the sampler ours builds
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def noise(sdxl):
    spec = sdxl.spec
    return initial_noise(len(PROMPTS), (spec.in_channels, spec.sample_size, spec.sample_size), seed=0)


def _ours(sdxl, noise, negative):
    condition = sdxl.adapter.condition_for(sdxl, PROMPTS, negative_prompt=negative)
    *_, last = sample_loaded(sdxl, condition, SampleConfig(STEPS, CFG, "euler", 0), noise=noise.clone())
    return last.latents


def _pipeline(pipe, noise, negative):
    with torch.no_grad():
        return pipe(
            PROMPTS, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=CFG,
            latents=noise.clone(), output_type="latent",
        ).images


def test_no_negative_prompt_is_the_zero_null_branch_of_the_pipeline(sdxl, pipe, noise):
    ours = _ours(sdxl, noise, None)
    torch.testing.assert_close(ours, _pipeline(pipe, noise, None), rtol=1e-4, atol=1e-5)
    assert torch.equal(_ours(sdxl, noise, ""), ours) and torch.equal(_ours(sdxl, noise, "   "), ours)
    null = sdxl.adapter.condition_for(sdxl, PROMPTS, negative_prompt="").null()
    assert not null.prompt_embeds.any() and not null.pooled_prompt_embeds.any()


def test_a_negative_prompt_guides_away_as_the_pipelines_negative_prompt(sdxl, pipe, noise):
    ours = _ours(sdxl, noise, NEGATIVE)
    reference = _pipeline(pipe, noise, [NEGATIVE] * len(PROMPTS))
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    without = _ours(sdxl, noise, None)
    assert (ours - without).abs().max() > 1e-3  # the negative prompt changed the guided result
    # its null branch is the negative prompt embedded like a prompt (the pipeline's encode_prompt)
    _, negative_embeds, _, negative_pooled = pipe.encode_prompt(
        PROMPTS, device="cpu", do_classifier_free_guidance=True, negative_prompt=[NEGATIVE] * len(PROMPTS)
    )
    null = sdxl.adapter.condition_for(sdxl, PROMPTS, negative_prompt=NEGATIVE).null()
    assert torch.equal(null.prompt_embeds, negative_embeds) and torch.equal(null.pooled_prompt_embeds, negative_pooled)


def test_a_negative_condition_concatenates_with_its_null_and_not_with_a_zero_one(sdxl):
    with_negative = sdxl.adapter.condition_for(sdxl, PROMPTS, negative_prompt=NEGATIVE)
    both = concat_conditions(with_negative, with_negative.null())
    assert both.batch_size == 2 * len(PROMPTS)
    torch.testing.assert_close(both.prompt_embeds[len(PROMPTS):], with_negative.negative_prompt_embeds)
    with pytest.raises(ValueError, match="negative_prompt_embeds' is set in one and not in the other"):
        concat_conditions(with_negative, sdxl.adapter.condition_for(sdxl, PROMPTS))


def test_a_class_model_refuses_a_negative_prompt(tiny_pixel_folder):
    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    assert loaded.adapter.condition_for(loaded, [1, 2], negative_prompt="").labels.tolist() == [1, 2]
    with pytest.raises(ValueError, match="a negative prompt needs a text-to-image model"):
        loaded.adapter.condition_for(loaded, [1, 2], negative_prompt="blurry")


def test_sample_command_takes_a_negative_prompt_as_the_pipeline_does(tiny_sdxl_folder, pipe, noise, tmp_path):
    """`sample --negative-prompt` gives the images StableDiffusionXLPipeline makes with that
    negative prompt from the same noise; a class model refuses the option by name."""
    import numpy as np
    from conftest import run_cli

    from mosaic_core.conquer.images import load_samples

    prompts = [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]
    done = run_cli(
        "sample", "--model", str(tiny_sdxl_folder), *prompts, "--negative-prompt", NEGATIVE, "--n", str(len(PROMPTS)),
        "--steps", str(STEPS), "--cfg", str(CFG), "--scheduler", "euler", "--seed", "0", "--device", "cpu",
        "--out", str(tmp_path / "neg.npz"),
    )
    assert done.returncode == 0, done.stderr
    images, _ = load_samples(tmp_path / "neg.npz")
    with torch.no_grad():
        reference = pipe(
            PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS), num_inference_steps=STEPS, guidance_scale=CFG,
            latents=noise.clone(), output_type="np",
        ).images
    expected = (np.clip(reference, 0, 1) * 255).round().astype(np.uint8)
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1
    refused = run_cli("sample", "--model", "digits-dit", "--n", "1", "--negative-prompt", "blurry", "--out", str(tmp_path / "c.npz"))
    assert refused.returncode == 2 and "--negative-prompt is for text-to-image models" in refused.stderr
