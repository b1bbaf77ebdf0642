"""Prune K ≥ 2 stage networks: the three-stage `prune_steps` for a `StagePartition` (docs/method.md §12.5).

Each stage that has steps and loses something gets its own analysis at its own noise
levels (`snr` calibration; `random`/`clean` share one analysis, as in `prune_steps`),
the kept heads and units of the `StageAllocation`, and its OBS-solved weights. Stages
with the same kept structure and weights share one network; a stage with nothing removed
(or no steps) runs the dense model itself. `checkpoint.save_k_stages` writes the result
(format v3; docs/method.md §12.6).
"""

from __future__ import annotations

import time
from typing import Callable, Generator

from mosaic_core.conquer.multistage_denoiser import MultiStageDenoiser
from mosaic_core.divide.multistage import StageAllocation, StagePartition
from mosaic_core.jobs import Cancelled
from mosaic_core.prune.calibration import clean_inputs
from mosaic_core.prune.hessian import prunable_layers
from mosaic_core.prune.stage_pruning import (
    PruneConfig,
    PruneEvent,
    StageAnalysis,
    _network_key,
    _with_events,
    allocation_inputs,
    analyse_stage,
    analysis_key,
    stage_keeps,
    stage_weights,
    uniform_layer_costs,
)
from mosaic_core.prune.surgery import sliced_model


def prune_k_stages(
    loaded,
    partition: StagePartition,
    allocation: StageAllocation,
    config: PruneConfig = PruneConfig(),
    *,
    should_stop: Callable[[], bool] | None = None,
    analyses: dict[str, StageAnalysis] | None = None,
    record: list | None = None,
    measured: list | None = None,
) -> Generator[PruneEvent, None, MultiStageDenoiser]:
    """Prune one network per stage of `partition` to `allocation`'s kept counts; yields `PruneEvent`s.

    `analyses` (key → StageAnalysis) is read and filled, as in `prune_steps`. `record`, when
    given, receives per stage None (the dense model) or (keeps per block, OBS weights by
    layer name): what a checkpoint stores (`checkpoint.save_k_stages`, paper counts only).
    `config.allocation` "measured" spreads the MACs the paper's counts remove over stages ×
    layers by recorded error, as for three stages (docs/method.md §3.11, §12.4); `measured`,
    when given, receives its `MeasuredStages`.
    """
    if len(allocation.step_counts) != partition.num_stages:
        raise ValueError(f"the allocation has {len(allocation.step_counts)} stages, the partition {partition.num_stages}")
    if config.refit:
        raise ValueError("refit is done for three-stage prunes; prune K stages without it (refit=False, `prune --no-refit`)")
    if config.allocation not in ("per-stage", "measured"):
        raise ValueError(f"K-stage pruning allocates per-stage (the paper's counts) or measured, got {config.allocation!r}")
    if config.allocation == "measured" and record is not None:
        raise ValueError("a K-stage checkpoint stores the paper's counts per stage: prune with allocation per-stage to record one")
    analyses = {} if analyses is None else analyses
    shape = loaded.spec.shape
    stage_aware = config.calibration.mode == "snr"
    needed = paper_needed = [
        i for i in range(partition.num_stages)
        if allocation.step_counts[i] > 0 and (allocation.heads_kept[i] < shape.num_heads or allocation.units_kept[i] < shape.mlp_hidden)
    ]
    if config.allocation == "measured" and needed:  # every stage with steps may take a share
        needed = [i for i in range(partition.num_stages) if allocation.step_counts[i] > 0]
    t_ranges = {i: partition.ranges[i] if stage_aware else None for i in needed}
    keys = {i: analysis_key(loaded.weights_hash, t_ranges[i], config) for i in needed}
    missing = list(dict.fromkeys(keys[i] for i in needed if keys[i] not in analyses))
    share = 0.95 / max(1, len(missing))
    clean = None
    if missing:
        yield PruneEvent("calibrate", "", 0.0, message=f"preparing {config.calibration.size} calibration inputs")
        clean = clean_inputs(loaded, config.calibration, should_stop=should_stop)
    for n, key in enumerate(missing):
        stage = next(i for i in needed if keys[i] == key)
        name = f"stage {stage}" if stage_aware else "all stages"
        analyses[key] = yield from _with_events(
            analyse_stage(loaded, clean, t_ranges[stage], config, key, should_stop), name, n * share, share
        )
    yield PruneEvent("build", "", 0.95, message="building stage networks")
    start = time.perf_counter()
    dense = loaded.transformer
    counts = None
    if config.allocation == "measured" and needed:
        from mosaic_core.prune.measured_allocation import allocate_stages

        layers = prunable_layers(dense)
        stage_layers, errors, paper = allocation_inputs(
            layers, uniform_layer_costs(dense), {i: analyses[keys[i]] for i in needed}, allocation.heads_kept, allocation.units_kept,
            paper_needed,
        )
        chosen = allocate_stages(stage_layers, errors, allocation.step_counts, paper)
        if measured is not None:
            measured.append(chosen)
        counts = {i: {layer.name: layer.num_groups - chosen.removals[i][layer.name] for layer in layers} for i in needed}
        needed = [i for i in needed if any(chosen.removals[i].values())]  # the rest run the dense model
    built: dict[str, object] = {}
    networks = []
    for i in range(partition.num_stages):
        if i not in needed:
            networks.append(dense)
            if record is not None:
                record.append(None)
            continue
        if should_stop is not None and should_stop():
            raise Cancelled("pruning cancelled")
        analysis = analyses[keys[i]]
        if counts is not None:
            keeps = stage_keeps(dense, analysis, 0, 0, counts[i])
        else:
            keeps = stage_keeps(dense, analysis, allocation.heads_kept[i], allocation.units_kept[i])
        weights = stage_weights(dense, analysis, keeps, config)
        network_key = _network_key(keeps, weights)
        if network_key not in built:
            built[network_key] = sliced_model(dense, keeps, weights)
        networks.append(built[network_key])
        if record is not None:
            record.append((keeps, weights))
    yield PruneEvent("build", "", 1.0, message=f"done in {time.perf_counter() - start:.1f} s")
    return MultiStageDenoiser(networks, partition)

