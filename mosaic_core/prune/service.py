"""Prune with caches: memory → disk → prune → save, as one generator with progress events.

`PruneService` is what an interactive front end (the studio) or a long-running script
holds: the pruned staged models of the last few settings in memory, checkpoints on disk
under `cache_root/pruned/<key>/`, and the Hessians and removal orders under
`cache_root/analyses/` (one `AnalysisStore` per cache root, shared by every service), so
that

1. the same settings return at once (memory, else the disk checkpoint, also after a restart);
2. moving only the sparsity re-solves nothing but the kept weights (the analyses are reused);
3. a cancelled or failed prune writes nothing (the checkpoint is saved only when complete).

Keys are `cache.checkpoint_key` (base weights + plan + prune config), so a change of any
of them is a miss.

Memory is bounded: at most `memory_size` pruned models and `memory_bytes` of their own
(non-shared) parameters are held (the newest is always kept); the Hessians are the
`AnalysisStore`'s LRU (`cache.analysis_memory_bytes`), and one running job holds the
analyses it needs only for its own length. The disk cache is capped by
`cache.cache_max_bytes` after every checkpoint written.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import MutableMapping
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Generator, Optional

from mosaic_core.divide.plan import Plan
from mosaic_core.divide.stages import STAGE_NAMES
from mosaic_core.jobs import relay
from mosaic_core.models.loading import weights_folder
from mosaic_core.models.registry import ModelSpec


@dataclass(frozen=True)
class StageKept:
    """What one stage's network kept, measured on the built modules (not read from the plan)."""

    name: str
    num_steps: int
    sparsity: float  # the plan's achieved sparsity of this stage
    heads_kept: int
    heads_total: int
    units_kept: int
    units_total: int
    shared_with: Optional[str] = None  # "dense" or an earlier stage whose network it reuses


@dataclass
class PrunedModel:
    """A pruned staged model ready to sample, with what a front end shows about it.

    `source` is "pruned" (computed now), "memory" or "disk" (a cache hit); `seconds` are the
    prune seconds by phase of the run that made it (read from the manifest on a disk hit)
    and `load_seconds` how long this request took.
    """

    key: str
    folder: Path
    spec: ModelSpec
    plan: Plan
    config: Any  # stage_pruning.PruneConfig
    staged: Any  # staged_denoiser.StagedDiT
    source: str
    seconds: dict
    load_seconds: float
    cx: float
    ledger: Any  # staged_denoiser.MemoryLedger
    stages: tuple[StageKept, ...]

    @property
    def from_cache(self) -> bool:
        return self.source != "pruned"


_STORES: dict[Path, Any] = {}
_STORES_LOCK = threading.Lock()


def analysis_store(root: str | Path):
    """One `AnalysisStore` per cache root, shared by every service (and job) that uses it."""
    from mosaic_core.prune.cache import AnalysisStore

    root = Path(root).resolve()
    with _STORES_LOCK:
        if root not in _STORES:
            _STORES[root] = AnalysisStore(root)
        return _STORES[root]


def spec_weights_hash(spec: ModelSpec) -> Optional[str]:
    """`LoadedModel.weights_hash` without loading the model (None when there are no weights)."""
    folder = weights_folder(spec)
    if folder is None:
        return None
    newest = max(p.stat().st_mtime_ns for p in folder.glob("*.safetensors"))
    return _weights_hash(str(folder), newest)


@lru_cache(maxsize=16)
def _weights_hash(folder: str, mtime_ns: int) -> str:
    """`loading.weights_hash`, remembered while the files keep their modification time."""
    from mosaic_core.models.loading import weights_hash

    return weights_hash(folder)


class _JobAnalyses(MutableMapping):
    """The analyses one prune job uses: held here while the job runs, written through to the store.

    The store's memory is an LRU that may drop an entry between the job's check and its use
    (and Hessians too large for the disk cache exist only in memory); this view keeps what
    the job fetched or computed until the job ends.
    """

    def __init__(self, store) -> None:
        self.store = store
        self.local: dict[str, Any] = {}

    def __getitem__(self, key: str):
        if key not in self.local:
            self.local[key] = self.store[key]
        return self.local[key]

    def __contains__(self, key: object) -> bool:
        try:
            self[key]  # type: ignore[index]
        except (KeyError, ValueError):
            return False
        return True

    def __setitem__(self, key: str, analysis) -> None:
        self.local[key] = analysis
        self.store[key] = analysis

    def __delitem__(self, key: str) -> None:
        self.local.pop(key, None)
        del self.store[key]

    def __iter__(self):
        return iter(set(self.local) | set(self.store))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def own_bytes(pruned: PrunedModel) -> int:
    """Parameter bytes a pruned model holds beyond the dense model it shares."""
    return max(0, int(pruned.ledger.staged_bytes) - int(pruned.ledger.dense_bytes))


class PruneService:
    """Pruned staged models by settings: an in-memory LRU over a disk cache over pruning."""

    def __init__(self, cache_root: str | Path, memory_size: int = 4, memory_bytes: int = 1 << 30) -> None:
        from mosaic_core import limits
        from mosaic_core.prune.cache import clean_cache_temps

        self.memory_size = limits.check_int("memory_size", memory_size, 1, 1024)
        self.memory_bytes = limits.check_int("memory_bytes", memory_bytes, 0, limits.MAX_CACHE_BYTES)
        self.cache_root = Path(cache_root)
        self._memory: OrderedDict[str, PrunedModel] = OrderedDict()
        self._lock = threading.Lock()
        clean_cache_temps(self.cache_root)

    def memory_used(self) -> int:
        """Own parameter bytes of the pruned models held in memory now."""
        with self._lock:
            return sum(own_bytes(p) for p in self._memory.values())

    @property
    def analyses(self):
        """The `AnalysisStore` (Hessians and removal orders) of this service's cache root."""
        return analysis_store(self.cache_root)

    def key(self, spec: ModelSpec, plan: Plan, config) -> Optional[str]:
        """The cache key of these settings (None when the model has no weights on disk)."""
        from mosaic_core.prune.cache import checkpoint_key

        weights = spec_weights_hash(spec)
        return None if weights is None else checkpoint_key(weights, plan, config)

    def cached(self, spec: ModelSpec, plan: Plan, config) -> Optional[PrunedModel]:
        """The pruned model of these settings if it is in memory (no disk access, no compute)."""
        start = time.perf_counter()
        key = self.key(spec, plan, config)
        with self._lock:
            hit = self._memory.get(key) if key else None
            if hit is None:
                return None
            self._memory.move_to_end(key)
        return replace(hit, source="memory", load_seconds=time.perf_counter() - start)

    def on_disk(self, spec: ModelSpec, plan: Plan, config) -> bool:
        """Whether a complete checkpoint of these settings is in the disk cache."""
        from mosaic_core.prune.cache import checkpoint_folder

        weights = spec_weights_hash(spec)
        if weights is None:
            return False
        return (checkpoint_folder(self.cache_root, weights, plan, config) / "manifest.json").is_file()

    def prune_steps(
        self,
        loaded,
        plan: Plan,
        config,
        should_stop: Optional[Callable[[], bool]] = None,
    ) -> Generator[Any, None, PrunedModel]:
        """The staged model of `plan` on `loaded`: from memory, from disk, or pruned now and saved.

        Yields `stage_pruning.PruneEvent`s while pruning; returns a `PrunedModel`. Stopping
        (`should_stop`) raises `jobs.Cancelled` before the checkpoint is written.
        """
        from mosaic_core.prune.cache import checkpoint_folder, enforce_cache_cap, load_cached_staged
        from mosaic_core.prune.checkpoint import read_manifest, save_pruned
        from mosaic_core.prune.stage_pruning import prune_steps

        start = time.perf_counter()
        hit = self.cached(loaded.spec, plan, config)
        if hit is not None:
            return hit
        folder = checkpoint_folder(self.cache_root, loaded.weights_hash, plan, config)
        staged = load_cached_staged(self.cache_root, loaded, plan, config)
        if staged is not None:
            manifest = read_manifest(folder)
            source, seconds, cx = "disk", dict(manifest.get("seconds", {})), float(manifest.get("cx", float("nan")))
        else:
            analyses = _JobAnalyses(self.analyses)
            result = yield from relay(prune_steps(loaded, plan, config, should_stop=should_stop, analyses=analyses), lambda e: e)
            save_pruned(result, loaded, folder)
            enforce_cache_cap(self.cache_root, self.analyses.max_disk_bytes, keep=[folder])
            source, seconds, cx, staged = "pruned", dict(result.seconds), float(result.cx), result.staged
        pruned = describe_pruned(loaded, folder, plan, config, staged, source, seconds, cx, time.perf_counter() - start)
        with self._lock:
            self._memory[pruned.key] = pruned
            self._memory.move_to_end(pruned.key)
            while len(self._memory) > 1 and (
                len(self._memory) > self.memory_size or sum(own_bytes(p) for p in self._memory.values()) > self.memory_bytes
            ):
                self._memory.popitem(last=False)
        return pruned


def stage_kept(plan: Plan, staged, dense, config=None) -> tuple[StageKept, ...]:
    """Heads and feed-forward units of each stage network, read from its layers: per block
    when every block is alike (a DiT), else totals over the network (a UNet). Under the
    measured allocation (`config.allocation`) a stage's sparsity is read from the network
    too (its removed share of the prunable MACs), since the plan holds the paper's."""
    from mosaic_core.divide.shapes import MLP_KINDS
    from mosaic_core.prune.hessian import prunable_layers
    from mosaic_core.prune.stage_pruning import layer_costs

    measured = getattr(config, "allocation", None) == "measured"
    costs = layer_costs(dense, plan) if measured else {}

    def removed_share(network) -> float:
        kept = {layer.name: layer.num_groups for layer in prunable_layers(network)}
        total = sum(costs[layer.name] * layer.num_groups for layer in prunable_layers(dense))
        return 1.0 - sum(costs[name] * kept[name] for name in kept) / total

    def per_block(network) -> dict[int, tuple[int, int]]:
        sizes: dict[int, tuple[int, int]] = {}
        for layer in prunable_layers(network):
            heads, units = sizes.get(layer.block, (0, 0))
            sizes[layer.block] = (heads + layer.num_groups, units) if layer.kind not in MLP_KINDS else (heads, units + layer.num_groups)
        return sizes

    networks = staged.networks()
    sizes = [per_block(network) for network in (dense, *networks)]
    alike = all(len(set(s.values())) == 1 for s in sizes)  # every block alike in every network (a DiT)
    figures = [next(iter(s.values())) if alike else tuple(map(sum, zip(*s.values()))) for s in sizes]
    total_heads, total_units = figures[0]
    rows = []
    for index, (name, network) in enumerate(zip(STAGE_NAMES, networks)):
        heads, units = figures[index + 1]
        shared = "dense" if network is dense else next((STAGE_NAMES[j] for j in range(index) if networks[j] is network), None)
        rows.append(
            StageKept(
                name, plan.step_counts[index], removed_share(network) if measured else plan.allocation.achieved[index],
                heads, total_heads, units, total_units, shared,
            )
        )
    return tuple(rows)


def describe_pruned(loaded, folder, plan, config, staged, source, seconds, cx, load_seconds) -> PrunedModel:
    """A `PrunedModel` for a staged model built on `loaded` (its memory ledger and kept sizes)."""
    from mosaic_core.conquer.staged_denoiser import memory_ledger

    return PrunedModel(
        key=Path(folder).name,
        folder=Path(folder),
        spec=loaded.spec,
        plan=plan,
        config=config,
        staged=staged,
        source=source,
        seconds=seconds,
        load_seconds=load_seconds,
        cx=cx,
        ledger=memory_ledger(loaded.transformer, staged),
        stages=stage_kept(plan, staged, loaded.transformer, config),
    )
