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

Several processes (`processes`, see `mosaic_core.distributed`): calibration batch pair k
(the batch and its null-label copy) is run by process k mod N; ΣXᵀX and n are summed over
the processes, then the greedy OBS pass and the build run once, on the main process. The
other processes return None from `prune_steps` once their Hessian shares are summed.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Generator, Mapping

import torch

from mosaic_core import limits
from mosaic_core.prune.calibration import CalibrationConfig, CleanSet, calibration_batches, clean_inputs, num_calibration_batches
from mosaic_core.prune.hessian import hessian_steps, layer_weight, prunable_layers, split_solved_weight
from mosaic_core.divide.shapes import MLP_KINDS
from mosaic_core.distributed import Processes
from mosaic_core.jobs import Cancelled, relay
from mosaic_core.prune.obs import PruneTrace, magnitude_prune_order, obs_prune_order, prepare_layer, reconstruct_weights
from mosaic_core.prune.spill import SpilledHessians
from mosaic_core.divide.cost import group_macs_per_token
from mosaic_core.divide.plan import Plan
from mosaic_core.divide.flow_schedule import is_flow_matching
from mosaic_core.models.samplers import sampler_alphas_cumprod, sampler_noising
from mosaic_core.divide.stages import STAGE_NAMES
from mosaic_core.conquer.staged_denoiser import StagedDiT
from mosaic_core.prune.surgery import BlockKeep, sliced_model
from mosaic_core.models.adapters.base import KEEP_FIELDS

SCORERS = ("obs", "magnitude")
ALLOCATIONS = ("per-stage", "per-block", "measured")
ALLOCATION_ALIASES = {"paper": "per-stage"}  # the CLI's and studio's word for the paper's per-stage rule
DEFAULT_DAMPING = 0.01


# Kept MLP units on a GPU, when none is asked: on an H200, fp16/bf16 GEMMs of DiT-XL/2's MLP
# ran 3-8x slower per MAC at widths that are not multiples of 64 (4230 units: 2.68 ms against
# 0.85 ms at 4224), so odd widths made pruned networks slower than dense (docs/method.md §3.11).
GPU_UNIT_MULTIPLE = 64


def default_unit_multiple(device, allocation: str, mlp_hidden: int | None) -> int:
    """The unit multiple when none is asked: `GPU_UNIT_MULTIPLE` for the measured allocation on
    a CUDA device, where the model's MLP width is a multiple of it with room to round (at
    least 8 such steps); else 1 (any count: on a CPU odd widths cost little, §9)."""
    on_gpu = torch.device(device).type == "cuda"
    fits = mlp_hidden is not None and mlp_hidden % GPU_UNIT_MULTIPLE == 0 and mlp_hidden >= 8 * GPU_UNIT_MULTIPLE
    return GPU_UNIT_MULTIPLE if on_gpu and allocation == "measured" and fits else 1


@dataclass(frozen=True)
class PruneConfig:
    """How to prune (the plan says how much): calibration, scorer, OBS damping."""

    calibration: CalibrationConfig = CalibrationConfig()
    scorer: str = "obs"
    damping: float = DEFAULT_DAMPING
    # per-block: spread each stage's budget over blocks by OBS error; measured: spread the whole
    # plan's budget over stages × layers by recorded OBS error (measured_allocation.allocate_stages)
    allocation: str = "per-stage"
    hessian_budget: int | None = None  # bytes of float64 Hessians held at once; None: every layer at once
    # measured allocation: keep MLP units in multiples of this (GEMM-friendly widths; 1 = any count)
    unit_multiple: int = 1
    # refit each stage network's pruned layers on its own inputs after OBS (prune/refit.py; `prune`'s default)
    refit: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.scorer, str) or self.scorer not in SCORERS:
            raise ValueError(f"unknown scorer {limits.shown(self.scorer)}: choose one of {', '.join(SCORERS)}")
        if not isinstance(self.allocation, str) or self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {limits.shown(self.allocation)}: choose one of {', '.join(ALLOCATIONS)}")
        if self.allocation in ("per-block", "measured") and self.scorer != "obs":
            raise ValueError(f"{self.allocation} allocation needs the OBS scorer (magnitudes are not comparable errors)")
        damping = self.damping
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0.0 < damping <= 1.0:
            raise ValueError(f"damping must be a number in (0, 1], got {limits.shown(damping)}")
        if isinstance(self.unit_multiple, bool) or not isinstance(self.unit_multiple, int) or not 1 <= self.unit_multiple <= 256:
            raise ValueError(f"unit multiple must be a whole number in [1, 256], got {limits.shown(self.unit_multiple)}")
        if self.unit_multiple > 1 and self.allocation != "measured":
            raise ValueError(f"a unit multiple rounds the measured allocation's kept MLP units; allocation is {self.allocation}")
        if not isinstance(self.refit, bool):
            raise ValueError(f"refit must be true or false, got {limits.shown(self.refit)}")
        if self.refit and self.scorer != "obs":
            raise ValueError("refit solves the kept weights again; it needs the obs scorer (magnitude keeps the dense weights)")
        if self.hessian_budget is not None and (isinstance(self.hessian_budget, bool) or int(self.hessian_budget) < 1):
            raise ValueError(f"hessian budget must be a positive number of bytes (or None), got {self.hessian_budget!r}")

    def to_dict(self) -> dict:
        value = {"calibration": self.calibration.to_dict(), "scorer": self.scorer, "damping": float(self.damping)}
        if self.allocation != "per-stage":  # keeps the cache keys of per-stage results unchanged
            value["allocation"] = self.allocation
        if self.hessian_budget is not None:
            value["hessian_budget"] = int(self.hessian_budget)
        if self.unit_multiple != 1:
            value["unit_multiple"] = int(self.unit_multiple)
        if self.refit:
            value["refit"] = True
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
    hessians: Mapping[str, torch.Tensor]  # a dict, or `SpilledHessians` on disk under a memory budget
    traces: dict[str, PruneTrace]
    cx: float
    seconds: dict[str, float] = field(default_factory=dict)
    hessian_peak_bytes: int = 0  # float64 Hessian bytes held at once while gathering (0: not measured)


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
    hessian_peak_bytes: int = 0  # the most float64 Hessian bytes any analysis of this run held at once
    # processes that shared the calibration and the clean images each one ran through the model
    processes: int = 1
    calibration_images: list[int] = field(default_factory=list)
    # measured allocation: its per-stage sparsities and recorded errors beside the paper's (else None)
    measured: object | None = None  # measured_allocation.MeasuredStages


def _noising(scheduler_config):
    """ᾱ for a DDPM-family schedule (calibration as before, bit for bit); (1 − σ, σ) for flow matching (method §8.1)."""
    if is_flow_matching(scheduler_config):
        return sampler_noising(scheduler_config)
    return sampler_alphas_cumprod(scheduler_config)


def stage_t_ranges(plan: Plan, config: PruneConfig) -> list[tuple[int, int] | None]:
    """The calibration τ range of each stage (None = all T), as this plan and config need."""
    if plan.mode == "uniform" or config.calibration.mode != "snr":
        return [None, None, None]
    return [plan.bounds.ranges[i] for i in range(3)]


def analysis_key(weights_hash: str, t_range, config: PruneConfig) -> str:
    """Content hash of an analysis: base weights, τ range, calibration, scorer, damping."""
    settings = config.to_dict()
    settings.pop("allocation", None)  # how kept counts are spread does not change the Hessians
    settings.pop("hessian_budget", None)  # nor does gathering them a few blocks at a time
    settings.pop("unit_multiple", None)  # nor does rounding the kept widths
    settings.pop("refit", None)  # nor does refitting the built networks
    payload = json.dumps({"weights": weights_hash, "t_range": t_range, **settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def analyse_stage(
    loaded,
    clean: CleanSet,
    t_range: tuple[int, int] | None,
    config: PruneConfig,
    key: str,
    should_stop: Callable[[], bool] | None = None,
    processes: Processes = Processes(),
) -> Generator[tuple[str, float, str | None], None, StageAnalysis | None]:
    """Hessians at the stage's noise levels and the greedy removal order of every layer.

    A generator of (phase, fraction of this analysis, layer) progress tuples that returns
    the `StageAnalysis`. Every attention layer records the order of all heads but one
    (≥ 1 head stays), every MLP fc2 the order of all units but one, so any sparsity of the
    stage is available later without new Hessians.

    With several `processes`, each runs its own calibration batches, the Hessians are
    summed over all of them, and only the main process solves (the others return None).
    """
    model = loaded.transformer
    layers = prunable_layers(model)
    modules = dict(model.named_modules())
    traces: dict[str, PruneTrace] = {}
    if config.scorer != "obs":
        timings = {}
        start = time.perf_counter()
        for index, layer in enumerate(layers):
            if should_stop is not None and should_stop():
                raise Cancelled("pruning cancelled")
            traces[layer.name] = magnitude_prune_order(layer_weight(modules, layer), layer.group_size, layer.num_groups - 1)
            yield "solve", (index + 1) / len(layers), layer.name
        timings["solve"] = time.perf_counter() - start
        return StageAnalysis(key, t_range, {}, traces, clean.cx, timings)
    # Layers are gathered in chunks of whole blocks whose float64 Hessians fit the memory
    # budget (one chunk, every layer at once, without a budget); each chunk re-runs the same
    # seeded calibration batches, so its Hessians are those of a single pass.
    chunks = hessian_chunks(layers, config.hessian_budget)
    timings = {"hessian": 0.0, "solve": 0.0}
    # With a budget the finished chunks go to disk (prune/spill.py): the analysis then never
    # holds more than one chunk's Hessians, also after the gathering.
    hessians: dict[str, torch.Tensor] | SpilledHessians = {} if config.hessian_budget is None else SpilledHessians()
    peak = 0
    for number, chunk in enumerate(chunks):
        offset, share = number / len(chunks), 1 / len(chunks)
        # 1. H = XᵀX/n at the input of every layer of the chunk, one calibration batch at a time.
        start = time.perf_counter()
        batches = calibration_batches(
            clean, _noising(loaded.scheduler_config), t_range, config.calibration, loaded.spec.null_class,
            device=loaded.device, dtype=loaded.dtype,
        )
        total = num_calibration_batches(clean, config.calibration)
        if processes.distributed:  # batch 2k and its null copy 2k+1 belong to process k mod N
            total = 2 * len(processes.shard(total // 2))
            batches = (batch for index, batch in enumerate(batches) if processes.owns(index // 2))
        reduce = processes.all_reduce_sum if processes.distributed else None
        steps = hessian_steps(model, batches, chunk, should_stop, total, reduce=reduce)
        chunk_hessians = yield from relay(
            steps, lambda progress: ("hessian", offset + share * 0.5 * progress[0] / max(total, 1), None)
        )
        peak = max(peak, sum(h.numel() * h.element_size() for h in chunk_hessians.values()))
        timings["hessian"] += time.perf_counter() - start
        if not processes.is_main:
            continue  # the others only contribute their Hessian shares; the main process solves
        # 2. One greedy pass per layer: the removal order (and error) of every group.
        start = time.perf_counter()
        for index, layer in enumerate(chunk):
            if should_stop is not None and should_stop():
                raise Cancelled("pruning cancelled")
            weight = layer_weight(modules, layer)
            traces[layer.name] = obs_prune_order(
                weight, chunk_hessians[layer.name], layer.group_size, layer.num_groups - 1, config.damping
            )
            yield "solve", offset + share * (0.5 + 0.5 * (index + 1) / len(chunk)), layer.name
        if isinstance(hessians, SpilledHessians):
            hessians.add_chunk(chunk_hessians)
        else:
            hessians.update({name: h.cpu() for name, h in chunk_hessians.items()})
        del chunk_hessians
        timings["solve"] += time.perf_counter() - start
    if not processes.is_main:
        return None
    return StageAnalysis(key, t_range, hessians, traces, clean.cx, timings, hessian_peak_bytes=peak)


def hessian_chunks(layers, budget_bytes: int | None) -> list[list]:
    """Consecutive whole blocks of `layers` whose float64 Hessians (Σ 8·in²) fit `budget_bytes`.

    None: one chunk with every layer. A block larger than the budget on its own is a chunk
    by itself (its layers must be solved together with the Hessians they need).
    """
    if budget_bytes is None:
        return [list(layers)]
    blocks: dict[int, list] = {}
    for layer in layers:
        blocks.setdefault(layer.block, []).append(layer)
    chunks, current, used = [], [], 0
    for block in blocks.values():
        size = sum(8 * layer.in_features**2 for layer in block)
        if current and used + size > budget_bytes:
            chunks.append(current)
            current, used = [], 0
        current.extend(block)
        used += size
    if current:
        chunks.append(current)
    return chunks


def _kept_count(layer, heads_kept: int, units_kept: int, layer_keeps: Mapping[str, int] | None) -> int:
    """Groups `layer` keeps: its own count (blockwise plans) or the plan's heads/units per block."""
    if layer_keeps is not None:
        return int(layer_keeps[layer.name])
    return units_kept if layer.kind in MLP_KINDS else heads_kept


def _block_keep(block_layers: Mapping[str, object], kept: Mapping[str, tuple[int, ...]]) -> BlockKeep:
    """A `BlockKeep` from the kept groups of one block's layers (each kind fills its KEEP_FIELDS field)."""
    return BlockKeep(**{KEEP_FIELDS[kind]: kept[layer.name] for kind, layer in block_layers.items()})


def stage_keeps(
    model: torch.nn.Module,
    analysis: StageAnalysis,
    heads_kept: int,
    units_kept: int,
    layer_keeps: Mapping[str, int] | None = None,
) -> list[BlockKeep]:
    """Per block, the groups that survive: all but the first removals of each layer's order.

    Every attention layer keeps `heads_kept` heads and every feed-forward `units_kept`
    units, or, for a blockwise plan, each layer its own count from `layer_keeps`.
    """
    keeps = []
    for block_layers in _block_layers(model):
        kept = {
            layer.name: analysis.traces[layer.name].kept_groups(
                layer.num_groups - _kept_count(layer, heads_kept, units_kept, layer_keeps)
            )
            for layer in block_layers.values()
        }
        keeps.append(_block_keep(block_layers, kept))
    return keeps


def stage_keeps_per_block(
    model: torch.nn.Module,
    analysis: StageAnalysis,
    heads_kept: int,
    units_kept: int,
    layer_keeps: Mapping[str, int] | None = None,
    layer_costs: Mapping[str, int] | None = None,
) -> list[BlockKeep]:
    """Per-block allocation **(ours)**: the same MACs as `stage_keeps`, spread by OBS error.

    The stage's budget is the block-linear MACs that `heads_kept`/`units_kept` in every block
    (or `layer_keeps` per layer) would remove. Candidates are each layer's next removal in
    its greedy order; the one with the smallest recorded error ε per MAC saved is taken
    until the budget is spent (in a homogeneous network a head costs 4·D·hd MACs per token,
    an MLP unit 2·D; `layer_costs` gives each layer's MACs per group otherwise), so blocks
    whose layers reconstruct well give up more. Every ε is the layer's output error in the
    residual stream (tr ΔW H ΔWᵀ), which makes them comparable across blocks and between
    attention and MLP. At least one group stays in every layer. On digits-dit this adds
    4.0 dB PSNR at S = 0.3 and 1.2 dB at 0.5 (docs/method.md §7.4).
    """
    import heapq

    blocks = _block_layers(model)
    layers = [layer for block in blocks for layer in block.values()]
    if layer_costs is None:
        width = blocks[0]["attn"].num_groups * blocks[0]["attn"].group_size  # D = H·hd (inner dim = width)
        cost = {layer.name: group_macs_per_token(layer.kind, width, layer.group_size) for layer in layers}
    else:
        cost = {layer.name: int(layer_costs[layer.name]) for layer in layers}
    budget = sum(cost[layer.name] * (layer.num_groups - _kept_count(layer, heads_kept, units_kept, layer_keeps)) for layer in layers)
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
        _block_keep(block, {layer.name: analysis.traces[layer.name].kept_groups(removed[layer.name]) for layer in block.values()})
        for block in blocks
    ]


def _block_layers(model) -> list[dict[str, object]]:
    """Per block, its prunable layers by kind ("attn", "cross_attn", "mlp")."""
    by_block: dict[int, dict[str, object]] = {}
    for layer in prunable_layers(model):
        by_block.setdefault(layer.block, {})[layer.kind] = layer
    return [by_block[b] for b in sorted(by_block)]


class _PreparedCache:
    """A byte-bounded LRU of `obs.prepare_layer` results, shared by every stage build of this process.

    Keyed by (analysis key, layer, damping, device): the analysis key hashes the base weights,
    τ range and calibration, so an entry is valid for any build from that analysis. Re-solving
    a stage at another sparsity (the tuner's candidates, the studio's slider) then costs one
    Cholesky per layer instead of also re-damping H and re-multiplying W·H. Entries larger than
    an eighth of the bound are computed and not kept (big models would only churn it).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._entries: "OrderedDict[tuple, object]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple, compute: Callable[[], object]):
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        value = compute()
        size = value.nbytes
        if size * 8 > self.max_bytes:
            return value
        with self._lock:
            if key not in self._entries:
                self._entries[key] = value
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, old = self._entries.popitem(last=False)
                    self._bytes -= old.nbytes
            return self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


_PREPARED = _PreparedCache(int(os.environ.get("MOSAIC_PREPARED_CACHE_BYTES", 256 * 2**20)))


def stage_weights(model, analysis: StageAnalysis, keeps: list[BlockKeep], config: PruneConfig) -> dict[str, torch.Tensor]:
    """OBS: the least-squares kept weights of every layer that lost a group; magnitude: none."""
    if config.scorer != "obs":
        return {}
    modules = dict(model.named_modules())
    weights = {}
    for block_layers, keep in zip(_block_layers(model), keeps):
        for kind, layer in block_layers.items():
            kept = getattr(keep, KEEP_FIELDS[kind])
            if kept is None or len(kept) == layer.num_groups:
                continue  # nothing removed: keep the original weights bit for bit
            weight = layer_weight(modules, layer)
            prepared = _PREPARED.get((analysis.key, layer.name, float(config.damping), str(weight.device)),
                                     lambda: prepare_layer(weight, analysis.hessians[layer.name], config.damping))
            solved = reconstruct_weights(weight, None, kept, layer.group_size, config.damping, prepared=prepared)
            weights.update(split_solved_weight(modules, layer, solved.to(weight.dtype), len(kept)))
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
    from mosaic_core.models.adapters import adapter_for_model

    t_min, t_max = plan.bounds.middle
    scale = adapter_for_model(dense).timestep_scale
    return StagedDiT(networks[0], networks[1], networks[2], t_min, t_max, plan.bounds.num_train_timesteps, scale)


def _network_key(keeps: list[BlockKeep], weights: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(json.dumps([k.to_dict() for k in keeps]).encode())
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def needed_stages(plan: Plan, config: PruneConfig) -> tuple[list[int], list[int]]:
    """(the stages that need an analysis, the stages the paper's counts prune) for `plan`.

    A stage needs a network when it has steps and its plan removes something; the measured
    rule of an auto plan may give a share to every stage with steps.
    """
    paper = [
        i for i in range(3)
        if plan.step_counts[i] > 0
        and (plan.allocation.heads_kept[i] < plan.shape.num_heads or plan.allocation.units_kept[i] < plan.shape.mlp_hidden)
    ]
    if config.allocation == "measured" and paper and plan.mode == "auto":
        return [i for i in range(3) if plan.step_counts[i] > 0], paper
    return paper, paper


def recorded_allocation(loaded, plan: Plan, config: PruneConfig, analyses: Mapping[str, StageAnalysis]):
    """`measured_stages` of `plan` from cached analyses alone (no Hessian, no weights): its `.error`
    is the measured rule's recorded error, `.paper_error` the paper counts', `.sparsity` the stage
    shares. None when an analysis `prune_steps` would use is not cached yet; milliseconds.
    """
    needed, paper = needed_stages(plan, config)
    t_ranges = stage_t_ranges(plan, config)
    keys = {i: analysis_key(loaded.weights_hash, t_ranges[i], config) for i in needed}
    if not needed or any(key not in analyses for key in keys.values()):
        return None
    return measured_stages(loaded.transformer, plan, {i: analyses[keys[i]] for i in needed}, paper, unit_multiple=config.unit_multiple)


def prune_steps(
    loaded,
    plan: Plan,
    config: PruneConfig = PruneConfig(),
    *,
    should_stop: Callable[[], bool] | None = None,
    analyses: dict[str, StageAnalysis] | None = None,
    processes: Processes = Processes(),
) -> Generator[PruneEvent, None, PruneResult | None]:
    """Prune `loaded` per `plan`, yielding `PruneEvent`s; returns a `PruneResult`.

    `analyses` is a cache (key -> StageAnalysis) that is read and filled: a second call
    with another sparsity but the same calibration reuses the Hessians and orders.
    With several `processes` the calibration is shared (module docstring); every process
    must call this, and all but the main one return None.
    """
    if plan.model != loaded.spec.name:
        raise ValueError(f"the plan is for model '{plan.model}', but '{loaded.spec.name}' is loaded")
    analyses = {} if analyses is None else analyses
    timings = {"calibrate": 0.0, "hessian": 0.0, "solve": 0.0, "build": 0.0}
    t_ranges = stage_t_ranges(plan, config)
    needed, paper_needed = needed_stages(plan, config)
    keys = {i: analysis_key(loaded.weights_hash, t_ranges[i], config) for i in needed}
    missing = sorted({keys[i] for i in needed if keys[i] not in analyses}, key=lambda k: min(i for i in needed if keys[i] == k))
    share = 0.95 / max(1, len(missing))  # progress budget per analysis; 5 % for building

    clean = None
    if missing:
        yield PruneEvent("calibrate", "", 0.0, message=f"preparing {config.calibration.size} calibration inputs")
        start = time.perf_counter()
        clean = clean_inputs(loaded, config.calibration, should_stop=should_stop, processes=processes)
        timings["calibrate"] = time.perf_counter() - start
    for n, key in enumerate(missing):
        stage = next(i for i in needed if keys[i] == key)
        name = STAGE_NAMES[stage] if t_ranges[stage] is not None else "all stages"
        analysis = yield from _with_events(
            analyse_stage(loaded, clean, t_ranges[stage], config, key, should_stop, processes), name, n * share, share
        )
        if analysis is None:  # not the main process: its Hessian share is summed, OBS is not its job
            continue
        analyses[key] = analysis
        timings["hessian"] += analysis.seconds.get("hessian", 0.0)
        timings["solve"] += analysis.seconds.get("solve", 0.0)
    seen = _images_per_process(clean, config, processes) if clean is not None and config.scorer == "obs" else []
    if not processes.is_main:
        return None

    yield PruneEvent("build", "", 0.95, message="building stage networks")
    start = time.perf_counter()
    stage_networks: list[tuple[list[BlockKeep], dict[str, torch.Tensor]] | None] = [None, None, None]
    measured = None
    if config.allocation == "measured" and needed:
        measured = measured_stages(
            loaded.transformer, plan, {i: analyses[keys[i]] for i in needed}, paper_needed, unit_multiple=config.unit_multiple
        )
    for i in needed:
        if should_stop is not None and should_stop():
            raise Cancelled("pruning cancelled")
        analysis = analyses[keys[i]]
        layer_keeps = plan.layer_keep_counts(i)
        if measured is not None:
            removals = measured.removals[i]
            if not any(removals.values()):
                continue  # the measured rule leaves this stage dense: the base network, bit for bit
            counts = {layer.name: layer.num_groups - removals[layer.name] for layer in prunable_layers(loaded.transformer)}
            keeps = stage_keeps(loaded.transformer, analysis, 0, 0, counts)
        elif config.allocation == "per-block":
            costs = None if layer_keeps is None else {layer.name: layer.macs_per_group for layer in plan.shape.layers}
            keeps = stage_keeps_per_block(
                loaded.transformer, analysis, plan.allocation.heads_kept[i], plan.allocation.units_kept[i], layer_keeps, costs
            )
        else:
            keeps = stage_keeps(loaded.transformer, analysis, plan.allocation.heads_kept[i], plan.allocation.units_kept[i], layer_keeps)
        stage_networks[i] = (keeps, stage_weights(loaded.transformer, analysis, keeps, config))
    if config.refit:
        refit_start = time.perf_counter()
        clean = yield from _refit_stages(loaded, plan, config, stage_networks, t_ranges, clean, should_stop)
        timings["refit"] = time.perf_counter() - refit_start
    staged = build_staged(loaded.transformer, plan, stage_networks)
    timings["build"] = time.perf_counter() - start - timings.get("refit", 0.0)
    yield PruneEvent("build", "", 1.0, message="done")
    cx = clean.cx if clean is not None else next((analyses[keys[i]].cx for i in needed), float("nan"))
    used = {keys[i]: analyses[keys[i]] for i in needed}
    peak = max((analysis.hessian_peak_bytes for analysis in used.values()), default=0)
    return PruneResult(
        plan, config, staged, stage_networks, used, cx, timings, peak,
        processes=processes.count, calibration_images=seen, measured=measured,
    )


def _refit_stages(loaded, plan: Plan, config: PruneConfig, stage_networks: list, t_ranges, clean, should_stop):
    """Refit every pruned stage network on its own stage's calibration batches (prune/refit.py).

    In place on `stage_networks`: each (keeps, weights) gains the refit weights and biases.
    Runs in the calling (main) process over the whole calibration set, so the networks do
    not depend on how many processes gathered the Hessians. Returns the clean set (made
    here if the analyses came from a cache).
    """
    from mosaic_core.prune.refit import refit_weights
    from mosaic_core.prune.surgery import sliced_model

    pruned = [i for i, spec in enumerate(stage_networks) if spec is not None]
    if pruned and clean is None:
        clean = clean_inputs(loaded, config.calibration, should_stop=should_stop)
    done: dict[tuple, tuple] = {}  # one refit per distinct network and τ range (a uniform plan: one in all)
    for n, i in enumerate(pruned):
        keeps, weights = stage_networks[i]
        key = (_network_key(keeps, weights), t_ranges[i])
        if key not in done:
            yield PruneEvent("build", STAGE_NAMES[i], 0.95 + 0.04 * n / len(pruned), message=f"refitting the {STAGE_NAMES[i]} network")
            batches = calibration_batches(
                clean, _noising(loaded.scheduler_config), t_ranges[i], config.calibration, loaded.spec.null_class,
                device=loaded.device, dtype=loaded.dtype,
            )
            network = sliced_model(loaded.transformer, keeps, weights)
            done[key] = (keeps, {**weights, **refit_weights(loaded.transformer, network, batches, should_stop=should_stop)})
        stage_networks[i] = done[key]
    return clean


def layer_costs(model: torch.nn.Module, plan: Plan) -> dict[str, float]:
    """MACs of one group of each prunable layer per token (blockwise plans: the shape's own figure)."""
    if plan.allocation.layer_keeps is not None:
        return {layer.name: float(layer.macs_per_group) for layer in plan.shape.layers}
    return uniform_layer_costs(model)


def uniform_layer_costs(model: torch.nn.Module) -> dict[str, float]:
    """MACs of one group of each prunable layer per token, for blocks of one width D = H·hd (DiT, PixArt)."""
    layers = prunable_layers(model)
    width = next(layer.num_groups * layer.group_size for layer in layers if layer.kind != "mlp")
    return {layer.name: float(group_macs_per_token("mlp" if layer.kind == "mlp" else "attn", width, layer.group_size)) for layer in layers}


def measured_stages(model: torch.nn.Module, plan: Plan, analyses: Mapping[int, StageAnalysis], paper_stages=None, unit_multiple: int = 1):
    """The measured allocation of `plan` from the recorded OBS errors of each stage's analysis.

    `analyses[s]` is stage s's analysis (stages without one are not pruned); `paper_stages`
    the stages the paper's counts prune (default: those with steps and a sparsity > 0).
    Returns `measured_allocation.MeasuredStages`; it takes milliseconds (no Hessian work).
    """
    from mosaic_core.prune.measured_allocation import allocate_stages, merge_stage_allocations

    if paper_stages is None:
        paper_stages = [i for i in range(3) if plan.step_counts[i] > 0 and plan.allocation.achieved[i] > 0]
    stage_layers, errors, paper = allocation_inputs(
        prunable_layers(model), layer_costs(model, plan), analyses, plan.allocation.heads_kept, plan.allocation.units_kept,
        paper_stages, unit_multiple, plan.layer_keep_counts,
    )
    if plan.mode == "auto":  # the score chose the stage sparsities: the measured errors may move them
        return allocate_stages(stage_layers, errors, plan.step_counts, paper)
    # sparsities set per stage (manual, uniform, one stage only): each stage keeps its own budget
    # and only its layers and heads vs units are chosen by error
    parts = [
        allocate_stages(
            stage_layers, [errors[s] if i == s else None for i in range(3)], plan.step_counts,
            [paper[s] if i == s else {} for i in range(3)],
        )
        for s in paper_stages
    ]
    return merge_stage_allocations(parts, paper_stages)


def allocation_inputs(layers, costs: Mapping[str, float], analyses: Mapping[int, StageAnalysis], heads_kept, units_kept,
                      paper_stages, unit_multiple: int = 1, layer_keeps: Callable[[int], Mapping[str, int] | None] = lambda i: None):
    """What `allocate_stages` reads, for any number of stages (one per entry of `heads_kept`): the layers
    with their group costs, each stage's recorded errors (None without an analysis), and the groups the
    paper's counts remove in each of `paper_stages` ({} elsewhere)."""
    from mosaic_core.prune.measured_allocation import StageLayer

    stages = range(len(heads_kept))
    paper = [
        {layer.name: layer.num_groups - _kept_count(layer, heads_kept[i], units_kept[i], layer_keeps(i)) for layer in layers}
        if i in paper_stages else {}
        for i in stages
    ]
    errors = [{name: trace.errors for name, trace in analyses[i].traces.items()} if i in analyses else None for i in stages]
    stage_layers = [
        StageLayer(layer.name, layer.num_groups, costs[layer.name], unit_multiple if layer.kind == "mlp" else 1) for layer in layers
    ]
    return stage_layers, errors, paper


def _images_per_process(clean: CleanSet, config: PruneConfig, processes: Processes) -> list[int]:
    """Clean calibration images each process ran through the model per analysis (batch k → k mod N)."""
    size, batch = clean.x0.shape[0], config.calibration.batch_size
    counts = [0] * processes.count
    for k, start in enumerate(range(0, size, batch)):
        counts[k % processes.count] += min(batch, size - start)
    return counts


def _with_events(analysis, stage: str, offset: float, share: float):
    """Turn an analysis' (phase, fraction, layer) tuples into job-wide `PruneEvent`s."""
    return relay(analysis, lambda e: PruneEvent(e[0], stage, offset + share * e[1], e[2]))
