"""The steady CPU heap (mosaic_core/allocator.py), observed through glibc's own accounting in real processes.

Each case runs in a fresh Python process, since `mallopt` settings are process-wide and
glibc's thresholds move with what a process has freed before. The reference is glibc's
`mallinfo2`: bytes held in mmapped blocks (`hblkhd`) and free bytes kept in the heap
(`fordblks`), which the C library reports independently of the code under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mosaic_core import allocator

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import ctypes, ctypes.util, json
from mosaic_core.allocator import steady_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
state = steady_allocator()
size = 20 << 20  # 20 MiB: above glibc's initial mmap threshold, below the steady one
mapped = libc.mallinfo2().hblkhd
block = libc.malloc(size)
ctypes.memset(block, 1, size)  # touch it, as a tensor's data is
mapped_by_block = libc.mallinfo2().hblkhd - mapped
libc.free(block)
print(json.dumps({"state": state, "mapped_by_block": mapped_by_block, "free_kept": libc.mallinfo2().fordblks}))
"""


def _glibc() -> bool:
    import platform

    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _probe(setting: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != allocator.ENV}
    if setting is not None:
        env[allocator.ENV] = setting
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _glibc(), reason="mallopt settings exist on glibc only")
def test_steady_heap_serves_a_20_mib_block_from_the_heap_and_keeps_it_after_free():
    steady = _probe(None)
    assert steady["state"] == "steady"
    assert steady["mapped_by_block"] == 0  # not a fresh mmap: from the heap
    assert steady["free_kept"] >= 20 << 20  # freed, and kept for the next call


@pytest.mark.skipif(not _glibc(), reason="mallopt settings exist on glibc only")
def test_system_setting_leaves_glibc_defaults_which_map_and_return_the_block():
    system = _probe("system")
    assert system["state"] == "system"
    assert system["mapped_by_block"] >= 20 << 20  # glibc's default: its own mmap
    assert system["free_kept"] < 20 << 20  # and unmapped on free


def test_a_bad_setting_is_refused_naming_the_allowed_values(monkeypatch):
    monkeypatch.setenv(allocator.ENV, "jemalloc")
    with pytest.raises(ValueError, match=r"MOSAIC_ALLOCATOR must be 'steady' or 'system', got 'jemalloc'"):
        allocator._apply()


def test_cli_reports_a_bad_setting_as_one_line_and_status_2():
    env = {**os.environ, allocator.ENV: "fast", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "mosaic_core", "plan", "--sparsity", "0.3"], env=env, capture_output=True, text=True,
        timeout=120, cwd=ROOT,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "error: MOSAIC_ALLOCATOR must be 'steady' or 'system', got 'fast'"
