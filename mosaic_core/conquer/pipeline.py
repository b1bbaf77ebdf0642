"""A ready diffusers pipeline whose denoiser is the staged pruned model (any family).

    pipeline = load_pipeline("out/sdxl-0.3", "path/to/stable-diffusion-xl-base-1.0")
    image = pipeline("a red fox at sunrise", num_inference_steps=30).images[0]

The base folder is a diffusers pipeline folder (`model_index.json`); its own pipeline class
(StableDiffusionXLPipeline, DiTPipeline, …) is built from the components the engine already
loaded (the VAE, text encoders and tokenizers of `load_model`), with the family's denoiser
slot (`unet`, `transformer`) holding the `StagedDiT` of the checkpoint — or the dense
denoiser when `pruned_dir` is None. The staged model forwards every argument and returns
what the dense one returns, so the pipeline runs unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def load_pipeline(
    pruned_dir: str | Path | None,
    base_dir: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
):
    """The base folder's diffusers pipeline with the checkpoint's staged denoiser in it."""
    import diffusers

    from mosaic_core.models.loading import load_model
    from mosaic_core.prune.checkpoint import load_pruned

    base = Path(base_dir).expanduser()
    index_path = base / "model_index.json"
    if not index_path.is_file():
        raise ValueError(f"'{base}' is not a diffusers pipeline folder: model_index.json is missing")
    index = json.loads(index_path.read_text())
    pipeline_class = getattr(diffusers, str(index.get("_class_name")), None)
    if pipeline_class is None:
        raise ValueError(f"unknown pipeline class {index.get('_class_name')!r} in {index_path}")
    loaded = load_model(str(base), device=device, dtype=dtype)
    slot = loaded.adapter.denoiser_folder
    components = {slot: loaded.transformer, **loaded.extras}
    if loaded.vae is not None:
        components["vae"] = loaded.vae
    components = {name: value for name, value in components.items() if name in index}
    # 1. The pipeline on the components already loaded (diffusers type-checks what is passed,
    #    so the dense denoiser goes in first) ...
    pipeline = pipeline_class.from_pretrained(base, **components, dtype=loaded.dtype).to(loaded.device)
    # 2. ... then its denoiser slot takes the staged model (registered like any component).
    if pruned_dir is not None:
        setattr(pipeline, slot, load_pruned(pruned_dir, loaded))
    return pipeline
