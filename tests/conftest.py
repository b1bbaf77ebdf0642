"""Shared fixtures: tiny *real* diffusers models built from a config, saved in real folders."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

LINEAR_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}


def tiny_pixel_dit(seed: int = 0, num_layers: int = 2, heads: int = 4, head_dim: int = 8, classes: int = 10):
    """A 2-block, 1-channel, 8x8 class-conditional DiT (digits-dit's shape, miniaturised)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=1,
        out_channels=1,
        num_layers=num_layers,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=classes,
    )
    _randomise_zero_init(model, seed)
    return model.eval()


def _randomise_zero_init(model, seed: int) -> None:
    """DiT zero-initialises adaLN and the output layer; give them small random values so a
    freshly built model's output depends on every block (tests would otherwise be vacuous)."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.abs().sum() == 0:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))


def tiny_latent_pipeline_parts(seed: int = 0):
    """A tiny 1000-class latent DiT with learned sigma (out = 2 × in channels), a tiny VAE
    (16x16 RGB <-> 8x8x4 latents) and a DDIM scheduler: the DiT-XL/2 layout in miniature."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    _randomise_zero_init(transformer, seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
    )
    scheduler = DDIMScheduler(**LINEAR_SCHEDULER)
    return transformer.eval(), vae.eval(), scheduler


@pytest.fixture(scope="session")
def tiny_latent_folder(tmp_path_factory):
    """A tiny latent DiT pipeline saved in diffusers' layout (model_index.json, transformer/, vae/, scheduler/)."""
    from diffusers import DiTPipeline

    transformer, vae, scheduler = tiny_latent_pipeline_parts()
    folder = tmp_path_factory.mktemp("tiny-latent-dit")
    DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_pixel_folder(tmp_path_factory):
    """A tiny pixel DiT saved like assets/digits-dit (config.json + safetensors + scheduler_config.json)."""
    import json

    folder = tmp_path_factory.mktemp("tiny-pixel-dit")
    tiny_pixel_dit().save_pretrained(folder, safe_serialization=True)
    (folder / "scheduler_config.json").write_text(json.dumps({**LINEAR_SCHEDULER, "clip_sample": True}))
    return folder


def free_port() -> int:
    """A free TCP port on the loopback interface, for an in-process studio server."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test over ~10 s (real multi-process launches, model-sized work)")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped only where CUDA is absent")
    # Deprecations inside dependencies, not ours and not actionable here: numpy 2 in
    # diffusers' schedulers, pandas 3 options that gradio's queue sets.
    for pattern in (
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
        "ignore:.*no_silent_downcasting",
        "ignore:The copy keyword is deprecated",
    ):
        config.addinivalue_line("filterwarnings", pattern)
