"""Flux (`FluxTransformer2DModel`, text-to-image, flow matching): double- and single-stream blocks.

Prunable blocks, in `named_modules` order:

- `transformer_blocks.{i}` (`FluxTransformerBlock`, double-stream): a joint attention over
  the N image and M text tokens (heads removed from both streams at once, kind
  "joint_attn"; docs/method.md §11), the image feed-forward `ff` and the text one
  `ff_context` (GELU(tanh), width 4·D; kinds "mlp", "context_mlp"). Sliced by
  `surgery.slice_joint_block`, like SD3's blocks.
- `single_transformer_blocks.{j}` (`FluxSingleTransformerBlock`, single-stream, over the
  N + M tokens concatenated): attention (q/k/v, no output projection) and an MLP
  (`proj_mlp`, F = 4·D) side by side, their outputs concatenated into ONE `proj_out`
  (D × (D + F)). A head is rows of to_q/k/v plus its hd columns of proj_out's attention
  part (layer "<block>.proj_out[attn]", kind "attn"); an MLP unit j is row j of
  proj_mlp plus column D + j of proj_out ("<block>.proj_out[mlp]", kind "mlp"). Each
  part has its own Hessian (the diagonal blocks of proj_out's input Hessian); the
  cross-term between the two parts is left out (docs/method.md §11).

Conditioning (`FluxCondition`): T5 hidden states (`encoder_hidden_states`, N×M×4096),
the CLIP pooled output (`pooled_projections`, N×768), `txt_ids` (M×3 zeros) and
`img_ids` (the 2×2-packed latent grid's (0, row, column)), and for guidance-distilled
models (FLUX.1-dev, `guidance_embeds`) the guidance value (3.5, FluxPipeline's default).
Such a model has no unconditional branch: `null()` is the condition itself, so
calibration sees what the model actually runs. Latents are packed 2×2 into tokens
(`pack_latents`), and FluxPipeline passes the transformer σ = t/1000 (timestep_scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

from mosaic_core.divide.shapes import BlockwiseShape, LayerShape
from mosaic_core.models.adapters.base import FamilyAdapter, register_adapter
from mosaic_core.models.adapters.sd3 import FF_MULT, joint_block_layers, joint_block_shapes

CLIP_TOKENS = 77
T5_TOKENS = 512  # FluxPipeline's max_sequence_length default
GUIDANCE = 3.5  # FluxPipeline's guidance_scale default (guidance-distilled models)


@dataclass(frozen=True)
class FluxCondition:
    """Flux's conditioning of N samples; ids are rebuilt per call (they have no batch dimension)."""

    prompt_embeds: torch.Tensor  # N × M × 4096 (T5)
    pooled_prompt_embeds: torch.Tensor  # N × 768 (CLIP pooled)
    guidance: torch.Tensor | None  # (N,) for guidance-distilled models, else None
    latent_height: int  # H, W of the N×C×H×W latents (before 2×2 packing)
    latent_width: int
    unconditional: ClassVar[bool] = False  # no unconditional branch: classifier-free guidance cannot run

    @property
    def batch_size(self) -> int:
        """Number of conditioned samples."""
        return int(self.prompt_embeds.shape[0])

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `FluxTransformer2DModel.forward` (as FluxPipeline builds them)."""
        embeds = self.prompt_embeds
        text_ids = torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=embeds.dtype)  # M × 3
        kwargs = {
            "encoder_hidden_states": embeds,
            "pooled_projections": self.pooled_prompt_embeds,
            "txt_ids": text_ids,
            "img_ids": latent_image_ids(self.latent_height, self.latent_width, embeds.device, embeds.dtype),
        }
        if self.guidance is not None:
            kwargs["guidance"] = self.guidance
        return kwargs

    def null(self) -> "FluxCondition":
        """No unconditional branch (guidance is distilled into the model): the condition itself."""
        return self


def latent_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """(H/2·W/2) × 3 ids (0, row, column) of the packed latent tokens (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)  # (H/2·W/2) × 3


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """N×C×H×W → N×(H/2·W/2)×4C: each 2×2 patch one token (FluxPipeline._pack_latents)."""
    n, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents need even height and width, got {h}×{w}")
    x = latents.view(n, c, h // 2, 2, w // 2, 2)  # N × C × H/2 × 2 × W/2 × 2
    x = x.permute(0, 2, 4, 1, 3, 5)  # N × H/2 × W/2 × C × 2 × 2
    return x.reshape(n, (h // 2) * (w // 2), c * 4)  # N × tokens × 4C


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents`: N×(H/2·W/2)×4C → N×C×H×W."""
    n, _, channels = tokens.shape
    x = tokens.view(n, height // 2, width // 2, channels // 4, 2, 2)  # N × H/2 × W/2 × C × 2 × 2
    x = x.permute(0, 3, 1, 4, 2, 5)  # N × C × H/2 × 2 × W/2 × 2
    return x.reshape(n, channels // 4, height, width)


def flux_layer_shapes(config: Mapping[str, Any], latent_size: int = 128, context_tokens: int = T5_TOKENS) -> BlockwiseShape:
    """The prunable layers of a `FluxTransformer2DModel` and their costs, from its config alone.

    N = (latent_size/2)² image tokens (2×2 packing); double blocks as SD3's
    (`sd3.joint_block_shapes`); a single block runs over N + M tokens: a head costs q,k,v
    and its proj_out columns, 4·(N+M)·D·hd MACs; an MLP unit proj_mlp's row and proj_out's
    column, 2·(N+M)·D.
    """
    heads = int(config.get("num_attention_heads", 24))
    head_dim = int(config.get("attention_head_dim", 128))
    width = heads * head_dim
    tokens = (int(latent_size) // 2) ** 2
    layers: list[LayerShape] = []
    double = int(config.get("num_layers", 19))
    for i in range(double):
        layers += joint_block_shapes(f"transformer_blocks.{i}", i, tokens, context_tokens, width, heads, head_dim,
                                     context_out=True, dual=False)
    joint = tokens + context_tokens
    for j in range(int(config.get("num_single_layers", 38))):
        path = f"single_transformer_blocks.{j}"
        layers.append(LayerShape(f"{path}.proj_out[attn]", double + j, "attn", heads, head_dim,
                                 4 * joint * width * head_dim, 4 * width * head_dim + 3 * head_dim, width))
        layers.append(LayerShape(f"{path}.proj_out[mlp]", double + j, "mlp", FF_MULT * width, 1,
                                 2 * joint * width, 2 * width + 1, 0))
    return BlockwiseShape(tuple(layers), num_tokens=tokens)


def encode_prompts(extras: Mapping[str, Any], prompts: Sequence[str], max_sequence_length: int = T5_TOKENS,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 prompt_embeds N×L×4096, CLIP pooled N×768) as FluxPipeline.encode_prompt."""
    prompts = [str(p) for p in prompts]
    with torch.no_grad():
        tokenizer, encoder = extras["tokenizer"], extras["text_encoder"]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_overflowing_tokens=False, return_length=False, return_tensors="pt").input_ids
        pooled = encoder(ids.to(encoder.device), output_hidden_states=False).pooler_output  # N × 768
        tokenizer_2, encoder_2 = extras["tokenizer_2"], extras["text_encoder_2"]
        t5_ids = tokenizer_2(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                             return_length=False, return_overflowing_tokens=False, return_tensors="pt").input_ids
        embeds = encoder_2(t5_ids.to(encoder_2.device), output_hidden_states=False)[0]  # N × L × 4096
    return embeds.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)


def flux_condition(extras: Mapping[str, Any], prompts, latent_size: int, guidance: float | None,
                   device="cpu", dtype=torch.float32, max_sequence_length: int = T5_TOKENS) -> FluxCondition:
    """A `FluxCondition` for `prompts` at `latent_size`² latents; `guidance` None for models without it."""
    prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
    if not prompts:
        raise ValueError("at least one prompt is needed")
    embeds, pooled = encode_prompts(extras, prompts, max_sequence_length, device, dtype)
    value = None if guidance is None else torch.full((len(prompts),), float(guidance), device=device, dtype=dtype)
    return FluxCondition(embeds, pooled, value, int(latent_size), int(latent_size))


class FluxAdapter(FamilyAdapter):
    """The Flux family: double-stream joint blocks, single-stream fused blocks, packed latents."""

    name = "flux"
    model_classes = ("FluxTransformer2DModel",)
    denoiser_folder = "transformer"
    block_classes = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    conditioning = "text"
    timestep_scale = 1 / 1000  # FluxPipeline passes σ = t/1000
    default_sampler = "flow-euler-1/n"  # FluxPipeline's σ grid: linspace(1, 1/N, N), then the shift
    guidance_distilled = True

    def block_layers(self, path: str, block: nn.Module) -> list[tuple]:
        """Double-stream: as SD3's joint blocks. Single-stream: proj_out's attention and MLP parts."""
        from mosaic_core.prune.hessian import LayerPart

        if type(block).__name__ == "FluxTransformerBlock":
            return joint_block_layers(path, block)
        attn = block.attn
        head_dim = attn.inner_dim // attn.heads
        units = block.proj_mlp.out_features
        attention, mlp = f"{path}.proj_out[attn]", f"{path}.proj_out[mlp]"
        return [
            ("attn", attention, head_dim, attn.heads, (LayerPart(f"{path}.proj_out", 0, head_dim, attention),)),
            ("mlp", mlp, 1, units, (LayerPart(f"{path}.proj_out", attn.inner_dim, 1, mlp),)),
        ]

    def slice_block(self, block: nn.Module, keep, weights: Mapping[str, torch.Tensor]) -> nn.Module:
        """`surgery.slice_joint_block` (double-stream) or `surgery.slice_parallel_block` (single-stream)."""
        from mosaic_core.prune.surgery import slice_joint_block, slice_parallel_block

        if type(block).__name__ == "FluxTransformerBlock":
            return slice_joint_block(block, keep, weights)
        return slice_parallel_block(block, keep, weights)

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """2×2 patches of N×C×H×W latents as N×(H/2·W/2)×4C tokens."""
        return pack_latents(latents)

    def unpack_latents(self, output: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The transformer's tokens back to N×C×H×W like `latents`."""
        return unpack_latents(output, latents.shape[-2], latents.shape[-1])

    def condition_for(self, loaded, values: Any, negative_prompt: str | None = None) -> FluxCondition:
        """The text condition of `values` at the model's latent size, with FluxPipeline's default guidance.

        Flux is guidance-distilled: one conditional call per step, no unconditional branch for a
        negative prompt to replace, so a non-empty one is refused."""
        if negative_prompt is not None and str(negative_prompt).strip():
            raise ValueError(
                f"'{loaded.spec.name}' is guidance-distilled (Flux): it runs no unconditional branch for a "
                "negative prompt to steer; leave the negative prompt empty"
            )
        guidance = GUIDANCE if loaded.transformer.config.get("guidance_embeds", False) else None
        return flux_condition(loaded.extras, values, loaded.spec.sample_size, guidance, loaded.device, loaded.dtype)

    def shape_from_config(self, config: Mapping[str, Any], **context: Any) -> BlockwiseShape:
        """Per-layer costs (`flux_layer_shapes`) at a 128² latent (1024² pixels) and 512 text tokens."""
        return flux_layer_shapes(config, int(context.get("latent_size", 128)), int(context.get("context_tokens", T5_TOKENS)))

    def spec_fields(self, config: Mapping[str, Any], folder: Path) -> dict[str, Any]:
        """Shape, latent channels (in_channels / 4: packing) and latent size; no CFG (guidance is distilled).

        The transformer config has no image size: the latent side is the VAE's sample_size
        over its downsampling factor 2^(levels − 1) when a vae/ config is there, else 128
        (1024² pixels, FluxPipeline's default).
        """
        latent_size = 128
        vae_config = folder / "vae" / "config.json"
        if vae_config.is_file():
            import json

            vae = json.loads(vae_config.read_text())
            latent_size = int(vae.get("sample_size", 1024)) // 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)
        return {
            "shape": self.shape_from_config(config, latent_size=latent_size),
            "num_classes": 0,
            "in_channels": int(config.get("in_channels", 64)) // 4,
            "sample_size": latent_size,
            "latent": True,
            "default_cfg": 1.0,
            # 2×2-packed latent tokens: the μ of FluxPipeline's dynamically shifted σ (4096 at 1024²)
            "image_seq_len": (latent_size // 2) ** 2,
            # without guidance_embeds the model is timestep-distilled (FLUX.1-schnell): 4 steps, as
            # its model card samples, not FluxPipeline's 28 (which are FLUX.1-dev's)
            **({} if config.get("guidance_embeds", False) else {"default_steps": 4}),
        }

    def load_extras(self, root: Path, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """The CLIP and T5 encoders and their tokenizers from the pipeline folder."""
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        names = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
        missing = [name for name in names if not (root / name).is_dir()]
        if missing:
            raise ValueError(f"Flux folder {root} lacks {', '.join(missing)} (needed to embed prompts)")
        extras: dict[str, Any] = {name: AutoTokenizer.from_pretrained(root / name) for name in names[2:]}
        extras["text_encoder"] = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype)
        extras["text_encoder_2"] = T5EncoderModel.from_pretrained(root / "text_encoder_2", torch_dtype=dtype)
        for name in names[:2]:
            extras[name] = extras[name].to(device).eval().requires_grad_(False)
        return extras


ADAPTER = register_adapter(FluxAdapter())
