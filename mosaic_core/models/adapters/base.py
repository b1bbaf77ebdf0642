"""One interface per model family: what the engine needs to know about a denoiser.

The engine (Hessians, surgery, staged sampling, calibration, cost) never names a model
family; it asks the family's `FamilyAdapter`, found by the denoiser's diffusers class
name (`adapter_for_model`, `adapter_for_class`). An adapter says:

| question                         | method                          | DiT                      | SDXL (UNet)                         |
|----------------------------------|---------------------------------|--------------------------|-------------------------------------|
| which blocks are prunable        | `block_paths`                   | transformer_blocks.i     | */attentions.j/transformer_blocks.k |
| their prunable groups            | `prunable_layers`               | self-attn heads, FF units| + cross-attn heads (GEGLU FF)        |
| the Hessian site of each group   | `PrunableLayer.name`            | input of to_out.0/net.2  | same, per attention and FF          |
| slicing                          | `mosaic_core.prune.surgery`     | generic diffusers Attention + FeedForward            |
| per-block cost, before any weight| `shape_from_config`             | homogeneous shape        | one `LayerShape` per prunable layer |
| the conditioned call, CFG's null | `Condition.model_kwargs/null`   | class labels, ∅ = classes| prompt embeds, pooled, time_ids; ∅ = zeros |
| loading a local diffusers folder | `load_denoiser`, `load_extras`  | transformer/             | unet/, text_encoder(_2), tokenizer(_2) |
| slicing one block                | `slice_block`                   | surgery.slice_basic_block| same (SD3/Flux: slice_joint_block, slice_parallel_block) |
| the denoiser's input form        | `pack_latents`, `timestep_scale`| identity, t              | identity, t (Flux: 2×2 tokens, σ = t/1000) |

PixArt-α/Σ (`pixart.py`) has DiT's block layout plus cross-attention heads (GELU FF), a
per-layer cost with M = 120 or 300 T5 tokens, T5 embeddings + attention mask as its
condition with ∅ = T5(""), and loads transformer/, text_encoder/, tokenizer/.

A prunable group is a set of input columns of one *output projection* (the Hessian site,
H = XᵀX/n of that layer's input; docs/method.md §3): an attention head h is columns
[h·hd, (h+1)·hd) of `to_out.0` (and rows of to_q/to_k/to_v, and of add_q/k/v_proj for
joint attention, whose `to_add_out` columns go with it); a feed-forward unit j is column j
of `net.2` and row j of the input projection (rows j and j+F for the gated GEGLU/SwiGLU).

Conditions are small dataclasses whose tensor fields all have the batch first. The engine
only concatenates them (classifier-free guidance doubles the batch), selects rows (a staged
model splits a mixed batch by stage), moves them to a device and asks `model_kwargs()` for
the keyword arguments of the denoiser's forward call and `null()` for the unconditional
branch. SD3 and Flux (`sd3.py`, `flux.py`) add the "joint_attn" kind (a head spans the
image and context streams: two output projections, two Hessian parts), "context_mlp" (the
context stream's feed-forward), "dual_attn" (SD3.5's second attention) and Flux's fused
proj_out, whose attention and MLP columns are two layers of one module
(`hessian.LayerPart`, docs/method.md §11). A family whose denoiser takes packed tokens or
a scaled timestep says so with `pack_latents`/`unpack_latents` and `timestep_scale`; the
engine keeps N×C×H×W latents and t = σ·1000 (flow matching) or the DDPM index. A field that is neither a tensor nor a dataclass passes
through all of that unchanged (PixArt's empty-prompt embedding: one value shared by every sample).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

# Kinds of prunable layer: the group they remove and how their cost is counted.
LAYER_KINDS = ("attn", "cross_attn", "mlp", "joint_attn", "context_mlp", "dual_attn")
# Which BlockKeep field holds the kept groups of each kind (a block has "attn" or "joint_attn", not both).
KEEP_FIELDS = {
    "attn": "heads", "cross_attn": "cross_heads", "mlp": "units",
    "joint_attn": "heads", "context_mlp": "context_units", "dual_attn": "dual_heads",
}


# --- conditions -------------------------------------------------------------------------


def _map_tensors(value: Any, function) -> Any:
    """Apply `function` to every tensor in a condition (dataclass, dict, tuple, tensor)."""
    if torch.is_tensor(value):
        return function(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value, **{f.name: _map_tensors(getattr(value, f.name), function) for f in dataclasses.fields(value) if f.init}
        )
    if isinstance(value, dict):
        return {key: _map_tensors(item, function) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(item, function) for item in value)
    return value


def select_rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """Rows `rows` of every tensor in `value` whose first dimension is `batch`; others unchanged."""

    def pick(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.ndim == 0 or tensor.shape[0] != batch:
            return tensor
        return tensor.index_select(0, rows.to(tensor.device))

    return _map_tensors(value, pick)


def concat_conditions(first: Any, second: Any) -> Any:
    """[first; second] along the batch, field by field (both the same condition type)."""
    if type(first) is not type(second):
        raise ValueError(f"cannot concatenate a {type(first).__name__} with a {type(second).__name__}")
    if torch.is_tensor(first):
        return torch.cat([first, second])
    if dataclasses.is_dataclass(first):
        values = {}
        for f in dataclasses.fields(first):
            if not f.init:
                continue
            a, b = getattr(first, f.name), getattr(second, f.name)
            if (a is None) != (b is None):  # an optional tensor (e.g. a negative prompt) set on one side only
                raise ValueError(f"cannot concatenate conditions: '{f.name}' is set in one and not in the other")
            values[f.name] = concat_conditions(a, b) if torch.is_tensor(a) or dataclasses.is_dataclass(a) else a
        return dataclasses.replace(first, **values)
    raise ValueError(f"cannot concatenate conditions of type {type(first).__name__}")


def move_condition(value: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """Every tensor on `device`; floating tensors also in `dtype` (labels stay integers)."""

    def move(tensor: torch.Tensor) -> torch.Tensor:
        if dtype is not None and tensor.is_floating_point():
            return tensor.to(device=device, dtype=dtype)
        return tensor.to(device)

    return _map_tensors(value, move)


@dataclass(frozen=True)
class ClassCondition:
    """Class labels (N,) for a class-conditional denoiser; the null class is CFG's ∅."""

    labels: torch.Tensor
    null_class: int

    @property
    def batch_size(self) -> int:
        """Number of conditioned samples."""
        return int(self.labels.shape[0])

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the denoiser call."""
        return {"class_labels": self.labels}

    def null(self) -> "ClassCondition":
        """The unconditional branch: every label replaced by the null class."""
        return ClassCondition(torch.full_like(self.labels, self.null_class), self.null_class)


def as_condition(value: Any, null_class: int = -1) -> Any:
    """A condition object: tensors of class labels become a `ClassCondition`; others pass."""
    if hasattr(value, "model_kwargs"):
        return value
    if torch.is_tensor(value):
        return ClassCondition(value, null_class)
    raise ValueError(f"expected a condition (class labels or a Condition object), got {type(value).__name__}")


# --- adapters ---------------------------------------------------------------------------


def _attention_is_cross(attention: nn.Module) -> bool:
    return bool(getattr(attention, "is_cross_attention", False))


class FamilyAdapter:
    """The family interface. Subclasses set the class attributes and the config-side methods."""

    name: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    denoiser_folder: ClassVar[str] = "transformer"  # sub-folder of a diffusers pipeline folder
    block_classes: ClassVar[tuple[str, ...]] = ("BasicTransformerBlock",)
    conditioning: ClassVar[str] = "class"  # "class" (labels) or "text" (prompts)
    timestep_scale: ClassVar[float] = 1.0  # the denoiser receives t · timestep_scale (Flux: 1/1000)
    default_sampler: ClassVar[str | None] = None  # None: by the schedule (samplers.default_sampler)
    guidance_distilled: ClassVar[bool] = False  # True: no unconditional branch (Flux), so no CFG and no negative prompt
    # norm_type values of a legacy `Transformer2DModel` config that diffusers builds as this family's class
    legacy_norm_types: ClassVar[tuple[str, ...]] = ()

    # -- the model side ---------------------------------------------------------------
    def block_paths(self, model: nn.Module) -> list[str]:
        """Module paths of the prunable blocks, in `named_modules` order."""
        paths = [name for name, module in model.named_modules() if type(module).__name__ in self.block_classes]
        if not paths:
            raise ValueError(f"{type(model).__name__} has no prunable blocks ({', '.join(self.block_classes)})")
        return paths

    def call_order(self, model: nn.Module) -> list[str]:
        """`block_paths` in the order a forward call runs the blocks (what "the first and last
        blocks" of block-output reuse mean); the same list unless the family's modules are
        registered in another order than they run."""
        return self.block_paths(model)

    def block_layers(self, path: str, block: nn.Module) -> list[tuple]:
        """(kind, output projection path, group size, groups[, parts]) of one block's prunable layers.

        Read from the modules (not the config), so it also works on sliced blocks. The
        optional fifth entry is the layer's `hessian.LayerPart`s (joint or fused projections).
        """
        layers = []
        for attr in ("attn1", "attn2"):
            attention = getattr(block, attr, None)
            if attention is None:
                continue
            kind = "cross_attn" if _attention_is_cross(attention) else "attn"
            head_dim = attention.inner_dim // attention.heads
            layers.append((kind, f"{path}.{attr}.to_out.0", head_dim, attention.heads))
        ff = getattr(block, "ff", None)
        if ff is not None:
            layers.append(("mlp", f"{path}.ff.net.2", 1, ff.net[2].in_features))
        return layers

    def prunable_layers(self, model: nn.Module) -> list:
        """Every prunable layer (`hessian.PrunableLayer`), block by block, attention first."""
        from mosaic_core.prune.hessian import PrunableLayer

        modules = dict(model.named_modules())
        layers = []
        for index, path in enumerate(self.block_paths(model)):
            for kind, name, size, groups, *parts in self.block_layers(path, modules[path]):
                layers.append(PrunableLayer(index, kind, name, size, groups, *parts))
        return layers

    def slice_block(self, block: nn.Module, keep, weights: Mapping[str, torch.Tensor]) -> nn.Module:
        """A new block keeping `keep` (`surgery.BlockKeep`); `weights` by their path in the block."""
        from mosaic_core.prune.surgery import slice_basic_block

        return slice_basic_block(block, keep, weights)

    def model_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """What the denoiser receives for engine timesteps t: t · timestep_scale (t itself when 1)."""
        return timestep if self.timestep_scale == 1.0 else timestep * self.timestep_scale

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The denoiser's input from N×C×H×W latents (identity; a family may pack them into tokens)."""
        return latents

    def unpack_latents(self, output: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The denoiser's output as N×C×H×W like `latents` (identity; inverse of `pack_latents`)."""
        return output

    def condition_for(self, loaded, values: Any, negative_prompt: str | None = None) -> Any:
        """The condition of N samples for this family: class labels (ids) or prompts (text).

        `negative_prompt` replaces CFG's null branch for text families; a class family has no
        text to negate, so a non-empty one is refused.
        """
        from mosaic_core.conquer.sampling import check_labels

        if negative_prompt is not None and str(negative_prompt).strip():
            raise ValueError(
                f"a negative prompt needs a text-to-image model; '{loaded.spec.name}' is class-conditional "
                "(its unconditional branch is the null class): leave the negative prompt empty"
            )
        labels = check_labels(values, loaded.spec.num_classes).to(loaded.device)
        return ClassCondition(labels, loaded.spec.num_classes)

    # -- the config side (pure: no weights) ---------------------------------------------
    def shape_from_config(self, config: Mapping[str, Any], **context: Any):
        """The cost shape (`divide.shapes`) of a denoiser from its diffusers config."""
        raise NotImplementedError

    def spec_fields(self, config: Mapping[str, Any], folder: Path) -> dict[str, Any]:
        """`ModelSpec` fields read from a denoiser config in a local folder."""
        raise NotImplementedError

    # -- loading ------------------------------------------------------------------------
    def load_denoiser(self, folder: Path, dtype: torch.dtype) -> nn.Module:
        """The denoiser from its diffusers folder (config.json + safetensors)."""
        import diffusers

        cls = getattr(diffusers, self.model_classes[0])
        return cls.from_pretrained(folder, torch_dtype=dtype)

    def load_extras(self, root: Path, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """Other components the family needs to condition a sample (text encoders, …)."""
        return {}


_ADAPTERS: dict[str, FamilyAdapter] = {}


def register_adapter(adapter: FamilyAdapter) -> FamilyAdapter:
    """Make `adapter` the one for its `model_classes` (and its name)."""
    for cls in adapter.model_classes:
        _ADAPTERS[cls] = adapter
    return adapter


FAMILY_MODULES = ("dit", "sdxl", "pixart", "sd3", "flux")  # one module per family; each registers its adapter on import


def _ensure_registered() -> None:
    import importlib

    for module in FAMILY_MODULES:
        importlib.import_module(f"mosaic_core.models.adapters.{module}")  # cached after the first call


LEGACY_CLASS = "Transformer2DModel"  # diffusers' old name of single-stream 2D transformers (hub folders keep it)


def denoiser_class_name(config: Mapping[str, Any]) -> Any:
    """The `_class_name` of a denoiser config; a legacy `Transformer2DModel` is read as the class
    diffusers itself builds for its `norm_type` (the adapter whose `legacy_norm_types` holds it)."""
    name = config.get("_class_name")
    if name == LEGACY_CLASS:
        _ensure_registered()
        for adapter in _ADAPTERS.values():
            if config.get("norm_type") in adapter.legacy_norm_types:
                return adapter.model_classes[0]
    return name


def supported_classes() -> list[str]:
    """The diffusers class names some adapter supports."""
    _ensure_registered()
    return sorted(_ADAPTERS)


def adapter_for_class(class_name: str) -> FamilyAdapter:
    """The adapter of a diffusers `_class_name`, or ValueError listing the supported ones."""
    _ensure_registered()
    if class_name not in _ADAPTERS:
        raise ValueError(
            f"unsupported denoiser class '{class_name}': supported are {', '.join(supported_classes())}"
        )
    return _ADAPTERS[class_name]


def adapter_named(name: str) -> FamilyAdapter:
    """The adapter whose `name` is `name` (as stored in a `ModelSpec`)."""
    _ensure_registered()
    for adapter in _ADAPTERS.values():
        if adapter.name == name:
            return adapter
    names = sorted({adapter.name for adapter in _ADAPTERS.values()})
    raise ValueError(f"unknown model family '{name}': choose one of {', '.join(names)}")


def denoiser_adapter(model: nn.Module) -> FamilyAdapter:
    """The adapter of a denoiser, of the networks of a staged denoiser (which has `networks()`),
    or of the denoiser a wrapper holds as its submodule `denoiser` (block reuse, conquer/caching.py)."""
    for _ in range(8):  # unwrap wrappers of wrappers, boundedly
        wrapped = model.__dict__.get("_modules", {}).get("denoiser")
        if wrapped is None:
            break
        model = wrapped
    networks = getattr(model, "networks", None)
    return adapter_for_model(networks()[1] if callable(networks) else model)


def adapter_for_model(model: nn.Module) -> FamilyAdapter:
    """The adapter of a denoiser module (a sliced copy has its dense model's class)."""
    return adapter_for_class(type(model).__name__)
