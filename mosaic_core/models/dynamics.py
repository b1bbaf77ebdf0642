"""A model folder's training record, `dynamics.json`: written by training, read by the studio.

The file holds the ε-MSE of the raw (non-EMA) model per noise-level bin on a fixed eval
set, at logged training steps, and c_x = E‖x₀‖²/d of the training images:

    {"bins": [[t_lo, t_hi], ...], "steps": [k, ...], "loss": [[per bin] per step],
     "eval_images": n, "cx": c_x, "description": "..."}

This is the paper's premise (slow–fast–slow learning across noise levels) measured on the
model at hand; docs/method.md §7 says what digits-dit's record shows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

FILE_NAME = "dynamics.json"


@dataclass(frozen=True)
class Dynamics:
    """eps-MSE per noise-level bin at logged training steps.

    `loss[k, b]` is the loss of bin b (model timesteps `bins[b]`, inclusive) at `steps[k]`.
    """

    bins: np.ndarray  # B×2 int
    steps: np.ndarray  # K int
    loss: np.ndarray  # K×B float
    cx: Optional[float]
    eval_images: Optional[int]

    @property
    def bin_centres(self) -> np.ndarray:
        return self.bins.mean(axis=1)


def dynamics_record(
    bin_edges: Sequence[int], steps: Sequence[int], losses: Sequence[Sequence[float]], eval_images: int, cx: float
) -> dict:
    """The JSON value of dynamics.json (the writer's half; `read_dynamics` is the reader's)."""
    edges = [int(e) for e in bin_edges]
    return {
        "description": "eps-MSE of the raw (non-EMA) model per noise-level bin, fixed eval set",
        "bins": [[edges[i], edges[i + 1] - 1] for i in range(len(edges) - 1)],
        "steps": list(steps),
        "loss": [list(row) for row in losses],
        "eval_images": int(eval_images),
        "cx": float(cx),
    }


def read_dynamics(folder: str | Path | None) -> Optional[Dynamics]:
    """The training record next to a model's weights, or None when absent or malformed."""
    if not folder:
        return None
    path = Path(folder) / FILE_NAME
    if not path.is_file():
        return None
    return _parse(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=8)
def _parse(path: str, mtime_ns: int) -> Optional[Dynamics]:
    """Parse dynamics.json; a malformed file is reported as absent rather than crashing a caller."""
    try:
        data = json.loads(Path(path).read_text())
        bins = np.asarray(data["bins"], dtype=np.int64).reshape(-1, 2)
        steps = np.asarray(data["steps"], dtype=np.int64).reshape(-1)
        loss = np.asarray(data["loss"], dtype=np.float64).reshape(steps.size, bins.shape[0])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    cx = data.get("cx")
    images = data.get("eval_images")
    return Dynamics(
        bins=bins,
        steps=steps,
        loss=loss,
        cx=float(cx) if isinstance(cx, (int, float)) and math.isfinite(cx) and cx > 0 else None,
        eval_images=int(images) if isinstance(images, int) else None,
    )
