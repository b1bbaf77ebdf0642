"""One interface per model family: what the engine needs to know about a denoiser.

The engine (Hessians, surgery, staged sampling, calibration, cost) never names a model
family; it asks the family's `FamilyAdapter`, found by the denoiser's diffusers class
name (`adapter_for_model`, `adapter_for_class`). An adapter says:

| question                         | method                          | DiT                      | SDXL (UNet)                         | PixArt-α/Σ                    |
|----------------------------------|---------------------------------|--------------------------|-------------------------------------|-------------------------------|
| which blocks are prunable        | `block_paths`                   | transformer_blocks.i     | */attentions.j/transformer_blocks.k | transformer_blocks.i          |
| their prunable groups            | `prunable_layers`               | self-attn heads, FF units| + cross-attn heads (GEGLU FF)        | + cross-attn heads (GELU FF)  |
| the Hessian site of each group   | `PrunableLayer.name`            | input of to_out.0/net.2  | same, per attention and FF          | same                          |
| slicing                          | `mosaic_core.prune.surgery`     | generic diffusers Attention + FeedForward            |                                     |                               |
| per-block cost, before any weight| `shape_from_config`             | homogeneous shape        | one `LayerShape` per prunable layer | same (M = 120 or 300 T5 tokens)|
| the conditioned call, CFG's null | `Condition.model_kwargs/null`   | class labels, ∅ = classes| prompt embeds, pooled, time_ids; ∅ = zeros | T5 embeds + mask; ∅ = T5("") |
| loading a local diffusers folder | `load_denoiser`, `load_extras`  | transformer/             | unet/, text_encoder(_2), tokenizer(_2) | transformer/, text_encoder, tokenizer |

A prunable group is a set of input columns of one *output projection* (the Hessian site,
H = XᵀX/n of that layer's input; docs/method.md §3): an attention head h is columns
[h·hd, (h+1)·hd) of `to_out.0` (and rows of to_q/to_k/to_v, and of add_q/k/v_proj for
joint attention, whose `to_add_out` columns go with it); a feed-forward unit j is column j
of `net.2` and row j of the input projection (rows j and j+F for the gated GEGLU/SwiGLU).

Conditions are small dataclasses whose tensor fields all have the batch first. The engine
only concatenates them (classifier-free guidance doubles the batch), selects rows (a staged
model splits a mixed batch by stage), moves them to a device and asks `model_kwargs()` for
the keyword arguments of the denoiser's forward call and `null()` for the unconditional
branch. A field that is neither a tensor nor a dataclass passes through all of that unchanged
(PixArt's empty-prompt embedding: one value shared by every sample). Future families (SD3,
Flux) add a Condition with their own fields, and a "joint_attn" layer kind whose context
projections are sliced with the image ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

# Kinds of prunable layer: the group they remove and how their cost is counted.
LAYER_KINDS = ("attn", "cross_attn", "mlp")
# Which BlockKeep field holds the kept groups of each kind.
KEEP_FIELDS = {"attn": "heads", "cross_attn": "cross_heads", "mlp": "units"}


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
    # norm_type values of a legacy `Transformer2DModel` config that diffusers builds as this family's class
    legacy_norm_types: ClassVar[tuple[str, ...]] = ()

    # -- the model side ---------------------------------------------------------------
    def block_paths(self, model: nn.Module) -> list[str]:
        """Module paths of the prunable blocks, in `named_modules` order."""
        paths = [name for name, module in model.named_modules() if type(module).__name__ in self.block_classes]
        if not paths:
            raise ValueError(f"{type(model).__name__} has no prunable blocks ({', '.join(self.block_classes)})")
        return paths

    def block_layers(self, path: str, block: nn.Module) -> list[tuple[str, str, int, int]]:
        """(kind, output projection path, group size, groups) of one block's prunable layers.

        Read from the modules (not the config), so it also works on sliced blocks.
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
            for kind, name, size, groups in self.block_layers(path, modules[path]):
                layers.append(PrunableLayer(index, kind, name, size, groups))
        return layers

    def condition_for(self, loaded, values: Any) -> Any:
        """The condition of N samples for this family: class labels (ids) or prompts (text)."""
        from mosaic_core.conquer.sampling import check_labels

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


FAMILY_MODULES = ("dit", "sdxl", "pixart")  # one module per family; each registers its adapter on import


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


def adapter_for_model(model: nn.Module) -> FamilyAdapter:
    """The adapter of a denoiser module (a sliced copy has its dense model's class)."""
    return adapter_for_class(type(model).__name__)
