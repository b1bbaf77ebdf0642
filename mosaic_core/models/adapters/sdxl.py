"""SDXL (`UNet2DConditionModel`, text-to-image): a UNet whose transformer blocks differ per level.

Prunable blocks are the `BasicTransformerBlock`s inside the UNet's cross-attention
down/mid/up blocks (`down_blocks.i.attentions.j.transformer_blocks.k`, …). Each has
self-attention `attn1` (heads over the image tokens), cross-attention `attn2` (queries
from the image tokens, keys/values from the M = 77 text tokens of width C =
cross_attention_dim) and a GEGLU feed-forward `ff` whose input projection has 2F rows
(unit j = rows j and j+F). Widths and token counts differ per resolution level, so the
cost model is per layer (`divide.shapes.BlockwiseShape`).

SDXL-base's config names heads `attention_head_dim` ([5, 10, 20]: heads per level, each
64 wide); diffusers reads `num_attention_heads or attention_head_dim` as the head count,
and so does `_heads` here. The up path uses every per-level list reversed, with one more
attention per level than the down path.

Conditioning (`TextCondition`): the prompt embeddings (N×M×C, the two CLIP encoders'
penultimate hidden states concatenated), the pooled embedding of the second encoder
(N×1280) and `time_ids` (N×6: original size, crop corner, target size), passed as
`encoder_hidden_states` and `added_cond_kwargs={text_embeds, time_ids}`. The null branch of
classifier-free guidance is all-zero embeddings with the same time_ids — what
StableDiffusionXLPipeline uses when no negative prompt is given (`force_zeros_for_empty_prompt`).
With a negative prompt (`condition_for(loaded, prompts, negative_prompt="blurry")`) the null
branch is that prompt embedded like any other — the pipeline's `negative_prompt` — carried in
the condition's `negative_*` fields so that it travels with the rows (docs/method.md §10.5).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mosaic_core.divide.shapes import BlockwiseShape, LayerShape
from mosaic_core.models.adapters.base import FamilyAdapter, register_adapter

CONTEXT_TOKENS = 77  # CLIP's max_length: the text tokens cross-attention reads
FF_MULT = 4  # FeedForward's inner width = 4 · D


@dataclass(frozen=True)
class TextCondition:
    """SDXL's conditioning for N samples: prompt embeddings, pooled embeddings, time ids."""

    prompt_embeds: torch.Tensor  # N × M × C
    pooled_prompt_embeds: torch.Tensor  # N × P
    time_ids: torch.Tensor  # N × 6
    # The unconditional branch's prompt, embedded (N × M × C, N × P); None: zeros (no negative prompt).
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        """Number of conditioned samples."""
        return int(self.prompt_embeds.shape[0])

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `UNet2DConditionModel.forward`."""
        return {
            "encoder_hidden_states": self.prompt_embeds,
            "added_cond_kwargs": {"text_embeds": self.pooled_prompt_embeds, "time_ids": self.time_ids},
        }

    def null(self) -> "TextCondition":
        """The unconditional branch: the negative prompt's embeddings, or zeros without one; same time ids.

        The null of a negative-prompt condition keeps its negative fields (the null of the
        null is itself), so `concat_conditions(condition, condition.null())` is well formed.
        """
        if self.negative_prompt_embeds is None:
            return TextCondition(
                torch.zeros_like(self.prompt_embeds), torch.zeros_like(self.pooled_prompt_embeds), self.time_ids
            )
        negative, pooled = self.negative_prompt_embeds, self.negative_pooled_prompt_embeds
        return TextCondition(negative, pooled, self.time_ids, negative, pooled)


def _per_level(value: Any, levels: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels:
        raise ValueError(f"UNet config: {name} needs one value per level ({levels}), got {value!r}")
    return values


def unet_layer_shapes(config: Mapping[str, Any], context_tokens: int = CONTEXT_TOKENS) -> BlockwiseShape:
    """The prunable layers of a `UNet2DConditionModel` and their costs, from its config alone.

    Module paths are those of diffusers' UNet (down blocks, up blocks, then the mid block, the
    order of `named_modules`); tokens of level ℓ are (sample_size / 2^ℓ)². See the module
    docstring and `LayerShape` for the per-group MACs and weights.
    """
    channels = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(channels)
    down_types = list(config.get("down_block_types", ()))
    up_types = list(config.get("up_block_types", ()))
    if len(down_types) != levels or len(up_types) != levels:
        raise ValueError(
            f"UNet config: down_block_types and up_block_types need {levels} entries (one per block_out_channels)"
        )
    heads = _per_level(config.get("num_attention_heads") or config.get("attention_head_dim", 8), levels, "attention heads")
    layers_per_block = _per_level(config.get("layers_per_block", 2), levels, "layers_per_block")
    transformer_layers = _per_level(config.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    if any(isinstance(n, (list, tuple)) for n in transformer_layers):
        raise ValueError("UNet config: nested transformer_layers_per_block is not supported")
    up_transformer_layers = config.get("reverse_transformer_layers_per_block") or list(reversed(transformer_layers))
    cross = _per_level(config.get("cross_attention_dim", 1280), levels, "cross_attention_dim")
    size = int(config.get("sample_size", 64))
    gated = True  # Transformer2DModel's default feed-forward is GEGLU
    attention_bias = bool(config.get("attention_bias", False))
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")

    layers: list[LayerShape] = []

    def add_block(path: str, level: int, num_heads: int, width: int, context_width: int) -> None:
        block = len({layer.block for layer in layers})
        tokens = (size // 2**level) ** 2
        head_dim = width // num_heads
        bias = 3 * head_dim if attention_bias else 0
        layers.append(LayerShape(f"{path}.attn1.to_out.0", block, "attn", num_heads, head_dim,
                                 4 * tokens * width * head_dim, 4 * width * head_dim + bias, width))
        layers.append(LayerShape(f"{path}.attn2.to_out.0", block, "cross_attn", num_heads, head_dim,
                                 (2 * tokens * width + 2 * context_tokens * context_width) * head_dim,
                                 (2 * width + 2 * context_width) * head_dim + bias, width))
        rows = 2 if gated else 1
        layers.append(LayerShape(f"{path}.ff.net.2", block, "mlp", FF_MULT * width, 1,
                                 (rows + 1) * tokens * width, (rows + 1) * width + rows, width))

    for i, kind in enumerate(down_types):
        if "CrossAttn" in kind:
            for j in range(int(layers_per_block[i])):
                for k in range(int(transformer_layers[i])):
                    add_block(f"down_blocks.{i}.attentions.{j}.transformer_blocks.{k}", i, int(heads[i]), int(channels[i]), int(cross[i]))
    for i, kind in enumerate(up_types):
        level = levels - 1 - i
        if "CrossAttn" in kind:
            for j in range(int(list(reversed(layers_per_block))[i]) + 1):
                for k in range(int(up_transformer_layers[i])):
                    add_block(f"up_blocks.{i}.attentions.{j}.transformer_blocks.{k}", level, int(list(reversed(heads))[i]),
                              int(channels[level]), int(list(reversed(cross))[i]))
    if mid_type and "CrossAttn" in str(mid_type):
        for k in range(int(transformer_layers[-1])):
            add_block(f"mid_block.attentions.0.transformer_blocks.{k}", levels - 1, int(heads[-1]), int(channels[-1]), int(cross[-1]))
    if not layers:
        raise ValueError("UNet config has no cross-attention blocks: nothing to prune")
    return BlockwiseShape(tuple(layers), num_tokens=size * size)


def encode_prompts(extras: Mapping[str, Any], prompts: Sequence[str], height: int, width: int,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> TextCondition:
    """SDXL's text conditioning of `prompts` for `height`×`width` pixel images.

    As StableDiffusionXLPipeline.encode_prompt (no clip skip): each tokenizer pads/truncates
    to its max length, each encoder's penultimate hidden state (N×M×Cᵢ) is taken, the two
    are concatenated to N×M×(C₁+C₂), and the second encoder's projected pooled output is
    `pooled_prompt_embeds`. time_ids = (height, width, 0, 0, height, width) per sample.
    """
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ValueError("at least one prompt is needed")
    hidden, pooled = [], None
    with torch.no_grad():
        for tokenizer, encoder in ((extras["tokenizer"], extras["text_encoder"]), (extras["tokenizer_2"], extras["text_encoder_2"])):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            pooled = out[0]  # the last encoder's (projected) pooled output
            hidden.append(out.hidden_states[-2])
    prompt_embeds = torch.cat(hidden, dim=-1)  # N × M × (C₁ + C₂)
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(len(prompts), 1)
    return TextCondition(prompt_embeds.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype),
                         time_ids.to(device=device, dtype=dtype))


class SDXLAdapter(FamilyAdapter):
    """The SDXL family: a UNet2DConditionModel with text + time-id conditioning."""

    name = "sdxl"
    model_classes = ("UNet2DConditionModel",)
    denoiser_folder = "unet"
    conditioning = "text"

    def condition_for(self, loaded, values: Any, negative_prompt: str | None = None) -> TextCondition:
        """The text condition of `values` (a prompt or a list of prompts) at the model's image size.

        `negative_prompt` (one text for every image) becomes the unconditional branch, as the
        pipeline's `negative_prompt`; None or an empty/blank text keeps the zero null branch.
        """
        prompts = [values] if isinstance(values, str) else list(values)
        size = loaded.pixel_size
        condition = encode_prompts(loaded.extras, prompts, size, size, loaded.device, loaded.dtype)
        if negative_prompt is None or not str(negative_prompt).strip():
            return condition
        negative = encode_prompts(loaded.extras, [str(negative_prompt)] * len(prompts), size, size, loaded.device, loaded.dtype)
        return dataclasses.replace(
            condition, negative_prompt_embeds=negative.prompt_embeds, negative_pooled_prompt_embeds=negative.pooled_prompt_embeds
        )

    def call_order(self, model: nn.Module) -> list[str]:
        """Down, mid, then up blocks: a UNet registers `mid_block` after `up_blocks` but runs it between."""
        rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
        return sorted(self.block_paths(model), key=lambda path: rank.get(path.split(".", 1)[0], 1))

    def shape_from_config(self, config: Mapping[str, Any], **context: Any) -> BlockwiseShape:
        """Per-layer costs of the UNet's transformer blocks (`unet_layer_shapes`)."""
        return unet_layer_shapes(config, int(context.get("context_tokens", CONTEXT_TOKENS)))

    def spec_fields(self, config: Mapping[str, Any], folder: Path) -> dict[str, Any]:
        """Shape, latent channels and size from a UNet config; text-conditioned (no classes)."""
        if config.get("addition_embed_type") != "text_time":
            raise ValueError(
                f"UNet in {folder} is not SDXL-like: addition_embed_type is {config.get('addition_embed_type')!r}, "
                "expected 'text_time' (pooled text embeddings + time ids)"
            )
        return {
            "shape": self.shape_from_config(config),
            "num_classes": 0,
            "in_channels": int(config.get("in_channels", 4)),
            "sample_size": int(config.get("sample_size", 128)),
            "latent": True,
        }

    def load_extras(self, root: Path, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """The two CLIP text encoders and their tokenizers from the pipeline folder."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        missing = [name for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2") if not (root / name).is_dir()]
        if missing:
            raise ValueError(f"SDXL folder {root} lacks {', '.join(missing)} (needed to embed prompts)")
        extras = {
            "tokenizer": CLIPTokenizer.from_pretrained(root / "tokenizer"),
            "tokenizer_2": CLIPTokenizer.from_pretrained(root / "tokenizer_2"),
            "text_encoder": CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype).to(device).eval(),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", torch_dtype=dtype).to(device).eval(),
        }
        for name in ("text_encoder", "text_encoder_2"):
            extras[name].requires_grad_(False)
        return extras


ADAPTER = register_adapter(SDXLAdapter())
