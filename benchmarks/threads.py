"""Why torch work in a second thread runs slower on a CPU, and how the studio avoids it.

    python benchmarks/threads.py                   # digits-dit, 4 images, DDIM-25, 6 runs per case
    python benchmarks/threads.py --images 8 --steps 50

Each case runs in a fresh process (started one after the other, never two at once), loads
the default model and times dense sampling runs after two warm-ups:

    one thread        everything in the main thread (the command line, `bench`)
    one worker        everything in one worker thread; the main thread runs no torch op
                      (the studio: its job runner's single worker thread does all compute)
    two threads       the main thread samples once, then the worker thread is timed
                      (an app whose request threads and a worker both run torch)
    two, then main    as above, then the main thread is timed again

The same four with `OMP_WAIT_POLICY=PASSIVE` (threads sleep between parallel regions
instead of spinning) show the mechanism: every thread that runs a parallel torch op gets
its own OpenMP team (here 2 threads), and once the process holds more OpenMP threads than
cores, libgomp stops spinning between parallel regions and puts the workers to sleep after
~100 spins, so each of the many small regions of a small-batch call pays a futex wake-up:
what `PASSIVE` does to every case. Printed: each case's floor and median seconds and its
floor against `one thread`. Not a test: it prints figures and asserts nothing. Run it alone
on the machine.
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
CASES = ("one thread", "one worker", "two threads", "two, then main")


def child(case: str, images: int, steps: int, runs: int) -> None:
    """Time `runs` sampling runs for one case; prints {"seconds": [...]} as JSON."""
    sys.path.insert(0, str(ROOT))
    import queue
    import threading
    import time

    from mosaic_core.allocator import steady_allocator

    steady_allocator()
    from mosaic_core.conquer.sampling import SampleConfig, labels_for, run_to_end, sample_loaded
    from mosaic_core.models.loading import load_model
    from mosaic_core.models.registry import DEFAULT_MODEL, resolve_model

    spec = resolve_model(DEFAULT_MODEL)
    config = SampleConfig(num_inference_steps=steps, guidance_scale=spec.default_cfg, seed=0)
    labels = labels_for(images, spec.num_classes)
    jobs: queue.Queue = queue.Queue()
    done: queue.Queue = queue.Queue()

    def worker() -> None:
        while True:
            done.put(jobs.get()())

    threading.Thread(target=worker, daemon=True).start()

    def in_worker(work):
        jobs.put(work)
        return done.get()

    def timed(loaded) -> float:
        began = time.perf_counter()
        run_to_end(sample_loaded(loaded, labels, config))
        return time.perf_counter() - began

    if case == "one thread":
        loaded = load_model(spec)
        where = lambda work: work()  # noqa: E731
    else:
        loaded = in_worker(lambda: load_model(spec))
        if case in ("two threads", "two, then main"):
            timed(loaded)  # the main thread's first parallel op gives it an OpenMP team of its own
        where = in_worker
    for _ in range(2):
        where(lambda: timed(loaded))
    if case == "two, then main":
        where = lambda work: work()  # noqa: E731
    seconds = [where(lambda: timed(loaded)) for _ in range(runs)]
    print(json.dumps({"seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.images, args.steps, args.runs)
        return
    print(f"digits-dit, {args.images} images, DDIM-{args.steps}, {args.runs} timed runs per case, fresh process each")
    base = None
    for policy in (None, "PASSIVE"):
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        if policy:
            env["OMP_WAIT_POLICY"] = policy
        print(f"\nOMP_WAIT_POLICY={policy or '(unset)'}")
        print(f"{'case':<16} {'floor s':>8} {'median s':>9} {'floor / one thread':>19}")
        for case in CASES:
            out = subprocess.run(
                [sys.executable, __file__, "--child", case, "--images", str(args.images), "--steps", str(args.steps),
                 "--runs", str(args.runs)], env=env, capture_output=True, text=True, check=True,
            )
            seconds = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
            floor = min(seconds)
            base = floor if case == "one thread" and policy is None else base
            print(f"{case:<16} {floor:8.3f} {statistics.median(seconds):9.3f} {floor / base:19.2f}", flush=True)


if __name__ == "__main__":
    main()
