"""Does the steady CPU heap (mosaic_core/allocator.py) make a fresh process's sampling faster and its speed-ups stable?

    python benchmarks/allocator.py                         # dense digits-dit
    python benchmarks/allocator.py --checkpoint CKPT       # and a pruned checkpoint (`prune --out CKPT`)

Fresh processes, alternately with `MOSAIC_ALLOCATOR=system` (glibc's defaults) and
`steady`, each sampling `--images` images (DDIM-50, CFG 1.25) with the dense model (and the
checkpoint's staged model), `--runs` times, interleaved. Printed per process: the first
run's seconds, then the floor (Σ of each step's least time over the runs), and the dense /
staged speed-up from the floors. Not a test: it prints figures and asserts nothing. Run it
alone on the machine: the seconds are wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys
import numpy as np
import torch
from mosaic_core.allocator import steady_allocator
state = steady_allocator()
torch.set_num_threads(int(sys.argv[1]))
from mosaic_core.conquer.sampling import SampleConfig, sample_loaded
from mosaic_core.jobs import run_to_end
from mosaic_core.models.loading import load_model
loaded = load_model("digits-dit", device="cpu")
models = {"dense": loaded.transformer}
if sys.argv[4]:
    from mosaic_core.prune.checkpoint import load_pruned
    models["staged"] = load_pruned(sys.argv[4], loaded)
labels = np.arange(int(sys.argv[2])) % 10
runs = {name: [] for name in models}
for _ in range(int(sys.argv[3])):
    for name, model in models.items():
        runs[name].append(run_to_end(sample_loaded(loaded, labels, SampleConfig(50, 1.25, "ddim", 0), transformer=model)).step_seconds)
out = {"state": state}
for name, r in runs.items():
    out[name] = {"first": float(r[0].sum()), "floor": float(np.min(np.stack(r), axis=0).sum())}
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="", help="a pruned digits-dit checkpoint folder (prune --out)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per process")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per setting")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"system": [], "steady": []}
    for index in range(args.processes):
        for setting in results:
            env = {**os.environ, "MOSAIC_ALLOCATOR": setting, "PYTHONPATH": str(ROOT)}
            done = subprocess.run(
                [sys.executable, "-c", CHILD, str(args.threads), str(args.images), str(args.runs), args.checkpoint],
                env=env, capture_output=True, text=True, cwd=ROOT, check=True,
            )
            row = json.loads(done.stdout.strip().splitlines()[-1])
            results[setting].append(row)
            line = f"process {index + 1} {setting:<6} ({row['state']}):"
            for name in ("dense", "staged"):
                if name in row:
                    line += f" {name} first {row[name]['first']:.2f} s, floor {row[name]['floor']:.2f} s;"
            if "staged" in row:
                line += f" speed-up {row['dense']['floor'] / row['staged']['floor']:.2f}×"
            print(line, flush=True)
    for setting, rows in results.items():
        dense = statistics.median(r["dense"]["floor"] for r in rows)
        first = statistics.median(r["dense"]["first"] for r in rows)
        line = f"{setting:<6} median over processes: dense first run {first:.2f} s, floor {dense:.2f} s"
        if rows and "staged" in rows[0]:
            speedups = [r["dense"]["floor"] / r["staged"]["floor"] for r in rows]
            line += f"; speed-up {min(speedups):.2f}–{max(speedups):.2f}×"
        print(line)


if __name__ == "__main__":
    main()
