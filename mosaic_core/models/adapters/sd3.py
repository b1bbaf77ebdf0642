"""SD3 / SD3.5 (`SD3Transformer2DModel`, text-to-image, flow matching): joint-attention blocks.

Prunable blocks are `transformer_blocks.{i}` (`JointTransformerBlock`). Each has

- `attn`, a joint attention: the N image tokens (to_q/k/v, to_out.0) and the M context
  tokens (add_q/k/v_proj, to_add_out) attend together, so a head is removed from both
  streams at once (kind "joint_attn", one group = hd columns of to_out.0 and hd of
  to_add_out; docs/method.md §11). The last block is `context_pre_only`: its context stream
  has no output projection and no feed-forward, so its heads are columns of to_out.0 alone
  (its add_q/k/v rows still go: the image tokens read the context keys and values).
- `attn2` in SD3.5's first `dual_attention_layers` blocks: a second, image-only
  self-attention (kind "dual_attn").
- `ff` (image) and `ff_context` (context, absent in the last block), GELU(tanh)
  feed-forwards of width 4·D (kinds "mlp", "context_mlp").

Tokens: N = (sample_size / patch_size)² image tokens; M = 77 CLIP + `max_sequence_length`
T5 tokens (256, StableDiffusion3Pipeline's default), which the context projections and
feed-forward run over. The cost is per layer (`divide.shapes.BlockwiseShape`).

Conditioning (`JointTextCondition`): `encoder_hidden_states` (N×M×4096: the two CLIP
encoders' penultimate hidden states concatenated and zero-padded to T5's width, then the
T5 states appended along the tokens) and `pooled_projections` (N×2048, the two CLIP pooled
outputs). Classifier-free guidance's null branch is the encoding of the empty negative
prompt (StableDiffusion3Pipeline encodes "" with the same encoders; it is not zeros), so
the condition carries it. The pipeline passes the transformer t = σ·1000: timestep_scale 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mosaic_core.divide.shapes import BlockwiseShape, LayerShape
from mosaic_core.models.adapters.base import FamilyAdapter, register_adapter

CLIP_TOKENS = 77  # CLIP's max_length
T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length default
FF_MULT = 4


@dataclass(frozen=True)
class JointTextCondition:
    """Text conditioning of a joint-attention transformer: context tokens + pooled vector, and ∅'s."""

    prompt_embeds: torch.Tensor  # N × M × C (encoder_hidden_states)
    pooled_prompt_embeds: torch.Tensor  # N × P (pooled_projections)
    null_prompt_embeds: torch.Tensor  # N × M × C: the empty prompt's
    null_pooled_prompt_embeds: torch.Tensor  # N × P

    @property
    def batch_size(self) -> int:
        """Number of conditioned samples."""
        return int(self.prompt_embeds.shape[0])

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `SD3Transformer2DModel.forward`."""
        return {"encoder_hidden_states": self.prompt_embeds, "pooled_projections": self.pooled_prompt_embeds}

    def null(self) -> "JointTextCondition":
        """The unconditional branch: the empty prompt's embeddings (as the pipeline's negative prompt "")."""
        return JointTextCondition(self.null_prompt_embeds, self.null_pooled_prompt_embeds,
                                  self.null_prompt_embeds, self.null_pooled_prompt_embeds)


def joint_block_shapes(path: str, block: int, tokens: int, context_tokens: int, width: int, heads: int, head_dim: int,
                       context_out: bool, dual: bool, bias: bool = True) -> list[LayerShape]:
    """The LayerShapes of one joint-attention block (module docstring; `LayerShape`'s table).

    Per head: q,k,v,out over the N image tokens (4·N·D·hd MACs) and add q,k,v (and
    to_add_out when the context stream continues) over the M context tokens. Per
    feed-forward unit: 2·N·D (image) or 2·M·D (context) MACs.
    """
    qkv_bias = 3 * head_dim if bias else 0
    context_projections = 4 if context_out else 3
    layers = [LayerShape(
        f"{path}.attn.to_out.0", block, "joint_attn", heads, head_dim * (2 if context_out else 1),
        (4 * tokens + context_projections * context_tokens) * width * head_dim,
        (4 + context_projections) * width * head_dim + 2 * qkv_bias, width * (2 if context_out else 1),
    )]
    if dual:
        layers.append(LayerShape(f"{path}.attn2.to_out.0", block, "dual_attn", heads, head_dim,
                                 4 * tokens * width * head_dim, 4 * width * head_dim + qkv_bias, width))
    layers.append(LayerShape(f"{path}.ff.net.2", block, "mlp", FF_MULT * width, 1, 2 * tokens * width, 2 * width + 1, width))
    if context_out:
        layers.append(LayerShape(f"{path}.ff_context.net.2", block, "context_mlp", FF_MULT * width, 1,
                                 2 * context_tokens * width, 2 * width + 1, width))
    return layers


def sd3_layer_shapes(config: Mapping[str, Any], context_tokens: int = CLIP_TOKENS + T5_TOKENS) -> BlockwiseShape:
    """The prunable layers of an `SD3Transformer2DModel` and their costs, from its config alone."""
    heads = int(config.get("num_attention_heads", 18))
    head_dim = int(config.get("attention_head_dim", 64))
    num_layers = int(config.get("num_layers", 18))
    width = heads * head_dim
    tokens = (int(config.get("sample_size", 128)) // int(config.get("patch_size", 2))) ** 2
    dual = {int(i) for i in (config.get("dual_attention_layers") or ())}
    layers: list[LayerShape] = []
    for i in range(num_layers):
        layers += joint_block_shapes(f"transformer_blocks.{i}", i, tokens, context_tokens, width, heads, head_dim,
                                     context_out=i != num_layers - 1, dual=i in dual)
    return BlockwiseShape(tuple(layers), num_tokens=tokens)


def joint_block_layers(path: str, block: nn.Module) -> list[tuple]:
    """(kind, name, group size, groups, parts) of a joint-attention block, read from its modules."""
    from mosaic_core.prune.hessian import LayerPart

    attn = block.attn
    head_dim = attn.inner_dim // attn.heads
    name = f"{path}.attn.to_out.0"
    parts = [LayerPart(name, 0, head_dim, name)]
    if getattr(attn, "to_add_out", None) is not None:
        parts.append(LayerPart(f"{path}.attn.to_add_out", 0, head_dim, f"{path}.attn.to_add_out"))
    layers = [("joint_attn", name, head_dim * len(parts), attn.heads, tuple(parts))]
    dual = getattr(block, "attn2", None)
    if dual is not None:
        layers.append(("dual_attn", f"{path}.attn2.to_out.0", dual.inner_dim // dual.heads, dual.heads))
    layers.append(("mlp", f"{path}.ff.net.2", 1, block.ff.net[2].in_features))
    context_ff = getattr(block, "ff_context", None)
    if context_ff is not None:
        layers.append(("context_mlp", f"{path}.ff_context.net.2", 1, context_ff.net[2].in_features))
    return layers


def encode_prompts(extras: Mapping[str, Any], prompts: Sequence[str], max_sequence_length: int = T5_TOKENS,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds N×(77+L)×C_T5, pooled N×(P₁+P₂)) as StableDiffusion3Pipeline.encode_prompt (no clip skip)."""
    prompts = [str(p) for p in prompts]
    hidden, pooled = [], []
    with torch.no_grad():
        for tokenizer, encoder in ((extras["tokenizer"], extras["text_encoder"]), (extras["tokenizer_2"], extras["text_encoder_2"])):
            ids = tokenizer(prompts, padding="max_length", max_length=extras["tokenizer"].model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            pooled.append(out[0])  # N × Pᵢ (projected pooled output)
            hidden.append(out.hidden_states[-2])  # N × 77 × Cᵢ
        clip = torch.cat(hidden, dim=-1)  # N × 77 × (C₁ + C₂)
        t5_ids = extras["tokenizer_3"](prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                                       add_special_tokens=True, return_tensors="pt").input_ids
        t5 = extras["text_encoder_3"](t5_ids.to(extras["text_encoder_3"].device))[0]  # N × L × C_T5
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # zero-pad to T5's width
        embeds = torch.cat([clip, t5.to(clip.dtype)], dim=-2)  # N × (77 + L) × C_T5
    return embeds.to(device=device, dtype=dtype), torch.cat(pooled, dim=-1).to(device=device, dtype=dtype)


def joint_condition(
    extras: Mapping[str, Any], prompts: Sequence[str], encode, device, dtype, negative_prompt: str | None = None
) -> JointTextCondition:
    """A `JointTextCondition` for `prompts` with `encode(extras, prompts, device=, dtype=)`; ∅ = the
    negative prompt encoded the same way, the empty prompt without one (StableDiffusion3Pipeline's)."""
    prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
    if not prompts:
        raise ValueError("at least one prompt is needed")
    embeds, pooled = encode(extras, prompts, device=device, dtype=dtype)
    null_embeds, null_pooled = encode(extras, [str(negative_prompt or "")], device=device, dtype=dtype)
    n = len(prompts)
    return JointTextCondition(embeds, pooled, null_embeds.expand(n, *null_embeds.shape[1:]).contiguous(),
                              null_pooled.expand(n, -1).contiguous())


class SD3Adapter(FamilyAdapter):
    """The SD3 family: joint-attention blocks, CLIP+T5 text conditioning, flow matching."""

    name = "sd3"
    model_classes = ("SD3Transformer2DModel",)
    denoiser_folder = "transformer"
    block_classes = ("JointTransformerBlock",)
    conditioning = "text"

    def block_layers(self, path: str, block: nn.Module) -> list[tuple]:
        """Joint attention (both streams), SD3.5's attn2, the image and context feed-forwards."""
        return joint_block_layers(path, block)

    def slice_block(self, block: nn.Module, keep, weights: Mapping[str, torch.Tensor]) -> nn.Module:
        """`surgery.slice_joint_block`."""
        from mosaic_core.prune.surgery import slice_joint_block

        return slice_joint_block(block, keep, weights)

    def condition_for(self, loaded, values: Any, negative_prompt: str | None = None) -> JointTextCondition:
        """The text condition of `values` (a prompt or a list); ∅ = the negative prompt, or the empty one."""
        return joint_condition(loaded.extras, values, encode_prompts, loaded.device, loaded.dtype, negative_prompt)

    def shape_from_config(self, config: Mapping[str, Any], **context: Any) -> BlockwiseShape:
        """Per-layer costs (`sd3_layer_shapes`); `context_tokens` defaults to 77 + 256."""
        return sd3_layer_shapes(config, int(context.get("context_tokens", CLIP_TOKENS + T5_TOKENS)))

    def spec_fields(self, config: Mapping[str, Any], folder: Path) -> dict[str, Any]:
        """Shape, latent channels and size from the transformer config; text-conditioned."""
        return {
            "shape": self.shape_from_config(config),
            "num_classes": 0,
            "in_channels": int(config.get("in_channels", 16)),
            "sample_size": int(config.get("sample_size", 128)),
            "latent": True,
        }

    def load_extras(self, root: Path, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """The two CLIP encoders, the T5 encoder and their tokenizers from the pipeline folder."""
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        names = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
        missing = [name for name in names if not (root / name).is_dir()]
        if missing:
            raise ValueError(f"SD3 folder {root} lacks {', '.join(missing)} (needed to embed prompts)")
        extras: dict[str, Any] = {name: AutoTokenizer.from_pretrained(root / name) for name in names[3:]}
        for name, cls in (("text_encoder", CLIPTextModelWithProjection), ("text_encoder_2", CLIPTextModelWithProjection),
                          ("text_encoder_3", T5EncoderModel)):
            extras[name] = cls.from_pretrained(root / name, torch_dtype=dtype).to(device).eval().requires_grad_(False)
        return extras


ADAPTER = register_adapter(SD3Adapter())
