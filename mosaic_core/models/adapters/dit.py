"""DiT (`DiTTransformer2DModel`): class-conditional, homogeneous transformer blocks.

Every block is a `BasicTransformerBlock` with self-attention `attn1` and a GELU
feed-forward `ff` of width F = 4·D, all blocks the same width and token count, so the cost
model is the homogeneous `TransformerShape` (docs/method.md §4). Conditioning is a class
label; classifier-free guidance's null label is `num_classes` (`num_embeds_ada_norm`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from mosaic_core.divide.shapes import TransformerShape
from mosaic_core.models.adapters.base import FamilyAdapter, register_adapter


class DiTAdapter(FamilyAdapter):
    """The DiT family: `transformer_blocks.{i}` with attn1 + ff, class labels."""

    name = "dit"
    model_classes = ("DiTTransformer2DModel",)
    denoiser_folder = "transformer"
    conditioning = "class"
    legacy_norm_types = ("ada_norm_zero",)  # hub DiT folders name the legacy Transformer2DModel

    def shape_from_config(self, config: Mapping[str, Any], **context: Any) -> TransformerShape:
        """The homogeneous shape of a DiT config (layers, heads, head width, F = 4·D, tokens)."""
        return TransformerShape.from_dit_config(config)

    def spec_fields(self, config: Mapping[str, Any], folder: Path) -> dict[str, Any]:
        """Shape, classes, input channels and size from a DiT config; latent when a vae/ exists."""
        return {
            "shape": self.shape_from_config(config),
            "num_classes": int(config.get("num_embeds_ada_norm", 1000) or 1000),
            "in_channels": int(config.get("in_channels", 4)),
            "sample_size": int(config.get("sample_size", 32)),
            "latent": (folder / "vae").is_dir(),
        }


ADAPTER = register_adapter(DiTAdapter())
