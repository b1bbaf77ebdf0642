"""Prune: one sub-network per stage, from Hessians gathered at that stage's noise levels.

The work splits in two, so that changing only the sparsity is cheap:

1. `analyse_stage` (expensive, cacheable): calibration batches for the stage's τ range →
   Hessians H = XᵀX/n at the input of every attention output and MLP fc2 layer → one greedy
   pass per layer recording the full removal order (OBS, or magnitude for the ablation).
2. `build_stage_network` (cheap): for the plan's kept counts, take the first groups of
   each layer's order, re-solve the kept weights in closed form (OBS), slice the block.

`prune_steps` runs both for a `Plan` and yields `PruneEvent`s (stage, layer, fraction);
`should_stop` cancels between batches and layers, raising `jobs.Cancelled`.

Which analyses a plan needs: `snr` calibration gives each stage its own τ range; `random`
and `clean` calibration (and `--uniform`) use one analysis for every stage, since their
data does not depend on the stage. A stage whose sparsity is 0 uses the dense network
itself, so 0 % pruning is bit-identical to the dense model.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Callable, Generator, Mapping

import torch

from mosaic_core import limits
from mosaic_core.prune.calibration import CalibrationConfig, CleanSet, calibration_batches, clean_inputs, num_calibration_batches
from mosaic_core.prune.hessian import hessian_steps, prunable_layers
from mosaic_core.jobs import Cancelled, relay
from mosaic_core.prune.obs import PruneTrace, magnitude_prune_order, obs_prune_order, reconstruct_weights
from mosaic_core.divide.cost import group_macs_per_token
from mosaic_core.divide.plan import Plan
from mosaic_core.models.samplers import sampler_alphas_cumprod
from mosaic_core.divide.stages import STAGE_NAMES
from mosaic_core.conquer.staged_denoiser import StagedDiT
from mosaic_core.prune.surgery import BlockKeep, sliced_model

SCORERS = ("obs", "magnitude")
ALLOCATIONS = ("per-stage", "per-block")
DEFAULT_DAMPING = 0.01


@dataclass(frozen=True)
class PruneConfig:
    """How to prune (the plan says how much): calibration, scorer, OBS damping."""

    calibration: CalibrationConfig = CalibrationConfig()
    scorer: str = "obs"
    damping: float = DEFAULT_DAMPING
    allocation: str = "per-stage"  # per-block: spread each stage's budget over blocks by OBS error

    def __post_init__(self) -> None:
        if not isinstance(self.scorer, str) or self.scorer not in SCORERS:
            raise ValueError(f"unknown scorer {limits.shown(self.scorer)}: choose one of {', '.join(SCORERS)}")
        if not isinstance(self.allocation, str) or self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {limits.shown(self.allocation)}: choose one of {', '.join(ALLOCATIONS)}")
        if self.allocation == "per-block" and self.scorer != "obs":
            raise ValueError("per-block allocation needs the OBS scorer (magnitudes are not comparable errors)")
        damping = self.damping
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0.0 < damping <= 1.0:
            raise ValueError(f"damping must be a number in (0, 1], got {limits.shown(damping)}")

    def to_dict(self) -> dict:
        value = {"calibration": self.calibration.to_dict(), "scorer": self.scorer, "damping": float(self.damping)}
        if self.allocation != "per-stage":  # keeps the cache keys of per-stage results unchanged
            value["allocation"] = self.allocation
        return value


@dataclass(frozen=True)
class PruneEvent:
    """Progress: `phase` is calibrate | hessian | solve | build; `fraction` of the whole job."""

    phase: str
    stage: str
    fraction: float
    layer: str | None = None
    message: str = ""


@dataclass
class StageAnalysis:
    """The reusable part of pruning one stage: Hessians and per-layer removal orders."""

    key: str
    t_range: tuple[int, int] | None
    hessians: dict[str, torch.Tensor]
    traces: dict[str, PruneTrace]
    cx: float
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class PruneResult:
    """A pruned staged model with everything needed to save it."""

    plan: Plan
    config: PruneConfig
    staged: StagedDiT
    # per stage: None (the dense network) or (keeps per block, OBS weights by layer name)
    stage_networks: list[tuple[list[BlockKeep], dict[str, torch.Tensor]] | None]
    analyses: dict[str, StageAnalysis]
    cx: float
    seconds: dict[str, float]


def stage_t_ranges(plan: Plan, config: PruneConfig) -> list[tuple[int, int] | None]:
    """The calibration τ range of each stage (None = all T), as this plan and config need."""
    if plan.mode == "uniform" or config.calibration.mode != "snr":
        return [None, None, None]
    return [plan.bounds.ranges[i] for i in range(3)]


def analysis_key(weights_hash: str, t_range, config: PruneConfig) -> str:
    """Content hash of an analysis: base weights, τ range, calibration, scorer, damping."""
    settings = config.to_dict()
    settings.pop("allocation", None)  # how kept counts are spread does not change the Hessians
    payload = json.dumps({"weights": weights_hash, "t_range": t_range, **settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def analyse_stage(
    loaded,
    clean: CleanSet,
    t_range: tuple[int, int] | None,
    config: PruneConfig,
    key: str,
    should_stop: Callable[[], bool] | None = None,
) -> Generator[tuple[str, float, str | None], None, StageAnalysis]:
    """Hessians at the stage's noise levels and the greedy removal order of every layer.

    A generator of (phase, fraction of this analysis, layer) progress tuples that returns
    the `StageAnalysis`. Every attention layer records the order of all heads but one
    (≥ 1 head stays), every MLP fc2 the order of all units but one, so any sparsity of the
    stage is available later without new Hessians.
    """
    model = loaded.transformer
    layers = prunable_layers(model)
    timings = {}
    hessians: dict[str, torch.Tensor] = {}
    solve_from = 0.0
    if config.scorer == "obs":
        # 1. H = XᵀX/n at every pruned layer's input, one calibration batch at a time.
        start = time.perf_counter()
        total = num_calibration_batches(clean, config.calibration)
        batches = calibration_batches(
            clean, sampler_alphas_cumprod(loaded.scheduler_config), t_range, config.calibration, loaded.spec.null_class,
            device=loaded.device, dtype=loaded.dtype,
        )
        steps = hessian_steps(model, batches, layers, should_stop, total)
        hessians = yield from relay(steps, lambda progress: ("hessian", 0.5 * progress[0] / total, None))
        timings["hessian"] = time.perf_counter() - start
        solve_from = 0.5
    # 2. One greedy pass per layer: the removal order (and error) of every group.
    start = time.perf_counter()
    modules = dict(model.named_modules())
    traces: dict[str, PruneTrace] = {}
    for index, layer in enumerate(layers):
        if should_stop is not None and should_stop():
            raise Cancelled("pruning cancelled")
        weight = modules[layer.name].weight.detach()
        if config.scorer == "obs":
            traces[layer.name] = obs_prune_order(
                weight, hessians[layer.name], layer.group_size, layer.num_groups - 1, config.damping
            )
        else:
            traces[layer.name] = magnitude_prune_order(weight, layer.group_size, layer.num_groups - 1)
        yield "solve", solve_from + (1 - solve_from) * (index + 1) / len(layers), layer.name
    timings["solve"] = time.perf_counter() - start
    return StageAnalysis(key, t_range, {k: v.cpu() for k, v in hessians.items()}, traces, clean.cx, timings)


def stage_keeps(model: torch.nn.Module, analysis: StageAnalysis, heads_kept: int, units_kept: int) -> list[BlockKeep]:
    """Per block, the heads and units that survive: all but the first removals of each order."""
    keeps = []
    for layer_attn, layer_mlp in _block_layer_pairs(model):
        heads = analysis.traces[layer_attn.name].kept_groups(layer_attn.num_groups - heads_kept)
        units = analysis.traces[layer_mlp.name].kept_groups(layer_mlp.num_groups - units_kept)
        keeps.append(BlockKeep(heads=heads, units=units))
    return keeps


def stage_keeps_per_block(model: torch.nn.Module, analysis: StageAnalysis, heads_kept: int, units_kept: int) -> list[BlockKeep]:
    """Per-block allocation **(ours)**: the same MACs as `stage_keeps`, spread by OBS error.

    The stage's budget is the block-linear MACs that `heads_kept`/`units_kept` in every block
    would remove. Candidates are each layer's next removal in its greedy order; the one with
    the smallest recorded error ε per MAC saved is taken until the budget is spent (a head
    costs 4·D·hd MACs per token, an MLP unit 2·D), so blocks whose layers reconstruct well
    give up more. Every ε is the layer's output error in the residual stream (tr ΔW H ΔWᵀ),
    which makes them comparable across blocks and between attention and MLP. At least one
    head and one unit stay in every block. METHOD.md §7 measured +2-3 dB from this at 0.5.
    """
    import heapq

    pairs = _block_layer_pairs(model)
    layers = [layer for pair in pairs for layer in pair]
    width = pairs[0][0].num_groups * pairs[0][0].group_size  # D = H·hd (DiT: inner dim = width)
    cost = {layer.name: group_macs_per_token(layer.kind, width, layer.group_size) for layer in layers}
    budget = sum(
        cost[a.name] * (a.num_groups - heads_kept) + cost[m.name] * (m.num_groups - units_kept) for a, m in pairs
    )
    removed = {layer.name: 0 for layer in layers}
    limit = {layer.name: layer.num_groups - 1 for layer in layers}
    heap = []

    def push(layer) -> None:
        k = removed[layer.name]
        if k < limit[layer.name]:
            error = max(analysis.traces[layer.name].errors[k], 0.0)
            heapq.heappush(heap, (error / cost[layer.name], layer.name, layer))

    for layer in layers:
        push(layer)
    while heap and budget > 0:
        _, name, layer = heapq.heappop(heap)
        if cost[name] > budget:
            continue  # a head no longer fits the budget; cheaper units may still

        removed[name] += 1
        budget -= cost[name]
        push(layer)
    return [
        BlockKeep(
            heads=analysis.traces[a.name].kept_groups(removed[a.name]),
            units=analysis.traces[m.name].kept_groups(removed[m.name]),
        )
        for a, m in pairs
    ]


def _block_layer_pairs(model):
    layers = prunable_layers(model)
    by_block: dict[int, dict[str, object]] = {}
    for layer in layers:
        by_block.setdefault(layer.block, {})[layer.kind] = layer
    return [(by_block[b]["attn"], by_block[b]["mlp"]) for b in sorted(by_block)]


def stage_weights(model, analysis: StageAnalysis, keeps: list[BlockKeep], config: PruneConfig) -> dict[str, torch.Tensor]:
    """OBS: the least-squares kept weights of every layer that lost a group; magnitude: none."""
    if config.scorer != "obs":
        return {}
    modules = dict(model.named_modules())
    weights = {}
    for (layer_attn, layer_mlp), keep in zip(_block_layer_pairs(model), keeps):
        for layer, kept in ((layer_attn, keep.heads), (layer_mlp, keep.units)):
            if len(kept) == layer.num_groups:
                continue  # nothing removed: keep the original weights bit for bit
            weight = modules[layer.name].weight
            solved = reconstruct_weights(weight.detach(), analysis.hessians[layer.name].to(weight.device), kept, layer.group_size, config.damping)
            weights[layer.name] = solved.to(weight.dtype)
    return weights


def build_staged(
    dense: torch.nn.Module,
    plan: Plan,
    stage_networks: list[tuple[list[BlockKeep], dict[str, torch.Tensor]] | None],
) -> StagedDiT:
    """Assemble the `StagedDiT`; equal stage networks become one shared module."""
    built: dict[str, torch.nn.Module] = {}
    networks = []
    for spec in stage_networks:
        if spec is None:
            networks.append(dense)
            continue
        keeps, weights = spec
        key = _network_key(keeps, weights)
        if key not in built:
            built[key] = sliced_model(dense, keeps, weights)
        networks.append(built[key])
    t_min, t_max = plan.bounds.middle
    return StagedDiT(networks[0], networks[1], networks[2], t_min, t_max, plan.bounds.num_train_timesteps)


def _network_key(keeps: list[BlockKeep], weights: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(json.dumps([k.to_dict() for k in keeps]).encode())
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def prune_steps(
    loaded,
    plan: Plan,
    config: PruneConfig = PruneConfig(),
    *,
    should_stop: Callable[[], bool] | None = None,
    analyses: dict[str, StageAnalysis] | None = None,
) -> Generator[PruneEvent, None, PruneResult]:
    """Prune `loaded` per `plan`, yielding `PruneEvent`s; returns a `PruneResult`.

    `analyses` is a cache (key -> StageAnalysis) that is read and filled: a second call
    with another sparsity but the same calibration reuses the Hessians and orders.
    """
    if plan.model != loaded.spec.name:
        raise ValueError(f"the plan is for model '{plan.model}', but '{loaded.spec.name}' is loaded")
    analyses = {} if analyses is None else analyses
    timings = {"calibrate": 0.0, "hessian": 0.0, "solve": 0.0, "build": 0.0}
    t_ranges = stage_t_ranges(plan, config)
    # Stages that need a network: steps > 0 and something removed.
    needed = [
        i for i in range(3)
        if plan.step_counts[i] > 0
        and (plan.allocation.heads_kept[i] < plan.shape.num_heads or plan.allocation.units_kept[i] < plan.shape.mlp_hidden)
    ]
    keys = {i: analysis_key(loaded.weights_hash, t_ranges[i], config) for i in needed}
    missing = sorted({keys[i] for i in needed if keys[i] not in analyses}, key=lambda k: min(i for i in needed if keys[i] == k))
    share = 0.95 / max(1, len(missing))  # progress budget per analysis; 5 % for building

    clean = None
    if missing:
        yield PruneEvent("calibrate", "", 0.0, message=f"preparing {config.calibration.size} calibration inputs")
        start = time.perf_counter()
        clean = clean_inputs(loaded, config.calibration, should_stop=should_stop)
        timings["calibrate"] = time.perf_counter() - start
    for n, key in enumerate(missing):
        stage = next(i for i in needed if keys[i] == key)
        name = STAGE_NAMES[stage] if t_ranges[stage] is not None else "all stages"
        analysis = yield from _with_events(
            analyse_stage(loaded, clean, t_ranges[stage], config, key, should_stop), name, n * share, share
        )
        analyses[key] = analysis
        timings["hessian"] += analysis.seconds.get("hessian", 0.0)
        timings["solve"] += analysis.seconds.get("solve", 0.0)

    yield PruneEvent("build", "", 0.95, message="building stage networks")
    start = time.perf_counter()
    stage_networks: list[tuple[list[BlockKeep], dict[str, torch.Tensor]] | None] = [None, None, None]
    for i in needed:
        if should_stop is not None and should_stop():
            raise Cancelled("pruning cancelled")
        analysis = analyses[keys[i]]
        allocate = stage_keeps_per_block if config.allocation == "per-block" else stage_keeps
        keeps = allocate(loaded.transformer, analysis, plan.allocation.heads_kept[i], plan.allocation.units_kept[i])
        stage_networks[i] = (keeps, stage_weights(loaded.transformer, analysis, keeps, config))
    staged = build_staged(loaded.transformer, plan, stage_networks)
    timings["build"] = time.perf_counter() - start
    yield PruneEvent("build", "", 1.0, message="done")
    cx = clean.cx if clean is not None else next((analyses[keys[i]].cx for i in needed), float("nan"))
    return PruneResult(plan, config, staged, stage_networks, {keys[i]: analyses[keys[i]] for i in needed}, cx, timings)


def _with_events(analysis, stage: str, offset: float, share: float):
    """Turn an analysis' (phase, fraction, layer) tuples into job-wide `PruneEvent`s."""
    return relay(analysis, lambda e: PruneEvent(e[0], stage, offset + share * e[1], e[2]))
