"""mosaic_core: the MosaicDiff engine (Divide, Prune, Conquer) for diffusers diffusion models.

Training-free structural pruning of diffusion transformers that follows their pretraining
dynamics (Guo et al., ICCV 2025, arXiv 2510.11962). This package never imports gradio, and
nothing heavy happens at import time: the entry points below are imported on first use.

The entry points a script needs::

    import mosaic_core as mc

    plan = mc.build_plan("digits-dit", num_inference_steps=50, sparsity=0.3)   # Divide
    dense = mc.load_model("digits-dit")
    result = mc.prune_model(dense, plan)                                      # Prune
    mc.save_pruned(result, dense, "out/mosaic-0.3")
    staged = mc.load_pruned("out/mosaic-0.3", dense)                          # a StagedDiT
    rows = mc.compare(dense, mc.dense_and_staged(dense.transformer, staged, plan),
                      labels=list(range(10)), config=mc.SampleConfig(guidance_scale=1.25))  # Conquer

The folders: `divide/` (schedule, score, stages, allocation, cost, the Plan), `prune/`
(calibration, Hessians, OBS, surgery, checkpoints, caches), `conquer/` (the staged
denoiser, sampling, comparison, benchmark, metrics), `models/` (registry, loading, the
built-in model). docs/architecture.md says more; docs/method.md derives the method.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

# name -> module that defines it (imported lazily by __getattr__)
_EXPORTS = {
    "Plan": "mosaic_core.divide.plan",
    "build_plan": "mosaic_core.divide.plan",
    "stage_only_plan": "mosaic_core.divide.plan",
    "build_k_plan": "mosaic_core.divide.k_plan",
    "prune_k_stages": "mosaic_core.prune.multistage_pruning",
    "save_k_stages": "mosaic_core.prune.checkpoint",
    "resolve_model": "mosaic_core.models.registry",
    "load_model": "mosaic_core.models.loading",
    "PruneConfig": "mosaic_core.prune.stage_pruning",
    "prune_steps": "mosaic_core.prune.stage_pruning",
    "CalibrationConfig": "mosaic_core.prune.calibration",
    "save_pruned": "mosaic_core.prune.checkpoint",
    "load_pruned": "mosaic_core.prune.checkpoint",
    "StagedDiT": "mosaic_core.conquer.staged_denoiser",
    "StagedDenoiser": "mosaic_core.conquer.staged_denoiser",
    "load_pipeline": "mosaic_core.conquer.pipeline",
    "SampleConfig": "mosaic_core.conquer.sampling",
    "sample_steps": "mosaic_core.conquer.sampling",
    "compare": "mosaic_core.conquer.compare",
    "compare_steps": "mosaic_core.conquer.compare",
    "dense_and_staged": "mosaic_core.conquer.compare",
    "Cancelled": "mosaic_core.jobs",
    "run_to_end": "mosaic_core.jobs",
}

__all__ = ["__version__", "prune_model", *_EXPORTS]
# (`prune_model`, not `prune`: the name `prune` belongs to the subpackage mosaic_core.prune)


def prune_model(loaded, plan, config=None, **kwargs):
    """Prune `loaded` per `plan` and return the `PruneResult` (`prune_steps` run to its end).

    `config` is a `PruneConfig` (default: SNR-aware calibration from the model's default
    source, OBS); keyword arguments go to `prune_steps` (`should_stop`, `analyses`).
    """
    from mosaic_core.jobs import run_to_end
    from mosaic_core.prune.calibration import CalibrationConfig, default_calibration_source
    from mosaic_core.prune.stage_pruning import PruneConfig, prune_steps

    if config is None:
        config = PruneConfig(calibration=CalibrationConfig(source=default_calibration_source(loaded.spec)))
    return run_to_end(prune_steps(loaded, plan, config, **kwargs))


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mosaic_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
