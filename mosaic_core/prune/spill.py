"""Hessians kept on disk between the gathering and the weight solve (a bounded-memory prune).

A stage analysis keeps every layer's Hessian: the greedy removal orders are computed as
each chunk of blocks is gathered, but a later prune of the same stage at another sparsity
re-solves the kept weights from H (`stage_pruning.stage_weights`). Held in memory that is
the whole model's Hessians at once (13.7 GiB for SDXL-base's UNet in float64), which is
exactly what gathering chunk by chunk under `PruneConfig.hessian_budget` avoids. So with a
budget each finished chunk is written to its own safetensors file and read back one layer
at a time when a weight is solved: memory holds one chunk while gathering and one layer
while solving.

`SpilledHessians` is a read-only mapping name → H like the in-memory dict it replaces.
Its folder (`mosaic-hessians-*`, in the system temp folder unless a parent is given) is
private to the object and removed when the object is garbage collected or the process
exits normally; a killed process leaves it behind, to be removed by `clean_stale_spills`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

SPILL_PREFIX = "mosaic-hessians-"


class SpilledHessians(Mapping):
    """Layer Hessians stored as safetensors files (one per gathered chunk), loaded on access."""

    def __init__(self, parent: str | os.PathLike | None = None) -> None:
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=parent))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.folder), True)
        self._file_of: dict[str, Path] = {}
        self._files: list[Path] = []
        self.nbytes = 0  # bytes of the tensors (what an in-memory dict would hold)

    # --- writing -------------------------------------------------------------------------
    def add_chunk(self, hessians: Mapping[str, torch.Tensor]) -> Path:
        """Write one chunk's Hessians to a new file; they are then read from disk only."""
        from safetensors.torch import save_file

        repeated = sorted(set(hessians) & set(self._file_of))
        if repeated:
            raise ValueError(f"Hessians already spilled for {', '.join(repeated[:3])}")
        path = self.folder / f"hessians-{len(self._files):03d}.safetensors"
        save_file({name: h.detach().to("cpu").contiguous() for name, h in hessians.items()}, str(path))
        self._register(path, hessians)
        return path

    def adopt_file(self, source: str | os.PathLike) -> Path:
        """Take a verified chunk file (e.g. from the disk cache) as the next chunk: a hard link
        when `source` is on the same file system (no copy, and it survives the source's
        eviction), a copy otherwise."""
        from safetensors import safe_open

        path = self.folder / f"hessians-{len(self._files):03d}.safetensors"
        try:
            os.link(source, path)
        except OSError:
            shutil.copyfile(source, path)
        with safe_open(str(path), framework="pt") as handle:
            shapes = {name: handle.get_slice(name) for name in handle.keys()}
            sizes = {name: _slice_bytes(part) for name, part in shapes.items()}
        repeated = sorted(set(sizes) & set(self._file_of))
        if repeated:
            path.unlink()
            raise ValueError(f"Hessians already spilled for {', '.join(repeated[:3])}")
        self._files.append(path)
        for name, size in sizes.items():
            self._file_of[name] = path
            self.nbytes += size
        return path

    def _register(self, path: Path, hessians: Mapping[str, torch.Tensor]) -> None:
        self._files.append(path)
        for name, h in hessians.items():
            self._file_of[name] = path
            self.nbytes += h.numel() * h.element_size()

    # --- reading (the Mapping interface) --------------------------------------------------
    @property
    def files(self) -> list[Path]:
        """The chunk files, in the order they were written."""
        return list(self._files)

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self._file_of[name]
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def __eq__(self, other: object) -> bool:  # Mapping's __eq__ compares dict(self): tensors would need allclose
        return self is other

    __hash__ = object.__hash__

    def release(self) -> None:
        """Remove the files now (the mapping is empty afterwards)."""
        self._finalizer()
        self._file_of.clear()
        self._files.clear()
        self.nbytes = 0


def _slice_bytes(part) -> int:
    """Bytes of a tensor in a safetensors file, from its header (nothing is read)."""
    count = 1
    for size in part.get_shape():
        count *= int(size)
    dtype = part.get_dtype()
    itemsize = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4}.get(dtype)
    if itemsize is None:
        raise ValueError(f"unexpected tensor dtype {dtype} in a Hessian file")
    return count * itemsize


def stored_bytes(hessians: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the Hessians themselves, wherever they are (what the disk cache would hold)."""
    if isinstance(hessians, SpilledHessians):
        return hessians.nbytes
    return sum(h.numel() * h.element_size() for h in hessians.values())


def clean_stale_spills(parent: str | os.PathLike | None = None, older_than_s: float = 24 * 3600) -> list[Path]:
    """Remove `mosaic-hessians-*` folders older than `older_than_s` (left by killed processes)."""
    import time

    root = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    removed = []
    if not root.is_dir():
        return removed
    now = time.time()
    for entry in root.glob(SPILL_PREFIX + "*"):
        try:
            if entry.is_dir() and not entry.is_symlink() and now - entry.stat().st_mtime > older_than_s:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        except OSError:
            continue
    return removed
