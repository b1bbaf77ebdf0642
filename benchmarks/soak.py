"""Soak benchmark: many prune + compare cycles of distinct settings, watching memory and disk.

    python benchmarks/soak.py --cycles 100
    python benchmarks/soak.py --cycles 24 --calib-size 16 --images 4 --cache-max-bytes 300000000

Each cycle picks a new (M, sparsity) pair on the built-in digits-dit, prunes it through the
studio's engine (`ui.engine.StudioEngine`: PruneService → AnalysisStore → disk cache) and
compares it with the dense model on a few images. A new M means new stage ranges, hence
three new Hessian analyses (~95 MB each on disk for digits-dit): without bounds the memory
and the cache folder grow with every cycle. With them, the resident set size (RSS) and the
cache bytes level off at the configured caps. Every tenth cycle (and the first and last)
prints RSS, the in-memory Hessian bytes, the cache's bytes and entries, and the cycle time.

Not a test: it prints figures and asserts nothing; timings on a shared machine vary.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss_bytes() -> int:
    """Resident set size of this process (psutil when installed, else /proc/self/status VmRSS)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    return -1


def trimmed_rss_bytes() -> int:
    """RSS after `gc.collect()` and glibc's `malloc_trim(0)`: memory still held, not allocator slack.

    Freed tensors leave pages in glibc's heaps that RSS keeps counting until trimmed; the
    difference from `rss_bytes()` tells fragmentation from a leak. -1 where there is no glibc.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return -1
    return rss_bytes()


def settings_for(cycle: int) -> tuple[float, float]:
    """A distinct (M, sparsity) pair for each cycle: M walks a grid, sparsity cycles within it."""
    from mosaic_core.divide.stages import M_RANGE

    sparsities = (0.1, 0.2, 0.3, 0.4, 0.5)
    low, high = 0.2, min(0.9, M_RANGE[1])
    grid = 40  # M values
    M = round(low + (high - low) * ((cycle // len(sparsities)) * 7 % grid) / grid, 3)
    return M, sparsities[cycle % len(sparsities)]


def main(argv: list[str] | None = None) -> int:
    """Run the soak and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--calib-size", type=int, default=16, help="calibration images per stage (studio minimum 16)")
    parser.add_argument("--images", type=int, default=4, help="images per comparison")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps")
    parser.add_argument("--cache-max-bytes", type=int, default=300_000_000, help="disk cap of the temporary cache")
    parser.add_argument("--memory-bytes", type=int, default=256 << 20, help="in-memory Hessian budget")
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args(argv)

    os.environ["MOSAIC_CACHE_MAX_BYTES"] = str(args.cache_max_bytes)
    os.environ["MOSAIC_ANALYSIS_MEMORY_BYTES"] = str(args.memory_bytes)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    import torch

    from mosaic_core.conquer.sampling import SampleConfig
    from mosaic_core.divide.plan import build_plan
    from mosaic_core.prune.cache import cache_usage
    from mosaic_core.requests import PruneRequest
    from ui.engine import StudioEngine

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory(prefix="mosaic-soak-") as cache_root:
        engine = StudioEngine(cache_root=cache_root)
        spec = engine.resolve("digits-dit")
        config = PruneRequest(None, "snr", args.calib_size, "obs").config(spec)  # the plan varies per cycle
        sample_config = SampleConfig(num_inference_steps=args.steps, guidance_scale=spec.default_cfg, seed=0)
        labels = [i % spec.num_classes for i in range(args.images)]
        print(
            f"soak: {args.cycles} cycles, calibration {args.calib_size}, {args.images} images x {args.steps} steps, "
            f"cache cap {args.cache_max_bytes / 1e6:.0f} MB, Hessian memory {args.memory_bytes / 2**20:.0f} MiB"
        )
        print(f"{'cycle':>5} {'M':>6} {'sparsity':>8} {'source':>7} {'RSS MiB':>8} {'trimmed':>8} {'Hessians MiB':>12} "
              f"{'cache MB':>8} {'entries':>7} {'s/cycle':>7}")
        start = last = time.perf_counter()
        seen = set()
        for cycle in range(1, args.cycles + 1):
            M, sparsity = settings_for(cycle - 1)
            assert (M, sparsity) not in seen, (M, sparsity)
            seen.add((M, sparsity))
            plan = build_plan(spec, num_inference_steps=args.steps, M=M, sparsity=sparsity)
            pruned = engine.prune(spec, plan, config)
            engine.compare(pruned, labels, sample_config, repeats=1)
            if cycle == 1 or cycle % args.every == 0 or cycle == args.cycles:
                now = time.perf_counter()
                usage = cache_usage(cache_root)
                print(
                    f"{cycle:>5} {M:>6.3f} {sparsity:>8.2f} {pruned.source:>7} {rss_bytes() / 2**20:>8.0f} {trimmed_rss_bytes() / 2**20:>8.0f} "
                    f"{engine.analyses.memory_used / 2**20:>12.0f} {usage.bytes / 1e6:>8.0f} {usage.entries:>7} "
                    f"{(now - last) / (1 if cycle == 1 else args.every):>7.1f}",
                    flush=True,
                )
                last = now
        print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
