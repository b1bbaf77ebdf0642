"""PixArt-α and PixArt-Σ (`PixArtTransformer2DModel`): text-to-image DiTs conditioned on T5.

Every block (`transformer_blocks.i`) is a `BasicTransformerBlock` of width D with
self-attention `attn1` (heads over the N = (sample_size / patch_size)² image tokens),
cross-attention `attn2` (queries from the image tokens; keys/values from the M T5 text
tokens after the model's caption projection, width C = cross_attention_dim = D) and a
GELU(tanh) feed-forward `ff` of F = 4·D units (one row of the input projection per unit,
not gated). Normalisation is adaLN-single: one timestep embedding shared by all blocks plus
a per-block `scale_shift_table` — nothing there is prunable. All blocks are the same, but
the cross-attention costs differ from the self-attention ones, so the cost model is the
per-layer `divide.shapes.BlockwiseShape` (docs/method.md §4), with the q/k/v biases
(`attention_bias`) counted per head.

M is the pipeline's `max_sequence_length`: 120 for PixArtAlphaPipeline, 300 for
PixArtSigmaPipeline (read from the folder's model_index.json; 300 when there is none).

Conditioning (`PixArtCondition`): the T5 encoder's last hidden states of the prompt padded
to M tokens (N×M×C_T5) and its attention mask (N×M), as the pipelines' `encode_prompt`
(prompt lower-cased and stripped: their `clean_caption=False` path); `added_cond_kwargs`
holds the image `resolution` (N×2, pixels) and `aspect_ratio` (N×1) when the transformer
uses additional conditions (config `use_additional_conditions`, by default sample_size ==
128, PixArt-α 1024), else None (PixArt-Σ). The null branch of classifier-free guidance is
what the pipelines use for their default empty negative prompt: the T5 embedding of ""
(padded to M, with its own mask). It is the same for every sample, so the condition holds
it once (`EmptyPrompt`) and `null()` repeats it for the batch.

The transformer predicts ε and the learned variance (out_channels = 2 · in_channels); the
engine's sampler keeps the first in_channels, as the pipelines do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from mosaic_core import limits
from mosaic_core.divide.shapes import BlockwiseShape, LayerShape
from mosaic_core.models.adapters.base import FamilyAdapter, register_adapter

# The pipelines' max_sequence_length: the T5 tokens cross-attention reads.
CONTEXT_TOKENS = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}
DEFAULT_CONTEXT_TOKENS = 300
FF_MULT = 4  # FeedForward's inner width = 4 · D

# Config fields read here, with their allowed ranges (a hostile config is refused early).
_CONFIG_INTS = {**limits.TRANSFORMER_CONFIG_INTS, "cross_attention_dim": (1, 65536), "caption_channels": (1, 65536)}


class EmptyPrompt:
    """The T5 embedding of the empty prompt (1×M×C) and its mask (1×M): CFG's null, held once.

    Deliberately not a tensor or a dataclass, so that the engine's condition helpers (which
    select, concatenate and move batch tensors) pass it through unchanged.
    """

    def __init__(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> None:
        if embeds.ndim != 3 or embeds.shape[0] != 1 or tuple(attention_mask.shape) != tuple(embeds.shape[:2]):
            raise ValueError(f"empty-prompt embeds must be 1×M×C with a 1×M mask, got {tuple(embeds.shape)} and {tuple(attention_mask.shape)}")
        self.embeds = embeds
        self.attention_mask = attention_mask

    def repeat(self, batch: int, like: torch.Tensor, mask_like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch×M×C embeds on `like`'s device and dtype, batch×M mask like `mask_like`)."""
        embeds = self.embeds.to(device=like.device, dtype=like.dtype).expand(batch, -1, -1)  # batch × M × C
        mask = self.attention_mask.to(device=mask_like.device, dtype=mask_like.dtype).expand(batch, -1)  # batch × M
        return embeds, mask


@dataclass(frozen=True)
class PixArtCondition:
    """PixArt's conditioning of N samples: T5 prompt embeddings and mask, optional size conditions."""

    prompt_embeds: torch.Tensor  # N × M × C_T5
    prompt_attention_mask: torch.Tensor  # N × M (1 = token, 0 = padding)
    empty_prompt: EmptyPrompt  # CFG's null, shared by every sample
    resolution: torch.Tensor | None = None  # N × 2 (height, width in pixels), PixArt-α 1024 only
    aspect_ratio: torch.Tensor | None = None  # N × 1 (height / width)

    @property
    def batch_size(self) -> int:
        """Number of conditioned samples."""
        return int(self.prompt_embeds.shape[0])

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `PixArtTransformer2DModel.forward`."""
        return {
            "encoder_hidden_states": self.prompt_embeds,
            "encoder_attention_mask": self.prompt_attention_mask,
            "added_cond_kwargs": {"resolution": self.resolution, "aspect_ratio": self.aspect_ratio},
        }

    def null(self) -> "PixArtCondition":
        """The unconditional branch: the empty prompt's embedding and mask, same size conditions."""
        embeds, mask = self.empty_prompt.repeat(self.batch_size, self.prompt_embeds, self.prompt_attention_mask)
        return PixArtCondition(embeds, mask, self.empty_prompt, self.resolution, self.aspect_ratio)


def _int_field(config: Mapping[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    if value is None:
        value = default
    low, high = _CONFIG_INTS[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"PixArt transformer config: '{key}' must be a whole number in [{low}, {high}]")
    return value


def uses_additional_conditions(config: Mapping[str, Any]) -> bool:
    """Whether the transformer reads resolution and aspect ratio (diffusers' rule: config, else sample_size == 128)."""
    value = config.get("use_additional_conditions")
    return bool(value) if value is not None else int(config.get("sample_size", 128)) == 128


def pixart_layer_shapes(config: Mapping[str, Any], context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> BlockwiseShape:
    """The prunable layers of a `PixArtTransformer2DModel` and their costs, from its config alone.

    Per block, with D = heads · hd, N image tokens, M text tokens of width C:

    | layer           | group | MACs per group          | weights per group (+ q/k/v biases) |
    |-----------------|-------|-------------------------|------------------------------------|
    | attn1.to_out.0  | head  | 4·N·D·hd                | 4·D·hd (+ 3·hd)                    |
    | attn2.to_out.0  | head  | (2·N·D + 2·M·C)·hd      | (2·D + 2·C)·hd (+ 3·hd)            |
    | ff.net.2        | unit  | 2·N·D                   | 2·D + 1                            |

    The output biases (D each) never shrink (`fixed_params`).
    """
    heads = _int_field(config, "num_attention_heads", 16)
    head_dim = _int_field(config, "attention_head_dim", 72)
    num_layers = _int_field(config, "num_layers", 28)
    patch = _int_field(config, "patch_size", 2)
    size = _int_field(config, "sample_size", 128)
    width = heads * head_dim  # D
    if "cross_attention_dim" in config and config["cross_attention_dim"] is None:
        raise ValueError("PixArt transformer config: 'cross_attention_dim' is None (no cross-attention): nothing reads the text")
    context_width = _int_field(config, "cross_attention_dim", 1152)  # C (the caption projection's output; diffusers' default)
    if config.get("norm_type", "ada_norm_single") != "ada_norm_single":
        raise ValueError("PixArt transformer config: 'norm_type' must be 'ada_norm_single'")
    if config.get("activation_fn", "gelu-approximate") not in ("gelu", "gelu-approximate"):
        raise ValueError("PixArt transformer config: 'activation_fn' must be 'gelu' or 'gelu-approximate' (an ungated feed-forward)")
    if int(context_tokens) < 1:
        raise ValueError(f"context tokens must be >= 1, got {context_tokens}")
    tokens = (size // patch) ** 2  # N
    bias = 3 * head_dim if config.get("attention_bias", True) else 0
    layers: list[LayerShape] = []
    for block in range(num_layers):
        path = f"transformer_blocks.{block}"
        layers.append(LayerShape(f"{path}.attn1.to_out.0", block, "attn", heads, head_dim,
                                 4 * tokens * width * head_dim, 4 * width * head_dim + bias, width))
        layers.append(LayerShape(f"{path}.attn2.to_out.0", block, "cross_attn", heads, head_dim,
                                 (2 * tokens * width + 2 * int(context_tokens) * context_width) * head_dim,
                                 (2 * width + 2 * context_width) * head_dim + bias, width))
        layers.append(LayerShape(f"{path}.ff.net.2", block, "mlp", FF_MULT * width, 1,
                                 2 * tokens * width, 2 * width + 1, width))
    return BlockwiseShape(tuple(layers), num_tokens=tokens)


def context_tokens_of(root: Path) -> int:
    """The pipeline's max_sequence_length from the folder's model_index.json (300 when unknown)."""
    from mosaic_core import limits

    path = Path(root) / "model_index.json"
    try:
        if path.stat().st_size > limits.MAX_CONFIG_BYTES:  # a hostile file is not read whole
            return DEFAULT_CONTEXT_TOKENS
        name = json.loads(path.read_bytes()).get("_class_name")
    except (OSError, ValueError, AttributeError, RecursionError):
        return DEFAULT_CONTEXT_TOKENS
    return CONTEXT_TOKENS.get(name, DEFAULT_CONTEXT_TOKENS) if isinstance(name, str) else DEFAULT_CONTEXT_TOKENS


def encode_text(extras: Mapping[str, Any], prompts: Sequence[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N×M×C embeds, N×M mask) of `prompts` by the T5 encoder, as the pipelines' `encode_prompt`.

    Each prompt is lower-cased and stripped (their `clean_caption=False` path), tokenised with
    padding and truncation to M = `max_sequence_length` tokens, and encoded with its mask.
    """
    tokenizer, encoder = extras["tokenizer"], extras["text_encoder"]
    texts = [str(p).lower().strip() for p in prompts]
    tokens = tokenizer(texts, padding="max_length", max_length=int(max_sequence_length), truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    mask = tokens.attention_mask.to(encoder.device)  # N × M
    with torch.no_grad():
        embeds = encoder(tokens.input_ids.to(encoder.device), attention_mask=mask)[0]  # N × M × C_T5
    return embeds, mask


def encode_prompts(extras: Mapping[str, Any], prompts: Sequence[str], height: int, width: int,
                   additional_conditions: bool, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, negative_prompt: str | None = None) -> PixArtCondition:
    """PixArt's condition of `prompts` for `height`×`width` pixel images (see the module docstring);
    CFG's ∅ is `negative_prompt` encoded like a prompt, "" without one (as the pipelines do)."""
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise ValueError("at least one prompt is needed")
    length = int(extras.get("max_sequence_length", DEFAULT_CONTEXT_TOKENS))
    embeds, mask = encode_text(extras, prompts, length)
    empty_embeds, empty_mask = encode_text(extras, [str(negative_prompt or "")], length)
    resolution = aspect_ratio = None
    if additional_conditions:
        resolution = torch.tensor([[float(height), float(width)]]).repeat(len(prompts), 1).to(device=device, dtype=dtype)  # N × 2
        aspect_ratio = torch.tensor([[float(height / width)]]).repeat(len(prompts), 1).to(device=device, dtype=dtype)  # N × 1
    return PixArtCondition(
        embeds.to(device=device, dtype=dtype), mask.to(device),
        EmptyPrompt(empty_embeds.to(device=device, dtype=dtype), empty_mask.to(device)), resolution, aspect_ratio,
    )


def _check_tokenizer_backend(folder: Path) -> None:
    """A tokenizer shipped only as a SentencePiece model (spiece.model, no tokenizer.json, as on the
    hub) is converted by transformers with the sentencepiece and protobuf packages; without them
    it silently falls back to another extractor, so refuse clearly instead."""
    from transformers.utils import is_protobuf_available, is_sentencepiece_available

    if (folder / "tokenizer.json").is_file() or not (folder / "spiece.model").is_file():
        return
    absent = [name for name, present in (("sentencepiece", is_sentencepiece_available()), ("protobuf", is_protobuf_available())) if not present]
    if absent:
        raise ValueError(
            f"the T5 tokenizer in {folder} is a SentencePiece model (spiece.model, no tokenizer.json): "
            f"reading it needs the packages {' and '.join(absent)} (pip install {' '.join(absent)})"
        )


class PixArtAdapter(FamilyAdapter):
    """The PixArt family: `transformer_blocks.{i}` with attn1 + attn2 + GELU ff, T5 text conditioning."""

    name = "pixart"
    model_classes = ("PixArtTransformer2DModel",)
    denoiser_folder = "transformer"
    conditioning = "text"
    legacy_norm_types = ("ada_norm_single",)  # hub PixArt folders name the legacy Transformer2DModel

    def condition_for(self, loaded, values: Any, negative_prompt: str | None = None) -> PixArtCondition:
        """The text condition of `values` (a prompt or a list of prompts) at the model's image size;
        ∅ = the negative prompt, or the empty one."""
        prompts = [values] if isinstance(values, str) else list(values)
        size = loaded.pixel_size
        return encode_prompts(loaded.extras, prompts, size, size, uses_additional_conditions(loaded.transformer.config),
                              loaded.device, loaded.dtype, negative_prompt)

    def shape_from_config(self, config: Mapping[str, Any], **context: Any) -> BlockwiseShape:
        """Per-layer costs of the transformer blocks (`pixart_layer_shapes`); `context_tokens` = M."""
        return pixart_layer_shapes(config, int(context.get("context_tokens", DEFAULT_CONTEXT_TOKENS)))

    def spec_fields(self, config: Mapping[str, Any], folder: Path) -> dict[str, Any]:
        """Shape (M from the folder's pipeline class), latent channels and size; text-conditioned."""
        return {
            "shape": self.shape_from_config(config, context_tokens=context_tokens_of(folder)),
            "num_classes": 0,
            "in_channels": _int_field(config, "in_channels", 4),
            "sample_size": _int_field(config, "sample_size", 128),
            "latent": True,
        }

    def load_extras(self, root: Path, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """The T5 encoder and its tokenizer from the pipeline folder, and the pipeline's M."""
        from transformers import T5EncoderModel, T5Tokenizer

        missing = [name for name in ("text_encoder", "tokenizer") if not (root / name).is_dir()]
        if missing:
            raise ValueError(f"PixArt folder {root} lacks {', '.join(missing)} (needed to embed prompts)")
        _check_tokenizer_backend(root / "tokenizer")
        encoder = T5EncoderModel.from_pretrained(root / "text_encoder", torch_dtype=dtype).to(device).eval()
        encoder.requires_grad_(False)
        return {
            "tokenizer": T5Tokenizer.from_pretrained(root / "tokenizer"),
            "text_encoder": encoder,
            "max_sequence_length": context_tokens_of(root),  # not a pipeline component: load_pipeline drops it
        }


ADAPTER = register_adapter(PixArtAdapter())
