"""The built-in model's data and architecture: sklearn's real 8x8 digits as 16x16 pixels.

`load_digits` (1797 handwritten digits, 10 classes, values 0..16) is the only labelled image
set that ships inside a package here. Images are upsampled 8x8 -> 16x16 bilinearly and
scaled to [-1, 1]; the DiT works directly on these pixels (no VAE).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

NUM_CLASSES = 10
IMAGE_SIZE = 16

# The digits-dit architecture (docs/method.md §6 recipe): 6 blocks, 6 heads x 32, patch 2,
# 64 tokens of width 192, ~4.6 M parameters. num_embeds_ada_norm is the class count;
# the label table gets one extra row (the null class 10) because label dropout > 0.
DIGITS_DIT_CONFIG = {
    "num_attention_heads": 6,
    "attention_head_dim": 32,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 6,
    "sample_size": IMAGE_SIZE,
    "patch_size": 2,
    "num_embeds_ada_norm": NUM_CLASSES,
    "activation_fn": "gelu-approximate",
    "norm_type": "ada_norm_zero",
}


@lru_cache(maxsize=1)
def _digits_numpy() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def load_digit_images(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 real digits as (images N×1×size×size in [-1, 1], labels N)."""
    images, labels = _digits_numpy()
    x = torch.from_numpy(images / 16.0)[:, None]  # N×1×8×8 in [0, 1]
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 2.0 - 1.0).clamp(-1.0, 1.0), torch.from_numpy(labels)


def build_digits_dit():
    """A freshly initialised `DiTTransformer2DModel` with the digits-dit architecture."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**DIGITS_DIT_CONFIG)


def disable_label_dropout(model) -> None:
    """Turn off diffusers' per-block label dropout (labels are dropped in the training loop).

    Each DiT block owns a class embedder that would draw its own dropout mask, so the
    blocks would disagree about whether a sample is unconditional (docs/method.md §6). The null
    row of the label table stays; only the random dropping is switched off.
    """
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
