"""On-disk cache of pruning work, so the same settings return at once, also after a restart.

    cache/
      analyses/<key>/   hessians.safetensors (float64) + traces.json   — one StageAnalysis
      pruned/<key>/     a pruned checkpoint folder (see `mosaic_core.prune.checkpoint`)

An analysis key hashes the base weights, the stage's τ range, the calibration and the
scorer (`pruning.analysis_key`); a checkpoint key hashes the base weights, the plan and
the prune config. Everything is written atomically, so a crash or cancel leaves either
the complete entry or none. Hessians of very large models (DiT-XL/2: ~5 GB per stage) are
not written to disk (`max_hessian_bytes`); their checkpoints still are.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import MutableMapping
from pathlib import Path
from typing import Iterator

from mosaic_core.atomic import replace_folder, write_json
from mosaic_core.prune.obs import PruneTrace
from mosaic_core.prune.stage_pruning import StageAnalysis
from mosaic_core.models.registry import PROJECT_ROOT

DEFAULT_CACHE_DIR = PROJECT_ROOT / "cache"


class AnalysisStore(MutableMapping):
    """A key -> StageAnalysis mapping held in memory and mirrored to `root/analyses/`.

    Pass it as `analyses=` to `pruning.prune_steps`: reads fall through to disk, writes go
    to both. Entries that fail to load (damaged, partial) are treated as absent.
    """

    def __init__(self, root: str | Path = DEFAULT_CACHE_DIR, max_hessian_bytes: int = 1 << 30) -> None:
        self.folder = Path(root) / "analyses"
        self.max_hessian_bytes = max_hessian_bytes
        self._memory: dict[str, StageAnalysis] = {}

    def _path(self, key: str) -> Path:
        if not key.isalnum():
            raise ValueError(f"bad cache key {key!r}")
        return self.folder / key

    def __getitem__(self, key: str) -> StageAnalysis:
        if key in self._memory:
            return self._memory[key]
        analysis = self._read(key)
        if analysis is None:
            raise KeyError(key)
        self._memory[key] = analysis
        return analysis

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (key in self._memory or self._read(key) is not None)

    def __setitem__(self, key: str, analysis: StageAnalysis) -> None:
        self._memory[key] = analysis
        if hessians_bytes(analysis) <= self.max_hessian_bytes:
            self._write(key, analysis)

    def __delitem__(self, key: str) -> None:
        self._memory.pop(key, None)
        shutil.rmtree(self._path(key), ignore_errors=True)

    def __iter__(self) -> Iterator[str]:
        keys = set(self._memory)
        if self.folder.is_dir():
            keys |= {p.name for p in self.folder.iterdir() if (p / "traces.json").is_file()}
        return iter(sorted(keys))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def _write(self, key: str, analysis: StageAnalysis) -> None:
        from safetensors.torch import save_file

        with replace_folder(self._path(key)) as tmp:
            if analysis.hessians:
                save_file({k: v.contiguous() for k, v in analysis.hessians.items()}, str(tmp / "hessians.safetensors"))
            write_json(
                tmp / "traces.json",
                {
                    "key": analysis.key,
                    "t_range": analysis.t_range,
                    "cx": analysis.cx,
                    "seconds": analysis.seconds,
                    "traces": {name: trace.to_dict() for name, trace in analysis.traces.items()},
                },
            )

    def _read(self, key: str) -> StageAnalysis | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = self._path(key)
        try:
            meta = json.loads((folder / "traces.json").read_text())
            hessian_file = folder / "hessians.safetensors"
            hessians = load_file(str(hessian_file)) if hessian_file.is_file() else {}
            traces = {name: PruneTrace.from_dict(value) for name, value in meta["traces"].items()}
        except (OSError, ValueError, KeyError, json.JSONDecodeError, SafetensorError):
            return None
        t_range = None if meta["t_range"] is None else tuple(meta["t_range"])
        return StageAnalysis(meta["key"], t_range, hessians, traces, float(meta["cx"]), dict(meta.get("seconds", {})))


def checkpoint_key(weights_hash: str, plan, prune_config) -> str:
    """Content hash of a pruned model: base weights + plan + prune config."""
    plan_dict = plan.to_dict()
    payload = json.dumps({"weights": weights_hash, "plan": plan_dict, "prune": prune_config.to_dict()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def checkpoint_folder(root: str | Path, weights_hash: str, plan, prune_config) -> Path:
    """Where the cached checkpoint of these settings lives (it may not exist yet)."""
    return Path(root) / "pruned" / checkpoint_key(weights_hash, plan, prune_config)


def load_cached_staged(root: str | Path, loaded, plan, prune_config):
    """The cached `StagedDiT` for these settings, or None (absent or unreadable)."""
    from mosaic_core.prune.checkpoint import load_pruned

    folder = checkpoint_folder(root, loaded.weights_hash, plan, prune_config)
    if not (folder / "manifest.json").is_file():
        return None
    try:
        return load_pruned(folder, loaded)
    except ValueError:
        return None


def hessians_bytes(analysis: StageAnalysis) -> int:
    """Bytes of an analysis' Hessians (what the disk cache would hold)."""
    return sum(h.numel() * h.element_size() for h in analysis.hessians.values())

