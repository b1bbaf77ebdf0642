"""Hugging Face Spaces on ZeroGPU: the GPU-bound studio calls wrapped in `spaces.GPU`, elsewhere nothing.

On a ZeroGPU Space a GPU is attached only while a function decorated with
`spaces.GPU(duration=...)` runs (in a worker the `spaces` package forks); `duration` is the
longest the call may hold it, and a shorter one queues sooner. Everywhere else (CPU basic
Spaces, a laptop, a GPU box) `gpu_bound` returns the function unchanged, so the studio
runs as it always has.

Durations, for DiT-XL/2-256 on one ZeroGPU slice (an H200 share) at the studio's limits,
with room for a cold start (moving 675 M fp16 weights to the GPU):

| call      | work                                                               | seconds |
|-----------|--------------------------------------------------------------------|---------|
| `prune`   | calibration sampling + 3 stages of Hessians + greedy OBS on 56 layers | 300     |
| `compare` | dense and staged sampling, warm-up + repeats of 50 steps            | 120     |
| `trace`   | one dense sampling run of a few images, x̂₀ at every step            | 60      |

The built-in digits-dit needs a few seconds for each; it runs on CPU basic hardware.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, TypeVar

Function = TypeVar("Function", bound=Callable)

DURATIONS = {"prune": 300, "compare": 120, "trace": 60}


def on_zerogpu() -> bool:
    """Whether the `spaces` package is importable (the studio is running on a Hugging Face Space)."""
    try:
        return importlib.util.find_spec("spaces") is not None
    except (ImportError, ValueError):  # a broken or stubbed-out `spaces` entry counts as absent
        return False


def gpu_bound(kind: str, duration: int | None = None) -> Callable[[Function], Function]:
    """Decorator for a GPU-bound studio call: `spaces.GPU(duration=...)` on a Space, else the identity.

    `kind` is prune | compare | trace (its duration from `DURATIONS`); `duration` overrides it.
    """
    if kind not in DURATIONS:
        raise ValueError(f"unknown GPU-bound call '{kind}': choose one of {', '.join(DURATIONS)}")
    seconds = int(duration if duration is not None else DURATIONS[kind])
    if seconds < 1:
        raise ValueError(f"duration must be at least 1 second, got {duration!r}")
    if not on_zerogpu():
        return lambda function: function
    import spaces

    return spaces.GPU(duration=seconds)
