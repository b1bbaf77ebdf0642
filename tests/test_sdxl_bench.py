"""The benchmark and the trajectory trace on a tiny real SDXL: prompts instead of class labels.

Image i is conditioned on prompt i mod `assets/prompts.txt` (read here independently), and the
reference is StableDiffusionXLPipeline itself, sampling those prompts from the same initial
latents with the same Euler scheduler.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mosaic_core.conquer.conditions import default_values
from mosaic_core.conquer.sampling import initial_noise
from mosaic_core.models.loading import load_model
from mosaic_core.models.registry import ASSETS_DIR
from mosaic_core.models.samplers import make_scheduler

STEPS = 4


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
    pipe.scheduler = make_scheduler("euler", sdxl.spec.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _file_prompts(count: int) -> list[str]:
    lines = [line.strip() for line in (ASSETS_DIR / "prompts.txt").read_text().splitlines() if line.strip()]
    return [lines[i % len(lines)] for i in range(count)]


def _noise(sdxl, count: int) -> torch.Tensor:
    spec = sdxl.spec
    return initial_noise(count, (spec.in_channels, spec.sample_size, spec.sample_size), seed=0)


def test_default_values_are_prompt_i_mod_the_file_or_class_i_mod_the_classes(tiny_sdxl_folder):
    from mosaic_core.models.registry import resolve_model

    spec = resolve_model(str(tiny_sdxl_folder))
    lines = [line.strip() for line in (ASSETS_DIR / "prompts.txt").read_text().splitlines() if line.strip()]
    assert default_values(spec, 3) == lines[:3]
    assert default_values(spec, len(lines) + 2)[len(lines):] == lines[:2]  # cycled: same index, same prompt
    assert default_values(resolve_model("digits-dit"), 12) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_trajectory_of_a_text_model_equals_the_pipelines_x0(sdxl, pipe):
    """x̂₀ of every Euler step recovered from the pipeline's own latents,
    x̂₀_k = x_k − σ_k (x_{k+1} − x_k) / (σ_{k+1} − σ_k), gives the same distances (eq. 4.4)."""
    from mosaic_core.conquer.trajectory import trajectory_steps
    from mosaic_core.jobs import run_to_end

    trajectory = run_to_end(trajectory_steps(sdxl, "euler", STEPS, 2, seed=0))
    latents = []

    def keep(pipeline, step, timestep, kwargs):
        latents.append(kwargs["latents"].clone())
        return kwargs

    with torch.no_grad():
        pipe(_file_prompts(2), num_inference_steps=STEPS, guidance_scale=sdxl.spec.default_cfg, latents=_noise(sdxl, 2),
             output_type="latent", callback_on_step_end=keep)
    latents.insert(0, _noise(sdxl, 2) * pipe.scheduler.init_noise_sigma)  # σ_max of this run's timesteps
    sigmas = pipe.scheduler.sigmas
    x0 = [latents[k] - sigmas[k] * (latents[k + 1] - latents[k]) / (sigmas[k + 1] - sigmas[k]) for k in range(STEPS)]
    expected = [float((x - x0[-1]).flatten(1).pow(2).mean(dim=1).sqrt().mean()) for x in x0]
    np.testing.assert_allclose(trajectory.distance, expected, rtol=1e-3, atol=1e-5)
    assert trajectory.num_images == 2 and trajectory.distance[-1] == 0 and trajectory.distance[0] > 0
    np.testing.assert_array_equal(trajectory.timesteps, pipe.scheduler.timesteps.numpy())


@pytest.mark.slow
def test_bench_samples_prompts_and_its_dense_row_is_the_pipelines_images(sdxl, pipe):
    from mosaic_core.conquer.bench import BenchConfig, bench_steps
    from mosaic_core.jobs import run_to_end
    from mosaic_core.prune.calibration import CalibrationConfig

    config = BenchConfig(
        sparsity=0.3, num_inference_steps=STEPS, num_images=2, repeats=1, reduced_steps=None, scheduler="euler",
        calibration=CalibrationConfig(size=2, batch_size=2, source="samples", sample_steps=1),
    )
    result = run_to_end(bench_steps(sdxl, config))
    rows = {r.name: r for r in result.results}
    assert {"dense", "fewer-steps", "uniform", "mosaic", "mosaic-magnitude"} <= set(rows)
    assert "cache-dit" not in rows  # cache-dit's patch serves DiT; unnamed, the row is left out for a UNet
    dense = rows["dense"]
    assert dense.labels.tolist() == [-1, -1] and dense.accuracy is None and dense.psnr == 100.0
    with torch.no_grad():
        reference = pipe(_file_prompts(2), num_inference_steps=STEPS, guidance_scale=sdxl.spec.default_cfg,
                         latents=_noise(sdxl, 2), output_type="np").images
    np.testing.assert_allclose(dense.images.astype(np.float64), reference * 255, atol=1.0)
    assert rows["mosaic"].ideal_speedup == pytest.approx(result.plan.ideal_speedup, rel=1e-6)
    assert rows["mosaic"].images.shape == dense.images.shape


def test_naming_the_cache_dit_row_for_a_unet_is_refused_in_one_line(sdxl):
    from mosaic_core.conquer.bench import BenchConfig, bench_steps
    from mosaic_core.jobs import run_to_end

    config = BenchConfig(sparsity=0.3, num_inference_steps=STEPS, num_images=1, repeats=1, reduced_steps=None,
                         scheduler="euler", methods=("cache-dit",))
    with pytest.raises(ValueError, match=r"the cache-dit row needs diffusers' DiTTransformer2DModel \(cache-dit's DiT patch\), this model's denoiser is UNet2DConditionModel"):
        run_to_end(bench_steps(sdxl, config))
