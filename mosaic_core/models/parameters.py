"""Dense parameter counts of a model from its config alone (the meta device: no memory, no weights)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from mosaic_core.divide.cost import linear_parameter_count
from mosaic_core.models.loading import weights_folder
from mosaic_core.models.registry import ModelSpec


@dataclass(frozen=True)
class ParameterSplit:
    """All parameters of the dense network, and how many of them pruning can touch."""

    total: int
    prunable_linear: int
    exact: bool  # False when the count comes from the registry's shape, not a real config

    @property
    def shared(self) -> int:
        """Parameters every stage network shares (embedders, adaLN, final layer)."""
        return self.total - self.prunable_linear


def transformer_config(spec: ModelSpec) -> tuple[dict, bool]:
    """The transformer config of a model and whether it is the real one.

    The real one is the config.json next to the weights, or the built-in recipe; without
    either, a DiT config is built from the registry's shape (exact=False).
    """
    folder = weights_folder(spec)
    if folder is not None:
        return json.loads((Path(folder) / "config.json").read_text()), True
    if spec.config_path:  # a registry entry that ships its public config (sdxl-base)
        return json.loads(Path(spec.config_path).read_text()), True
    if spec.name == "digits-dit":
        from mosaic_core.models.digits import DIGITS_DIT_CONFIG

        return dict(DIGITS_DIT_CONFIG), True
    shape = spec.shape
    patch = max(1, int(round(spec.sample_size / math.sqrt(shape.num_tokens))))
    # The registry's hub entries are DiT-XL/2: learned σ doubles the output channels.
    return {
        "num_attention_heads": shape.num_heads,
        "attention_head_dim": shape.head_dim,
        "in_channels": spec.in_channels,
        "out_channels": 2 * spec.in_channels if spec.latent else spec.in_channels,
        "num_layers": shape.num_layers,
        "sample_size": spec.sample_size,
        "patch_size": patch,
        "num_embeds_ada_norm": spec.num_classes,
    }, False


def parameter_split(spec: ModelSpec) -> ParameterSplit:
    """Dense parameters (all, and prunable-linear) of a model, from its config on the meta device."""
    config, exact = transformer_config(spec)
    total = _meta_parameter_count(json.dumps(config, sort_keys=True))
    return ParameterSplit(total=total, prunable_linear=linear_parameter_count(spec.shape), exact=exact)


@lru_cache(maxsize=16)
def _meta_parameter_count(config_json: str) -> int:
    """Parameters of the config's denoiser class (`_class_name`, DiT when absent) built on the
    meta device (no memory, no weights)."""
    import diffusers
    import torch

    from mosaic_core.models.adapters import adapter_for_class, denoiser_class_name

    config = json.loads(config_json)
    cls = getattr(diffusers, adapter_for_class(denoiser_class_name(config) or "DiTTransformer2DModel").model_classes[0])
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls.from_config(config)  # from_config ignores keys the class no longer takes
    return int(sum(p.numel() for p in model.parameters()))
