"""`bench --random-weights`: a model of the real shapes without weights, timed against random-keep plans."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mosaic_core.conquer.bench import NetworkTiming, RandomBenchConfig, RandomPlanTiming, random_keeps, random_weights_model
from mosaic_core.divide.plan import build_plan
from mosaic_core.models.registry import resolve_model
from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent


def test_random_weights_dit_xl_has_the_papers_size_and_shapes():
    # Built on the meta device: the real shapes, no memory. DiT-XL/2 has 675 M parameters
    # (Peebles & Xie 2023, Table 1), 28 blocks of width 1152, learned σ (8 output channels).
    # diffusers keeps a copy of the timestep/class embedders in every block's adaLN-Zero
    # (the converted checkpoint repeats the same weights), so count those once.
    model, exact = random_weights_model(resolve_model("facebook/DiT-XL-2-256"), torch.device("meta"), torch.float32)
    assert not exact  # no config.json here: the registry's shape
    params = sum(
        p.numel() for name, p in model.named_parameters()
        if ".norm1.emb." not in name or name.startswith("transformer_blocks.0.")
    )
    assert abs(params - 675e6) / 675e6 < 0.005, params
    assert len(model.transformer_blocks) == 28
    block = model.transformer_blocks[0]
    assert block.attn1.to_q.weight.shape == (1152, 1152) and block.ff.net[2].weight.shape == (1152, 4608)
    assert model.config.out_channels == 8 and model.config.sample_size == 32


def test_random_keeps_have_the_plans_sizes_and_differ_between_blocks():
    keeps = random_keeps(28, 16, 4608, 11, 3000, torch.Generator().manual_seed(0))
    assert len(keeps) == 28
    for keep in keeps:
        assert len(keep.heads) == 11 and len(set(keep.heads)) == 11 and list(keep.heads) == sorted(keep.heads)
        assert len(keep.units) == 3000 and 0 <= min(keep.units) and max(keep.units) < 4608
    assert len({keep.heads for keep in keeps}) > 1  # random per block, not one fixed set


def test_plan_speedup_is_steps_weighted_time_ratio():
    plan = build_plan(resolve_model("facebook/DiT-XL-2-256"), 50, sparsity=0.3)
    n = plan.step_counts
    timing = lambda name, s: NetworkTiming(name, 1, 1, 1, tuple(s), 0.0, None)  # noqa: E731
    dense = timing("dense", [2.0, 1.0, 3.0])
    stages = (timing("e", [0.5, 0.6, 0.4]), None, timing("l", [0.9, 0.8, 1.0]))
    result = RandomPlanTiming(0.3, plan, dense, stages)
    # min: dense 1.0, early 0.4, middle = dense 1.0, late 0.8; median: 2.0, 0.5, 2.0, 0.9
    assert result.speedup("min") == pytest.approx(sum(n) * 1.0 / (n[0] * 0.4 + n[1] * 1.0 + n[2] * 0.8))
    assert result.speedup("median") == pytest.approx(sum(n) * 2.0 / (n[0] * 0.5 + n[1] * 2.0 + n[2] * 0.9))


def test_rounded_widths_are_counted_from_the_sliced_networks_themselves():
    from mosaic_core.conquer.bench import plan_with_unit_multiple, random_bench_steps
    from mosaic_core.jobs import run_to_end
    from mosaic_core.prune.surgery import sliced_model

    spec = resolve_model("digits-dit")  # 6 blocks, 6 heads of 32, 768 MLP units, 64 tokens
    plan = build_plan(spec, 50, sparsity=0.5)
    assert plan_with_unit_multiple(plan, 1) is plan
    assert any(u % 64 for u in plan.allocation.units_kept)  # the paper's widths are ragged here
    config = RandomBenchConfig(sparsities=(0.5,), batch=2, calls=1, repeats=1, unit_multiple=64)
    timed = run_to_end(random_bench_steps(spec, config)).timings[0]
    rounded = timed.plan
    assert rounded.allocation.heads_kept == plan.allocation.heads_kept and rounded.step_counts == plan.step_counts
    for units, before in zip(rounded.allocation.units_kept, plan.allocation.units_kept):
        assert units % 64 == 0 and abs(units - before) <= 32
    # MACs per call from the weight shapes of real sliced networks: the six prunable linears × tokens
    dense, _ = random_weights_model(spec, torch.device("cpu"), torch.float32)

    def linear_macs(model):
        names = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")
        modules = dict(model.named_modules())
        return sum(modules[f"transformer_blocks.{b}.{n}"].weight.numel() for b in range(6) for n in names) * 64

    generator = torch.Generator().manual_seed(0)
    stage_macs = [
        linear_macs(sliced_model(dense, random_keeps(6, 6, 768, heads, units, generator)))
        for heads, units in zip(rounded.allocation.heads_kept, rounded.allocation.units_kept)
    ]
    n = rounded.step_counts
    assert rounded.macs_staged == sum(k * m for k, m in zip(n, stage_macs))
    assert rounded.ideal_speedup == pytest.approx(sum(n) * linear_macs(dense) / rounded.macs_staged)
    assert [t.units_kept for t in timed.stages if t is not None] == [u for u in rounded.allocation.units_kept if u < 768]


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 0.9\], got 0.95"):
        RandomBenchConfig(sparsities=(0.95,))
    with pytest.raises(ValueError, match=r"--batch must be a whole number in \[1, 1024\], got 0"):
        RandomBenchConfig(batch=0)
    with pytest.raises(ValueError, match=r"--unit-multiple must be a whole number in \[1, 256\], got 0"):
        RandomBenchConfig(unit_multiple=0)


@pytest.mark.slow  # a real `python -m mosaic_core bench` process
def test_random_weights_bench_command(tiny_pixel_folder, tmp_path):
    out = tmp_path / "rb"
    command = [
        sys.executable, "-m", "mosaic_core", "bench", "--random-weights", "--model", str(tiny_pixel_folder),
        "--sparsities", "0,0.5", "--steps", "6", "--repeats", "2", "--calls", "1", "--batch", "2", "--device", "cpu",
        "--out", str(out),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["mode"] == "random-weights" and report["exact_config"] is True
    assert "left out" in report["quality"] and report["speedup_statistic"] == "min"
    zero, half = report["plans"]
    # S = 0: every stage runs the dense network itself, so the measured speed-up is exactly 1
    assert zero["measured_speedup_min"] == 1.0 and zero["ideal_speedup"] == 1.0
    spec = resolve_model(str(tiny_pixel_folder))
    plan = build_plan(spec, 6, sparsity=0.5)
    assert half["ideal_speedup"] == pytest.approx(plan.ideal_speedup, rel=1e-3)
    assert half["stage_steps"] == list(plan.step_counts)
    for stage, heads, units in zip(half["stages"], plan.allocation.heads_kept, plan.allocation.units_kept):
        assert (stage["heads_kept"], stage["units_kept"]) == (heads, units)
        assert len(stage["seconds_per_call_all"]) == 2 and stage["peak_memory_bytes"] is None  # CPU
        assert stage["seconds_per_call_min"] == min(stage["seconds_per_call_all"])
        if (heads, units) != (4, 32):
            assert stage["params"] < half["dense"]["params"]
    assert half["measured_over_ideal"] == pytest.approx(half["measured_speedup_min"] / half["ideal_speedup"], abs=2e-4)
    table = (out / "bench.md").read_text()
    assert "Quality columns are left out" in table and "| 0.5 | dense |" in table
    keys = {key for plan in report["plans"] for row in [plan, plan["dense"], *plan["stages"]] for key in row}
    assert not keys & {"psnr", "ssim", "accuracy", "fd"}
    assert np.isfinite(half["measured_speedup_median"])


def test_random_weights_bench_refuses_missing_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for machines without it")
    done = run_cli("bench", "--random-weights", "--device", "cuda", "--out", str(tmp_path))
    assert done.returncode == 2 and "CUDA is not available" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_plan_flags_fire_on_implausible_timings():
    plan = build_plan(resolve_model("facebook/DiT-XL-2-256"), 50, sparsity=0.3)
    timing = lambda s: NetworkTiming("n", 1, 1, 1, tuple(s), 0.0, None)  # noqa: E731
    steady = RandomPlanTiming(0.3, plan, timing([1.0, 1.05]), (timing([0.7, 0.72]),) * 3)
    # every stage at 0.7 of dense: measured 1/0.7 = 1.43 against the plan's ideal
    ratio = (1 / 0.7) / plan.ideal_speedup
    assert 0.9 < ratio < 1.1 and steady.flags("min") == ()
    noisy = RandomPlanTiming(0.3, plan, timing([1.0, 1.5]), (timing([0.2, 0.21]),) * 3)
    flags = noisy.flags("min")
    assert flags[0].startswith("measured/ideal") and "dense median 25% above min > 20%" in flags  # median of 1.0 and 1.5
