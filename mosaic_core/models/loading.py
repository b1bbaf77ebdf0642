"""Loading a registry model's weights: the built-in digits-dit, a hub id present locally, or a folder.

The family adapter (`ModelSpec.family`) says which diffusers class the denoiser is, where it
sits in a pipeline folder (`transformer/`, `unet/`) and which other components it needs to
be conditioned (SDXL: two text encoders and their tokenizers, in `LoadedModel.extras`).

Nothing is downloaded: a hub id (`facebook/DiT-XL-2-256`) loads from a local diffusers copy
(see `registry.hub_folder`), and a missing one fails with a message saying where to put it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from mosaic_core.models.registry import ModelSpec, resolve_model, where_to_put

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DEVICE_TYPES = ("cpu", "cuda")


@dataclass
class LoadedModel:
    """A model ready to sample: the transformer (eval mode), an optional VAE, the schedule."""

    spec: ModelSpec
    transformer: torch.nn.Module
    vae: torch.nn.Module | None
    scheduler_config: Mapping[str, Any]
    weights_hash: str
    extras: dict[str, Any] = field(default_factory=dict)  # text encoders, tokenizers (text families)

    @property
    def adapter(self):
        """The family adapter of this model (`mosaic_core.models.adapters`)."""
        from mosaic_core.models.adapters import adapter_named

        return adapter_named(self.spec.family)

    @property
    def pixel_size(self) -> int:
        """Side of the decoded image: sample_size × the VAE's 2^(levels − 1) (pixels: sample_size)."""
        if self.vae is None:
            return self.spec.sample_size
        return self.spec.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on, checked before anything is loaded: cpu, cuda or cuda:N.

    `cuda` without a CUDA build or GPU, an index past the last GPU, and any other device
    type (tpu, mps, xla, ...) are one clear ValueError each; None means CUDA when present.
    """
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in DEVICE_TYPES:
        raise ValueError(f"unsupported device '{device}': choose cpu, cuda or cuda:N (TPU/MPS are not supported)")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device '{device}' asked for, but CUDA is not available here (torch {torch.__version__}): use --device cpu")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device '{device}' does not exist: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A torch dtype from a name (fp32|fp16|bf16 or float32|float16|bfloat16) checked against the device.

    Default: float32 on CPU, float16 on CUDA. float16 on CPU is refused (PyTorch's CPU half
    kernels are many times slower than float32 and some are missing): use fp32, or bf16.
    """
    device = torch.device(device)
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        name = DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
        if name not in DTYPES:
            choices = ", ".join(list(DTYPE_ALIASES) + list(DTYPES))
            raise ValueError(f"unknown dtype '{dtype}': choose one of {choices}")
        resolved = DTYPES[name]
    if resolved not in DTYPES.values():
        raise ValueError(f"unsupported dtype {resolved}: choose fp32, fp16 or bf16")
    if resolved == torch.float16 and device.type == "cpu":
        raise ValueError("dtype fp16 on the CPU is refused (CPU half-precision runs many times slower than fp32): use --dtype fp32 or bf16 on CPU, or fp16 with --device cuda")
    return resolved


def weights_hash(folder: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of the transformer's safetensors files in `folder`."""
    digest = hashlib.sha256()
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def weights_folder(spec: ModelSpec) -> Path | None:
    """The folder holding the denoiser's config.json and safetensors, or None when absent.

    The one rule for every caller (loader, studio, cache keys): the model's folder itself
    (the built-in model, or a bare model folder) or its denoiser sub-folder in diffusers'
    pipeline layout (`transformer/` or `unet/`, as the family adapter says), whichever
    holds a config.json and at least one .safetensors file.
    """
    from mosaic_core.models.adapters import adapter_named

    if not spec.path:
        return None
    root = Path(spec.path)
    for candidate in (root / adapter_named(spec.family).denoiser_folder, root):
        if (candidate / "config.json").is_file() and any(candidate.glob("*.safetensors")):
            return candidate
    return None


def missing_weights_hint(spec: ModelSpec) -> str:
    """'weights not present …: what to do' for a model whose weights are not on disk."""
    if spec.source == "builtin":
        return f"weights not present yet in {spec.path}: run `python -m mosaic_core train`"
    if spec.source == "hub" and not spec.path:
        return f"weights not present: {where_to_put(spec.hub_id or spec.name)}"
    from mosaic_core.models.adapters import adapter_named

    sub = adapter_named(spec.family).denoiser_folder
    return f"weights not present in {spec.path} (expected {sub}/config.json and *.safetensors)"


def _transformer_folder(spec: ModelSpec) -> Path:
    folder = weights_folder(spec)
    if folder is None:
        raise ValueError(f"{spec.name}: {missing_weights_hint(spec)}")
    return folder


def load_model(
    name: str | ModelSpec,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    """Load a model's denoiser (and VAE for latent models, text encoders for text families), in eval mode."""
    from diffusers import AutoencoderKL

    from mosaic_core.models.adapters import adapter_for_class, adapter_named

    device = resolve_device(device)  # device and dtype are checked before the model is even resolved
    dtype = resolve_dtype(dtype, device)
    spec = resolve_model(name) if isinstance(name, str) else name
    folder = _transformer_folder(spec)
    adapter = adapter_named(spec.family)
    config_class = _config_class(folder)
    if config_class is not None and adapter_for_class(config_class) is not adapter:
        raise ValueError(f"{folder} holds a {config_class}, but '{spec.name}' is a {adapter.name} model")
    transformer = adapter.load_denoiser(folder, dtype).to(device).eval()
    transformer.requires_grad_(False)
    vae = None
    if spec.latent:
        vae_folder = Path(spec.path) / "vae"
        if not (vae_folder / "config.json").is_file():
            raise ValueError(f"latent model '{spec.name}' has no vae/ folder in {spec.path}")
        vae = AutoencoderKL.from_pretrained(vae_folder, torch_dtype=dtype).to(device).eval()
        vae.requires_grad_(False)
    return LoadedModel(
        spec=spec,
        transformer=transformer,
        vae=vae,
        scheduler_config=spec.scheduler_config,
        weights_hash=weights_hash(folder),
        extras=adapter.load_extras(Path(spec.path), device, dtype),
    )


def _config_class(folder: Path) -> str | None:
    """The class of the denoiser config in `folder`, if it names one (`adapters.denoiser_class_name`)."""
    import json

    from mosaic_core.models.adapters import denoiser_class_name

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return denoiser_class_name(config) if isinstance(config, dict) else None
