"""On-disk cache of pruning work, so the same settings return at once, also after a restart.

    cache/
      analyses/<key>/   hessians.safetensors (float64) + traces.json   — one StageAnalysis
      pruned/<key>/     a pruned checkpoint folder (see `mosaic_core.prune.checkpoint`)

An analysis key hashes the base weights, the stage's τ range, the calibration and the
scorer (`stage_pruning.analysis_key`); a checkpoint key hashes the base weights, the plan
and the prune config. Everything is written atomically, so a crash or cancel leaves either
the complete entry or none (and the temporary folders of a killed write are removed when
a cache is next opened). Hessians of very large models (DiT-XL/2: ~5 GB per stage) are not
written to disk (`max_hessian_bytes`); their checkpoints still are.

Bounded. The cache folder holds at most `MOSAIC_CACHE_MAX_BYTES` bytes (default 2 GiB):
after every write the least recently used entries (by the folder's modification time,
refreshed on every hit) are evicted until it fits. The Hessians an `AnalysisStore` holds
in memory are an LRU of at most `MOSAIC_ANALYSIS_MEMORY_BYTES` bytes (default 512 MiB;
the most recent entry is kept even when it alone is larger).

Verified. `traces.json` carries `content_sha256`, the SHA-256 of its canonical JSON
without that field, and that JSON holds the SHA-256 of `hessians.safetensors`; checkpoints
carry their own digest (checkpoint format v2). An entry that fails any check (flipped
bytes, an edited field, a manifest whose plan is not the one its key names) is logged,
deleted and treated as a miss, so it is recomputed and never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from mosaic_core import limits
from mosaic_core.atomic import clean_stale, replace_folder, sha256_file, write_json
from mosaic_core.prune.checkpoint import DIGEST_FIELD, content_digest
from mosaic_core.models.registry import PROJECT_ROOT
from mosaic_core.prune.obs import PruneTrace
from mosaic_core.prune.spill import SpilledHessians, clean_stale_spills, stored_bytes
from mosaic_core.prune.stage_pruning import StageAnalysis

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = PROJECT_ROOT / "cache"
KINDS = ("analyses", "pruned")
MAX_TRACES_BYTES = 64 << 20  # traces.json of DiT-XL/2 is a few MB
MAX_KEY_LENGTH = 64
_EVICT_LOCK = threading.Lock()


def cache_max_bytes() -> int:
    """The disk cap in bytes: `$MOSAIC_CACHE_MAX_BYTES`, default 2 GiB (ValueError naming a bad value)."""
    env = limits.CACHE_MAX_BYTES_ENV
    return limits.check_bytes_setting(env, os.environ.get(env), limits.DEFAULT_CACHE_MAX_BYTES)


def analysis_memory_bytes() -> int:
    """The in-memory Hessian budget: `$MOSAIC_ANALYSIS_MEMORY_BYTES`, default 512 MiB."""
    env = limits.ANALYSIS_MEMORY_BYTES_ENV
    return limits.check_bytes_setting(env, os.environ.get(env), limits.DEFAULT_ANALYSIS_MEMORY_BYTES)


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not key.isascii() or not key.isalnum() or len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"bad cache key {str(key)[:80]!r}: expected up to {MAX_KEY_LENGTH} letters and digits")
    return key


def discard(folder: Path, reason: str) -> None:
    """Delete a damaged cache entry and log why (it is recomputed on the next request)."""
    log.warning("discarding damaged cache entry %s: %s", folder, reason)
    shutil.rmtree(folder, ignore_errors=True)


def touch(folder: Path) -> None:
    """Mark a cache entry as just used (the LRU order is the folders' modification times)."""
    try:
        os.utime(folder)
    except OSError:
        pass


def clean_cache_temps(root: str | Path) -> list[Path]:
    """Remove temporary folders that killed writes left in `root/analyses` and `root/pruned`."""
    removed: list[Path] = []
    for kind in KINDS:
        removed += clean_stale(Path(root) / kind, legacy=True)
    return removed


@dataclass(frozen=True)
class CacheEntry:
    """One complete cache entry on disk."""

    kind: str  # "analyses" or "pruned"
    folder: Path
    bytes: int
    last_used: float  # the folder's modification time (refreshed on every hit)


@dataclass(frozen=True)
class CacheUsage:
    """Bytes and entries of a cache folder, by kind, and its cap."""

    bytes: int
    entries: int
    analyses_bytes: int
    analyses_entries: int
    pruned_bytes: int
    pruned_entries: int
    max_bytes: int


def cache_entries(root: str | Path) -> list[CacheEntry]:
    """Every complete entry under `root/analyses` and `root/pruned` (temporary folders excluded)."""
    entries = []
    for kind in KINDS:
        folder = Path(root) / kind
        try:
            children = list(folder.iterdir())
        except OSError:
            continue
        for child in children:
            if child.name.startswith(".") or child.is_symlink() or not child.is_dir():
                continue
            try:
                size = sum(f.stat().st_size for f in child.rglob("*") if f.is_file() and not f.is_symlink())
                entries.append(CacheEntry(kind, child, size, child.stat().st_mtime))
            except OSError:  # evicted or replaced by another process meanwhile
                continue
    return entries


def cache_usage(root: str | Path = DEFAULT_CACHE_DIR, max_bytes: Optional[int] = None) -> CacheUsage:
    """How many bytes and entries the cache at `root` holds (what the studio shows)."""
    entries = cache_entries(root)
    by_kind = {kind: [e for e in entries if e.kind == kind] for kind in KINDS}
    return CacheUsage(
        bytes=sum(e.bytes for e in entries),
        entries=len(entries),
        analyses_bytes=sum(e.bytes for e in by_kind["analyses"]),
        analyses_entries=len(by_kind["analyses"]),
        pruned_bytes=sum(e.bytes for e in by_kind["pruned"]),
        pruned_entries=len(by_kind["pruned"]),
        max_bytes=cache_max_bytes() if max_bytes is None else max_bytes,
    )


def enforce_cache_cap(root: str | Path, max_bytes: Optional[int] = None, keep: Iterable[str | Path] = ()) -> list[Path]:
    """Evict least recently used entries until the cache at `root` holds at most `max_bytes`.

    Entries in `keep` (the one just written) are never evicted. Returns the evicted folders.
    """
    max_bytes = cache_max_bytes() if max_bytes is None else int(max_bytes)
    protected = {Path(p).resolve() for p in keep}
    evicted: list[Path] = []
    with _EVICT_LOCK:
        entries = sorted(cache_entries(root), key=lambda e: e.last_used)
        total = sum(e.bytes for e in entries)
        for entry in entries:
            if total <= max_bytes:
                break
            if entry.folder.resolve() in protected:
                continue
            shutil.rmtree(entry.folder, ignore_errors=True)
            total -= entry.bytes
            evicted.append(entry.folder)
            log.info("cache over %d bytes: evicted %s (%d bytes)", max_bytes, entry.folder, entry.bytes)
    return evicted


def analysis_bytes(analysis: StageAnalysis) -> int:
    """Bytes an analysis keeps alive: its Hessians, in memory or spilled to disk (prune/spill.py),
    so the store's budget also bounds the spill files it keeps; the removal orders are small."""
    return hessians_bytes(analysis) + 1024 * (1 + len(analysis.traces))


def _owned_by_analysis(entry: Path) -> bool:
    """Files of the analysis format (replaced on a rewrite): traces, Hessians, spilled chunks."""
    return entry.name in ("traces.json", "hessians.safetensors") or (
        entry.name.startswith("hessians-") and entry.name.endswith(".safetensors")
    )


def _read_chunks(folder: Path, chunks: object) -> SpilledHessians:
    """The verified chunk files of a spilled analysis, adopted (hard-linked) into a private spill."""
    if not isinstance(chunks, dict) or not chunks:
        raise ValueError("hessian_chunks_sha256 must name the chunk files")
    hessians = SpilledHessians()
    for name, expected in sorted(chunks.items()):
        if not isinstance(name, str) or not _owned_by_analysis(Path(name)) or "/" in name or name.startswith("."):
            raise ValueError(f"unexpected Hessian chunk name {name[:80]!r}")
        path = folder / name
        if not path.is_file() or sha256_file(path) != expected:
            raise ValueError(f"{name} is missing or does not match its SHA-256")
        hessians.adopt_file(path)
    return hessians


class AnalysisStore(MutableMapping):
    """A key -> StageAnalysis mapping held in memory (an LRU by bytes) and mirrored to `root/analyses/`.

    Pass it as `analyses=` to `stage_pruning.prune_steps`: reads fall through to disk, writes
    go to both. Entries that fail to load or verify are deleted and treated as absent.
    """

    def __init__(
        self,
        root: str | Path = DEFAULT_CACHE_DIR,
        max_hessian_bytes: int = 1 << 30,
        memory_bytes: Optional[int] = None,
        max_disk_bytes: Optional[int] = None,
    ) -> None:
        self.root = Path(root)
        self.folder = self.root / "analyses"
        self.max_hessian_bytes = max_hessian_bytes
        self.memory_bytes = analysis_memory_bytes() if memory_bytes is None else limits.check_int(
            "memory_bytes", memory_bytes, 0, limits.MAX_CACHE_BYTES
        )
        self.max_disk_bytes = cache_max_bytes() if max_disk_bytes is None else limits.check_int(
            "max_disk_bytes", max_disk_bytes, 0, limits.MAX_CACHE_BYTES
        )
        self._memory: OrderedDict[str, StageAnalysis] = OrderedDict()
        self._memory_used = 0
        self._lock = threading.Lock()
        clean_cache_temps(self.root)
        clean_stale_spills()  # Hessian spill folders a killed prune left in the temp folder

    @property
    def memory_used(self) -> int:
        """Bytes of the analyses held in memory now."""
        return self._memory_used

    def _path(self, key: str) -> Path:
        return self.folder / _check_key(key)

    def _remember(self, key: str, analysis: StageAnalysis) -> None:
        with self._lock:
            if key in self._memory:
                self._memory_used -= analysis_bytes(self._memory.pop(key))
            self._memory[key] = analysis
            self._memory_used += analysis_bytes(analysis)
            while self._memory_used > self.memory_bytes and len(self._memory) > 1:
                _, old = self._memory.popitem(last=False)
                self._memory_used -= analysis_bytes(old)

    def _recall(self, key: str) -> StageAnalysis | None:
        with self._lock:
            analysis = self._memory.get(key)
            if analysis is not None:
                self._memory.move_to_end(key)
            return analysis

    def __getitem__(self, key: str) -> StageAnalysis:
        analysis = self._recall(_check_key(key))
        if analysis is not None:
            return analysis
        analysis = self._read(key)
        if analysis is None:
            raise KeyError(key)
        self._remember(key, analysis)
        return analysis

    def __contains__(self, key: object) -> bool:
        try:
            self[key]  # type: ignore[index]
        except (KeyError, ValueError):
            return False
        return True

    def __setitem__(self, key: str, analysis: StageAnalysis) -> None:
        _check_key(key)
        self._remember(key, analysis)
        if hessians_bytes(analysis) <= self.max_hessian_bytes:
            self._write(key, analysis)
            enforce_cache_cap(self.root, self.max_disk_bytes, keep=[self._path(key)])

    def __delitem__(self, key: str) -> None:
        with self._lock:
            old = self._memory.pop(_check_key(key), None)
            if old is not None:
                self._memory_used -= analysis_bytes(old)
        shutil.rmtree(self._path(key), ignore_errors=True)

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            keys = set(self._memory)
        if self.folder.is_dir():
            keys |= {p.name for p in self.folder.iterdir() if not p.name.startswith(".") and (p / "traces.json").is_file()}
        return iter(sorted(keys))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def _write(self, key: str, analysis: StageAnalysis) -> None:
        from safetensors.torch import save_file

        with replace_folder(self._path(key), _owned_by_analysis) as tmp:
            hessian_sha256, chunk_files = None, None
            if isinstance(analysis.hessians, SpilledHessians):
                # Spilled Hessians stay in their chunk files: copied file by file, never all in memory.
                chunk_files = {}
                for source in analysis.hessians.files:
                    shutil.copyfile(source, tmp / source.name)
                    chunk_files[source.name] = sha256_file(tmp / source.name)
            elif analysis.hessians:
                save_file({k: v.contiguous() for k, v in analysis.hessians.items()}, str(tmp / "hessians.safetensors"))
                hessian_sha256 = sha256_file(tmp / "hessians.safetensors")
            meta = {
                "key": analysis.key,
                "t_range": analysis.t_range,
                "cx": analysis.cx,
                "seconds": analysis.seconds,
                "traces": {name: trace.to_dict() for name, trace in analysis.traces.items()},
                "hessians_sha256": hessian_sha256,
            }
            if chunk_files is not None:
                meta["hessian_chunks_sha256"] = chunk_files
            meta[DIGEST_FIELD] = content_digest(meta)
            write_json(tmp / "traces.json", meta)

    def _read(self, key: str) -> StageAnalysis | None:
        """The verified entry of `key`, or None (absent; or damaged, which is then deleted)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = self._path(key)
        meta_file, hessian_file = folder / "traces.json", folder / "hessians.safetensors"
        if not meta_file.is_file():
            return None
        try:
            if meta_file.stat().st_size > MAX_TRACES_BYTES:
                raise ValueError(f"traces.json is larger than {MAX_TRACES_BYTES} bytes")
            meta = json.loads(meta_file.read_bytes())
            if not isinstance(meta, dict) or meta.get(DIGEST_FIELD) != content_digest(meta):
                raise ValueError("traces.json does not match its content digest")
            expected = meta.get("hessians_sha256")
            if (expected is None) != (not hessian_file.is_file()):
                raise ValueError("hessians.safetensors is missing or unexpected")
            if expected is not None and sha256_file(hessian_file) != expected:
                raise ValueError("hessians.safetensors does not match its SHA-256")
            chunks = meta.get("hessian_chunks_sha256")
            if chunks is not None:
                hessians = _read_chunks(folder, chunks)
            else:
                hessians = load_file(str(hessian_file)) if expected is not None else {}
            traces = {name: PruneTrace.from_dict(value) for name, value in meta["traces"].items()}
            t_range = None if meta["t_range"] is None else tuple(int(t) for t in meta["t_range"])
            if meta["key"] != key:
                raise ValueError("the entry names another key")
            analysis = StageAnalysis(meta["key"], t_range, hessians, traces, float(meta["cx"]), dict(meta.get("seconds", {})))
        except FileNotFoundError:  # evicted or replaced by another process meanwhile
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, SafetensorError, RecursionError) as error:
            discard(folder, f"{type(error).__name__}: {error}"[:300])
            return None
        touch(folder)
        return analysis


def checkpoint_key(weights_hash: str, plan, prune_config) -> str:
    """Content hash of a pruned model: base weights + plan + prune config."""
    plan_dict = plan.to_dict()
    payload = json.dumps({"weights": weights_hash, "plan": plan_dict, "prune": prune_config.to_dict()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def checkpoint_folder(root: str | Path, weights_hash: str, plan, prune_config) -> Path:
    """Where the cached checkpoint of these settings lives (it may not exist yet)."""
    return Path(root) / "pruned" / checkpoint_key(weights_hash, plan, prune_config)


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


def load_cached_staged(root: str | Path, loaded, plan, prune_config):
    """The cached `StagedDiT` for these settings, or None (absent; or damaged, which is then deleted).

    Besides the checkpoint's own checks, the entry must hold exactly the plan and prune
    config its key was made from.
    """
    from mosaic_core.prune.checkpoint import load_pruned, read_manifest

    folder = checkpoint_folder(root, loaded.weights_hash, plan, prune_config)
    if not (folder / "manifest.json").is_file():
        return None
    try:
        manifest = read_manifest(folder)
        if _canonical(manifest["plan"]) != _canonical(json.loads(json.dumps(plan.to_dict()))) or _canonical(
            manifest["prune"]
        ) != _canonical(json.loads(json.dumps(prune_config.to_dict()))):
            raise ValueError("its plan or prune config is not the one its key names")
        staged = load_pruned(folder, loaded)
    except FileNotFoundError:
        return None
    except ValueError as error:
        discard(folder, str(error)[:300])
        return None
    touch(folder)
    return staged


def hessians_bytes(analysis: StageAnalysis) -> int:
    """Bytes of an analysis' Hessians (what the disk cache would hold), in memory or spilled."""
    return stored_bytes(analysis.hessians)
