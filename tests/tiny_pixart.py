"""A tiny real PixArt pipeline for tests: transformer, T5 encoder, tokenizer, VAE, DPM-Solver.

Everything is built from configs (no hub): a 2-block PixArtTransformer2DModel with learned σ
(out = 2 × in channels) and a caption projection, a 2-layer T5EncoderModel, a T5 tokenizer
written from scratch (transformers' T5Tokenizer is a `tokenizers` Unigram model that takes
its vocabulary as (piece, score) pairs, so no sentencepiece file is needed), a 2-level VAE
(16x16 RGB <-> 8x8x4 latents) and PixArt's scheduler (DPM-Solver++ on linear betas).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

PIXART_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "lower_order_final": True,
}

WORDS = ("a", "an", "the", "cat", "red", "fox", "at", "on", "old", "lighthouse", "sunrise", "koi", "pond", "in", "winter")


def write_t5_tokenizer(folder):
    """A T5 Unigram tokenizer written from scratch (<pad> 0, </s> 1, <unk> 2, letters, a few
    words), saved to `folder` (tokenizer.json) and loaded back as the pipeline would."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -3.0) for c in string.ascii_lowercase + string.digits + ",.'-!?"]
    vocab += [("▁" + c, -2.5) for c in string.ascii_lowercase]
    vocab += [("▁" + word, -1.0) for word in WORDS if len(word) > 1]
    folder = Path(folder)
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(folder)
    return T5Tokenizer.from_pretrained(folder)


def tiny_pixart_parts(tokenizer_folder, seed: int = 0, sample_size: int = 8, patch_size: int = 2,
                      use_additional_conditions: bool | None = False, num_attention_heads: int = 4):
    """The components of a tiny PixArt pipeline (keyword arguments of PixArtSigmaPipeline).

    Transformer: 2 blocks of 4 heads × 8 (D = 32), FF 128 units, sample_size 8 / patch 2 →
    16 image tokens, cross-attention width 32, caption projection from T5's 16 channels.
    Size conditions (`use_additional_conditions`, PixArt-α 1024) split D in three: use 6 heads.
    """
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = write_t5_tokenizer(tokenizer_folder)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=num_attention_heads,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=num_attention_heads * 8,  # = D: the caption projection outputs D
        sample_size=sample_size,
        patch_size=patch_size,
        caption_channels=16,
        num_embeds_ada_norm=1000,
        use_additional_conditions=use_additional_conditions,
    )
    text_encoder = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1, norm_num_groups=4, sample_size=2 * sample_size,
    )
    scheduler = DPMSolverMultistepScheduler(**PIXART_SCHEDULER)
    return dict(transformer=transformer.eval(), vae=vae.eval(), text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def write_tiny_pixart_folder(folder, pipeline: str = "PixArtSigmaPipeline", **options) -> Path:
    """A tiny PixArt pipeline saved in diffusers' layout (model_index.json, transformer/,
    text_encoder/, tokenizer/, vae/, scheduler/) by `pipeline` (PixArtSigmaPipeline or
    PixArtAlphaPipeline); `options` go to `tiny_pixart_parts`."""
    import diffusers

    folder = Path(folder)
    parts = tiny_pixart_parts(folder.parent / f"{folder.name}-tokenizer", **options)
    getattr(diffusers, pipeline)(**parts).save_pretrained(folder)
    return folder
