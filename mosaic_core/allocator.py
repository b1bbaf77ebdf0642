"""A steady CPU heap: keep freed activation memory for the next call instead of returning it.

PyTorch's CPU tensors come from the C library's `malloc`. glibc serves a block above its
mmap threshold (128 KiB at start, raised on the fly up to 32 MiB) with a fresh `mmap`, and
gives the top of the heap back to the system once more than the trim threshold is free.
A denoiser call allocates and frees the same few-MiB activations every layer, so in a new
process each of them can come back as untouched pages that the kernel must fault in and
zero: measured here (digits-dit, 16 rows, 2 threads) the dense network's call took
80–83 ms in a fresh process and 52–68 ms once a large sampling run had grown the heap
(docs/method.md §9.4). Two consequences:

- sampling in a fresh process (`python -m mosaic_core sample`, the studio's first run) is
  slower than it needs to be, and
- a speed-up measured early in a process is not the one measured later: the dense
  network's larger activations fault more, so a pruned network looked 1.85× faster in a
  fresh process and 1.6× after the heap had grown, same weights, same machine.

`steady_allocator()` sets `M_MMAP_THRESHOLD` to 32 MiB (glibc's maximum for the dynamic
threshold, so the activations of a call come from the heap) and `M_TRIM_THRESHOLD` to
1 GiB (freed heap is kept for the next call), through `mallopt`, once per process. The
cost is resident memory: the process keeps its peak heap (up to 1 GiB of free top) rather
than shrinking after a large batch. Allocations above 32 MiB still use `mmap` and are
returned at once. PyTorch's own advice for CPU inference is to preload jemalloc or
tcmalloc, which needs the process to be started with `LD_PRELOAD`; this reaches the same
effect from inside Python with the C library every Linux machine already has.

Called by the command line (`mosaic_core.cli.main`) and the studio (`app.py`) at start.
Not glibc (macOS, Windows, musl): nothing happens. `MOSAIC_ALLOCATOR=system` keeps the C
library's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

MMAP_THRESHOLD = 32 << 20  # bytes; glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 1 << 30  # bytes of free heap top kept before trimming
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers (glibc malloc.h)
_M_MMAP_THRESHOLD = -3
ENV = "MOSAIC_ALLOCATOR"


@functools.cache
def steady_allocator() -> str:
    """Apply the steady-heap settings once per process; returns what was done.

    "steady" (set now or earlier in this process), "system" (`MOSAIC_ALLOCATOR=system`),
    or "unsupported" (not glibc, or `mallopt` refused a value). Two threads racing here
    would at worst set the same two values twice.
    """
    return _apply()


def _apply() -> str:
    choice = os.environ.get(ENV, "").strip().lower()
    if choice == "system":
        return "system"
    if choice not in ("", "steady"):
        raise ValueError(f"{ENV} must be 'steady' or 'system', got {os.environ.get(ENV)!r}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "unsupported"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # pragma: no cover - glibc always has it
        return "unsupported"
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return "steady" if ok else "unsupported"
