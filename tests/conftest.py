"""Shared fixtures: tiny *real* diffusers models built from a config, saved in real folders."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

LINEAR_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}


def tiny_pixel_dit(
    seed: int = 0, num_layers: int = 2, heads: int = 4, head_dim: int = 8, classes: int = 10, in_channels: int = 1
):
    """A 2-block, 8x8 class-conditional DiT (digits-dit's shape, miniaturised), every layer random.

    The one tiny DiT of the tests: DiT zero-initialises adaLN and the output layer, which
    would make a fresh model's output independent of its blocks (and checks on it vacuous),
    so those layers get small random values here.
    """
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=in_channels,
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


def run_cli(*args: str):
    """`python -m mosaic_core ARGS` in this process: (exit status, stdout, stderr).

    The same `mosaic_core.cli.main` a subprocess runs, without re-importing torch and
    diffusers for every case (about 2 s each on 2 cores); argparse's `sys.exit` is caught.
    Tests that must prove the real `python -m` entry point still start a process.
    """
    import contextlib
    import io
    from types import SimpleNamespace

    from mosaic_core.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def with_default_steps(monkeypatch, steps: int) -> None:
    """`resolve_model` gives every model `steps` as its own default step count, as the registry does
    for sd3-medium (28) or pixart-sigma (20), whose weights the tests do not have."""
    import dataclasses

    # Modules that bind `resolve_model` when first imported would keep the patched one for the rest of
    # the run if that first import happened inside this test: import them (real resolver) first.
    import mosaic_core.divide.plan  # noqa: F401
    import mosaic_core.models.loading  # noqa: F401
    import mosaic_core.models.training  # noqa: F401
    import mosaic_core.requests  # noqa: F401
    from mosaic_core.models import registry

    resolve = registry.resolve_model
    monkeypatch.setattr(registry, "resolve_model", lambda *a, **k: dataclasses.replace(resolve(*a, **k), default_steps=steps))


def free_port() -> int:
    """A free TCP port on the loopback interface, for an in-process studio server."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pytest_configure(config):
    for marker in (
        "browser: drives the studio in headless Chromium (Debian's /usr/bin/chromium)",
        "slow: more than a few seconds on 2 CPU cores: real servers and processes, model-sized work (left out of the fast loop)",
        "gpu: needs CUDA; collected only where torch.cuda.is_available()",
    ):
        config.addinivalue_line("markers", marker)
    # Deprecations inside dependencies, not ours and not actionable here: numpy 2 in
    # diffusers' schedulers, pandas 3 options that gradio's queue sets.
    for pattern in (
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning",
        "ignore:.*no_silent_downcasting",
        "ignore:The copy keyword is deprecated",
    ):
        config.addinivalue_line("filterwarnings", pattern)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA is present; elsewhere they are deselected (not skipped)."""
    if torch.cuda.is_available():
        return
    kept = [item for item in items if item.get_closest_marker("gpu") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("gpu") is not None])
        items[:] = kept


# --- a tiny SDXL (UNet2DConditionModel, two CLIP text encoders, tokenizers written here) ---

SDXL_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}


def write_clip_tokenizer(folder, max_length: int = 77):
    """A byte-level BPE CLIP tokenizer written from scratch: every byte char (and its
    word-final form) is a token, plus a few merges; returns the loaded CLIPTokenizer."""
    import json
    from pathlib import Path

    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # GPT-2's byte -> printable character table (the alphabet of byte-level BPE).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    shifted = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(shifted))]
    merges = [("t", "h</w>"), ("a", "n"), ("i", "n"), ("e", "r"), ("o", "n</w>"), ("c", "at</w>"), ("a", "t</w>")]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length, "tokenizer_class": "CLIPTokenizer"}))
    return CLIPTokenizer.from_pretrained(folder)


def tiny_sdxl_parts(tokenizer_folder, seed: int = 0):
    """A tiny SDXL: a 2-level UNet2DConditionModel with 8 transformer blocks (2 down, 4 up,
    2 mid; 4 heads of 8, GEGLU feed-forward of 128 units), a tiny VAE (32x32 RGB <-> 16x16x4), two CLIP text encoders (32 wide
    each: cross_attention_dim 64 is their concatenation) with their tokenizers, Euler."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = write_clip_tokenizer(f"{tokenizer_folder}/tokenizer")
    tokenizer_2 = write_clip_tokenizer(f"{tokenizer_folder}/tokenizer_2")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=64,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
        norm_num_groups=8,
    )
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=32, hidden_act="gelu",
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config)).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=0.13025,
    )
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler)


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory):
    """A tiny SDXL pipeline saved in diffusers' layout (unet/, vae/, text_encoder(_2)/, tokenizer(_2)/, scheduler/)."""
    from diffusers import StableDiffusionXLPipeline

    parts = tiny_sdxl_parts(tmp_path_factory.mktemp("tiny-sdxl-tokenizers"))
    folder = tmp_path_factory.mktemp("tiny-sdxl")
    StableDiffusionXLPipeline(**parts).save_pretrained(folder)
    return folder
