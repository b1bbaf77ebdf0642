"""Conquer: the comparison API and the bench command on a tiny real DiT (structure, not speed)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mosaic_core.conquer.compare import Contender, compare
from mosaic_core.conquer.images import load_samples
from mosaic_core.models.loading import load_model
from mosaic_core.divide.plan import build_plan
from mosaic_core.conquer.sampling import SampleConfig
from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent


def test_compare_reports_consistent_numbers(tiny_pixel_folder):
    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    plan = build_plan(loaded.spec, num_inference_steps=6, sparsity=0.0)
    dense = loaded.transformer
    contenders = [
        Contender("dense", dense, 6, plan.macs_dense, 100, step_stages=plan.step_stages),
        Contender("dense-again", dense, 6, plan.macs_dense, 100, step_stages=plan.step_stages),
        Contender("three-steps", dense, 3, plan.macs_dense // 2, 100),
    ]
    results = compare(loaded, contenders, [0, 1, 2, 3], SampleConfig(6, 1.5), repeats=2)
    by_name = {r.name: r for r in results}
    reference = by_name["dense"]
    assert reference.speedup == 1.0 and reference.ideal_speedup == 1.0
    assert len(reference.seconds_all) == 2 and reference.seconds == pytest.approx(np.median(reference.seconds_all))
    assert sum(reference.stage_seconds.values()) == pytest.approx(reference.step_seconds.sum())
    assert by_name["dense-again"].psnr == 100.0  # same seeds, same model: identical images
    np.testing.assert_array_equal(by_name["dense-again"].images, reference.images)
    assert by_name["three-steps"].ideal_speedup == pytest.approx(2.0, rel=1e-3)
    assert by_name["three-steps"].psnr < 100.0
    assert 0.0 <= reference.accuracy <= 1.0 and reference.fd >= 0.0
    with pytest.raises(ValueError, match=r"repeats must be a whole number in \[1, 20\], got 0"):
        compare(loaded, contenders, [0], SampleConfig(6), repeats=0)


def test_compare_with_the_floor_reports_each_steps_least_time_over_the_runs(tiny_pixel_folder):
    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    plan = build_plan(loaded.spec, num_inference_steps=5, sparsity=0.0)
    contenders = [
        Contender("dense", loaded.transformer, 5, plan.macs_dense, 100),
        Contender("three-steps", loaded.transformer, 3, plan.macs_dense * 3 // 5, 100),
    ]
    results = compare(loaded, contenders, [0, 1], SampleConfig(5, 1.5), repeats=3, statistic="floor")
    for r in results:
        runs = r.step_runs
        assert runs.shape == (3, r.num_inference_steps)
        least = sum(min(runs[i, k] for i in range(3)) for k in range(runs.shape[1]))  # step by step, by hand
        assert r.seconds == pytest.approx(least) and r.statistic == "floor" and r.row()["statistic"] == "floor"
        assert r.seconds <= min(r.seconds_all) + 1e-12  # never above the best whole run
    dense, fewer = results
    assert fewer.speedup == pytest.approx(dense.seconds / fewer.seconds)
    with pytest.raises(ValueError, match=r"statistic must be one of median, floor, got 'mean'"):
        compare(loaded, contenders, [0], SampleConfig(5), repeats=1, statistic="mean")


def test_timing_statistic_is_the_floor_on_a_cpu_and_the_median_on_a_gpu():
    import torch

    from mosaic_core.conquer.compare import timing_statistic

    assert timing_statistic(torch.device("cpu")) == "floor"
    assert timing_statistic(torch.device("cuda", 0)) == "median"
    assert timing_statistic("cuda") == "median"


@pytest.mark.slow
def test_bench_command_writes_json_markdown_and_samples(tiny_pixel_folder, tmp_path):
    out = tmp_path / "bench"
    command = [
        sys.executable, "-m", "mosaic_core", "bench", "--model", str(tiny_pixel_folder), "--sparsity", "0.4",
        "--steps", "6", "--n", "4", "--time-n", "2", "--repeats", "1", "--reduced-steps", "3", "--calib-size", "8",
        "--calib-source", "samples", "--out", str(out),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "bench.json").read_text())
    names = [row["name"] for row in report["methods"]]
    assert names == [
        "dense", "fewer-steps", "cache", "cache-dit", "uniform", "mosaic", "mosaic+cache", "mosaic-random-calib", "mosaic-clean-calib",
        "mosaic-magnitude", "mosaic-per-block", "mosaic-measured", "mosaic-3-steps",
    ]
    for row in report["methods"]:
        for key in ("name", "macs", "params", "seconds", "speedup", "ideal_speedup", "accuracy", "fd", "psnr"):
            assert key in row, key
        assert row["seconds"] > 0 and row["macs"] > 0 and row["params"] > 0
        assert row["timing"]["images"] == 2 and row["timing"]["runs"] == 1
        images, labels = load_samples(out / f"{row['name']}.npz")
        assert images.dtype == np.uint8 and images.shape == (4, 8, 8, 1)
        assert labels.tolist() == [0, 1, 2, 3]
    rows = {row["name"]: row for row in report["methods"]}
    assert rows["dense"]["speedup"] == 1.0 and rows["dense"]["ideal_speedup"] == 1.0
    assert rows["mosaic"]["ideal_speedup"] == pytest.approx(report["plan"]["ideal_speedup"], rel=1e-3)
    assert rows["mosaic"]["macs"] < rows["dense"]["macs"] and rows["mosaic"]["params"] > rows["uniform"]["params"]
    # fewer-steps matches mosaic's MACs as closely as whole steps allow
    per_step = rows["dense"]["macs"] / 6
    assert abs(rows["fewer-steps"]["macs"] - rows["mosaic"]["macs"]) <= per_step / 2
    table = (out / "bench.md").read_text()
    assert "| mosaic |" in table and "Ranked by PSNR" in table and "command: `python -m mosaic_core bench" in table


def test_the_cache_dit_row_is_matched_within_mosaics_macs_and_costed_by_what_ran(tiny_pixel_folder):
    from mosaic_core.conquer.bench import BenchConfig, bench_steps, markdown_table
    from mosaic_core.conquer.cache_dit_row import DBCacheSetting
    from mosaic_core.conquer.sampling import run_to_end

    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    config = BenchConfig(
        sparsity=0.4, num_inference_steps=12, num_images=3, time_images=2, repeats=1, reduced_steps=None,
        methods=("cache-dit",), threads=1, cache_dit=DBCacheSetting(None, fn=1, bn=0, warmup=2),
    )
    result = run_to_end(bench_steps(loaded, config))
    rows = {r.name: r for r in result.results}
    assert list(rows) == ["dense", "cache-dit"]
    plan = build_plan(loaded.spec, 12, sparsity=0.4)
    row = rows["cache-dit"]
    share, timing_share = row.macs / plan.macs_dense, 1 / row.ideal_speedup  # the quality run's, the timed runs'
    target = plan.macs_staged / plan.macs_dense
    # matched from below on the quality images (3 here, 2 timed): the quality run is the matched probe
    assert share <= target + 1e-9 and row.info["computed_share_matched"] == round(share, 4)
    assert "Threshold matched on the quality images" in markdown_table(result, loaded)
    # whole block calls of 12 steps × 2 blocks, at least the 2 full steps and block 0 of the others
    for value in (timing_share, share):
        assert value * 24 == pytest.approx(round(value * 24), abs=1e-6) and value >= (2 * 2 + 10) / 24 - 1e-9
    assert row.info["computed_share"] == round(share, 4) and row.info["computed_share_timing"] == round(timing_share, 4)
    assert not np.array_equal(row.images, rows["dense"].images)
    assert "cache-dit row: cache-dit 1.5.3 DBCache F1B0" in markdown_table(result, loaded)


def test_bench_rejects_bad_values_clearly(tmp_path):
    done = run_cli("bench", "--sparsity", "0.95", "--out", str(tmp_path))
    assert done.returncode == 2 and "0.95" in done.stderr and "Traceback" not in done.stderr


def test_bench_takes_the_models_own_step_count_without_steps(tiny_pixel_folder, tmp_path, monkeypatch):
    """`bench` without --steps used 50 for every model; it takes the model's own count, as `plan` does."""
    from conftest import with_default_steps

    with_default_steps(monkeypatch, 8)
    out = tmp_path / "bench"
    done = run_cli("bench", "--model", str(tiny_pixel_folder), "--methods", "fewer-steps", "--n", "2", "--time-n", "1",
                   "--repeats", "1", "--device", "cpu", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["steps"] == 8 and report["plan"]["num_inference_steps"] == 8
    # and into its own earlier output again (`--out` refuses only what bench did not write)
    assert run_cli("bench", "--model", str(tiny_pixel_folder), "--steps", "6", "--methods", "fewer-steps", "--n", "2",
                   "--time-n", "1", "--repeats", "1", "--device", "cpu", "--out", str(out)).returncode == 0
    assert json.loads((out / "bench.json").read_text())["steps"] == 6


def test_methods_runs_only_the_named_rows_and_dense(tiny_pixel_folder):
    from mosaic_core.conquer.bench import BenchConfig, bench_steps, markdown_table
    from mosaic_core.conquer.caching import CacheConfig
    from mosaic_core.conquer.sampling import run_to_end

    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    config = BenchConfig(
        sparsity=0.4, num_inference_steps=6, num_images=3, time_images=1, repeats=2, reduced_steps=None,
        methods=("fewer-steps", "cache"), threads=1, cache=CacheConfig(2, 0, 1),
    )
    result = run_to_end(bench_steps(loaded, config))
    rows = {r.name: r for r in result.results}
    assert list(rows) == ["dense", "fewer-steps", "cache"]  # nothing pruned, nothing else sampled
    dense_macs = build_plan(loaded.spec, 6, sparsity=0.4).macs_dense
    # tiny DiT: 2 blocks, cache keeps the last: a cached step runs 1 of 2 blocks;
    # steps 0, 2, 4 full, 1, 3, 5 cached -> 3 + 3/2 of 6 dense steps
    assert rows["cache"].macs == dense_macs // 6 * 3 + dense_macs // 6 * 3 // 2
    assert rows["cache"].images.shape[0] == 3 and not np.array_equal(rows["cache"].images, rows["dense"].images)
    assert all(len(r.seconds_all) == 2 for r in result.results)
    fewer = rows["fewer-steps"]
    assert fewer.step_runs.shape == (2, fewer.num_inference_steps)
    assert fewer.seconds == pytest.approx(fewer.step_runs.min(axis=0).sum())  # CPU: the floor
    assert fewer.seconds <= min(fewer.seconds_all) + 1e-12 and result.statistic == "floor"
    table = markdown_table(result, loaded)
    assert "| 1.00 | ref | dense |" in table and "DeepCache-style" in table


def test_rows_are_ranked_within_the_least_budget_they_fit_under():
    """A budget is a ceiling with 0.01 of slack: a matched cache at 0.667 of dense competes at
    0.70 with mosaic and 35-of-50 fewer-steps, 0.705 still does, an overshoot to 0.717 does not."""
    from mosaic_core.conquer.bench import budget_of, rank_by_budget
    from mosaic_core.conquer.compare import MethodResult

    assert [budget_of(f) for f in (1.0, 0.70, 35 / 50, 0.667, 0.705, 0.717, 0.651, 0.64, 0.6)] == [
        1.0, 0.70, 0.70, 0.70, 0.70, 0.75, 0.65, 0.65, 0.60,
    ]

    def row(name, macs, psnr):
        empty = np.zeros(0)
        return MethodResult(name, 50, empty, empty, 1.0, [1.0], empty, {}, macs, 1, psnr=psnr)

    rows = [row("dense", 1000, None), row("a", 700, 40.0), row("b", 667, 41.0), row("c", 730, 50.0), row("d", 500, 30.0)]
    ranked = [(budget, [r.name for r in group]) for budget, group in rank_by_budget(rows, 1000)]
    assert ranked == [(1.0, ["dense"]), (0.75, ["c"]), (0.70, ["b", "a"]), (0.5, ["d"])]


def test_timing_statistics_and_flags_on_injected_timings():
    from mosaic_core.conquer.bench import timing_flags, timing_statistics

    stats = timing_statistics([3.0, 1.0, 2.0, 4.0])
    assert (stats.min, stats.median, stats.max, stats.runs) == (1.0, 2.5, 4.0, 4)
    assert stats.spread == pytest.approx(3.0)  # (4 − 1) / 1
    assert stats.excess == pytest.approx(1.5)  # (2.5 − 1) / 1: what the flags judge
    assert timing_statistics([2.0]).spread == 0.0
    with pytest.raises(ValueError, match="positive finite"):
        timing_statistics([])
    assert timing_flags(0.95, 0.05) == ()
    assert timing_flags(2.13, 0.05) == ("measured/ideal 2.13 outside [0.5, 1.1]",)  # the old fewer-steps row
    assert timing_flags(0.45, 0.0)[0].startswith("measured/ideal 0.45")
    assert timing_flags(1.0, 0.25) == ("median 25% above min > 20%",)
    assert timing_flags(1.0, 0.1, reference_excess=0.3) == ("dense median 30% above min > 20%",)
    # one slow run of five (a background job) leaves the median at the min: no flag
    outlier = timing_statistics([1.0, 1.02, 1.01, 1.6, 1.03])
    assert outlier.spread == pytest.approx(0.6) and timing_flags(1.0, outlier.excess) == ()


def test_floor_sums_each_steps_least_time_and_checks_its_halves():
    from mosaic_core.conquer.bench import MAX_FLOOR_SPLIT, floor_flags, timing_statistics

    # three steps, four runs; every run was disturbed somewhere, no run is clean end to end
    runs = [[1.0, 5.0, 1.0], [4.0, 1.0, 1.0], [1.0, 1.0, 6.0], [1.1, 1.0, 1.0]]
    stats = timing_statistics([sum(r) for r in runs], runs)
    assert stats.min == pytest.approx(3.1) and stats.floor == pytest.approx(3.0)  # 1 + 1 + 1 < the best whole run
    # even runs 0, 2: floor 1 + 1 + 1; odd runs 1, 3: 1.1 + 1 + 1 -> 0.1 / 3 apart
    assert stats.floor_split == pytest.approx(0.1 / 3)
    assert timing_statistics([2.0], [[1.0, 1.0]]).floor_split == 0.0 and timing_statistics([2.0]).floor is None
    with pytest.raises(ValueError, match="one row per run"):
        timing_statistics([2.0, 2.0], [[1.0, 1.0]])
    assert floor_flags(0.95, 0.02) == ()
    assert floor_flags(0.95, MAX_FLOOR_SPLIT + 0.05) == ("floors of even/odd runs 15% apart > 10%",)
    assert floor_flags(1.3, 0.0, reference_split=0.2) == (
        "measured/ideal 1.30 outside [0.5, 1.1]", "dense floors of even/odd runs 20% apart > 10%",
    )


def test_summarise_timing_uses_the_floor_with_per_step_times():
    from mosaic_core.conquer.bench import BenchConfig, summarise_timing
    from mosaic_core.conquer.compare import MethodResult

    def row(name, macs, runs):
        runs = np.asarray(runs, dtype=float)
        totals = list(runs.sum(axis=1))
        return MethodResult(name, runs.shape[1], np.zeros((1, 2, 2, 1), np.uint8), np.zeros(1), float(np.median(totals)), totals,
                            np.median(runs, axis=0), {}, macs, 1, ideal_speedup=100 / macs, step_runs=runs)

    plan = build_plan(load_model("digits-dit", device="cpu").spec, 2, sparsity=0.3)
    quality = [row("dense", 100, [[9.0, 9.0]]), row("pruned", 50, [[9.0, 9.0]])]
    # dense: each step's best 0.5 in a different run; pruned: 0.26 + 0.26
    timed = [row("dense", 100, [[0.5, 0.9], [0.9, 0.5], [0.5, 0.9], [0.9, 0.5]]),
             row("pruned", 50, [[0.26, 0.4], [0.4, 0.26], [0.26, 0.4], [0.4, 0.26]])]
    result = summarise_timing(plan, BenchConfig(), quality, timed, cpu=True)
    by = {r.name: r for r in result.results}
    assert result.statistic == "floor" and by["pruned"].speedup == pytest.approx(1.0 / 0.52)
    assert result.flags["pruned"] == ()  # 1.92 of 2.00 ideal, even and odd runs agree
    assert by["pruned"].seconds == pytest.approx(0.52)
    assert summarise_timing(plan, BenchConfig(), quality, timed, cpu=False).statistic == "median"


def test_summarise_timing_uses_the_min_and_flags_implausible_rows():
    from mosaic_core.conquer.bench import BenchConfig, summarise_timing
    from mosaic_core.conquer.compare import MethodResult

    def row(name, macs, seconds):
        return MethodResult(name, 10, np.zeros((1, 2, 2, 1), np.uint8), np.zeros(1), float(np.median(seconds)), list(seconds),
                            np.zeros(10), {}, macs, 1, ideal_speedup=100 / macs)

    plan = build_plan(load_model("digits-dit", device="cpu").spec, 10, sparsity=0.3)
    quality = [row("dense", 100, [9.0]), row("good", 70, [9.0]), row("odd", 70, [9.0])]
    timed = [row("dense", 100, [1.0, 1.1, 1.05]), row("good", 70, [0.75, 0.8, 0.78]), row("odd", 70, [0.3, 0.31, 0.3])]
    result = summarise_timing(plan, BenchConfig(), quality, timed, cpu=True)
    by = {r.name: r for r in result.results}
    assert by["good"].speedup == pytest.approx(1.0 / 0.75) and by["good"].seconds == 0.75
    assert result.flags["good"] == ()  # 1.33 / 1.43 = 0.93
    assert result.flags["odd"] == ("measured/ideal 2.33 outside [0.5, 1.1]",)  # 3.33× against 1.43×
    median = summarise_timing(plan, BenchConfig(), quality, timed, cpu=False)
    assert {r.name: r for r in median.results}["good"].speedup == pytest.approx(1.05 / 0.78)


def test_comparison_flags_judge_a_studio_comparison_as_bench_judges_its_rows():
    from mosaic_core.conquer.bench import comparison_flags
    from mosaic_core.conquer.compare import MethodResult

    def row(name, ideal, runs, statistic="floor"):
        runs = np.asarray(runs, dtype=float)
        totals = runs.sum(axis=1)
        seconds = float(runs.min(axis=0).sum()) if statistic == "floor" else float(np.median(totals))
        return MethodResult(name, runs.shape[1], np.zeros(0), np.zeros(0), seconds, list(totals), np.zeros(0), {}, 1, 1,
                            ideal_speedup=ideal, step_runs=runs, statistic=statistic)

    def compared(dense, staged):
        staged.speedup = dense.seconds / staged.seconds
        return comparison_flags([dense, staged])

    dense = [[1.0, 1.0], [1.0, 1.0]]  # floor 2.0 s
    # staged floor 1.1 s: 1.82× against 2.00× ideal (0.91) is a result; against 1.43× ideal (1.27) it is not
    assert compared(row("dense", 1.0, dense), row("staged", 2.0, [[0.6, 0.5], [0.6, 0.5]])) == {"dense": (), "staged": ()}
    assert compared(row("dense", 1.0, dense), row("staged", 1.43, [[0.6, 0.5], [0.6, 0.5]]))["staged"] == (
        "measured/ideal 1.27 outside [0.5, 1.1]",
    )
    # one timed run: nothing to split, only the ratio is judged
    assert compared(row("dense", 1.0, [[1.0, 1.0]]), row("staged", 2.0, [[0.5, 0.6]]))["staged"] == ()
    # the staged run's even and odd halves disagree: floors 1.1 and 1.5 s, 36 % of the 1.1 s floor
    flags = compared(row("dense", 1.0, dense), row("staged", 2.0, [[0.6, 0.5], [0.8, 0.7]]))
    assert flags["staged"] == ("floors of even/odd runs 36% apart > 10%",) and flags["dense"] == ()
    # dense's halves disagree: both rows carry it (staged through its reference)
    flags = compared(row("dense", 1.0, [[1.0, 1.0], [1.5, 1.5]]), row("staged", 2.0, [[0.6, 0.5], [0.6, 0.5]]))
    assert flags["dense"] == ("floors of even/odd runs 50% apart > 10%",)
    assert flags["staged"] == ("dense floors of even/odd runs 50% apart > 10%",)
    # a GPU comparison (median): judged by the median's excess over the min instead
    gpu = compared(row("dense", 1.0, [[1.0], [1.0], [1.0]], "median"), row("staged", 2.0, [[0.5], [0.8], [0.8]], "median"))
    assert gpu["staged"] == ("median 60% above min > 20%",)


def test_parse_methods_rejects_unknown_names():
    from mosaic_core.conquer.bench import parse_methods

    assert parse_methods("mosaic, cache") == ("mosaic", "cache") and parse_methods("") is None
    assert parse_methods("mosaic-12-steps") == ("mosaic-12-steps",)
    with pytest.raises(ValueError, match="unknown bench method 'mosiac': choose from dense, fewer-steps"):
        parse_methods("mosiac")


def test_readme_table_is_spliced_from_a_bench_md_with_its_command():
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_table", ROOT / "benchmarks" / "readme_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    bench_md = "**m**, header line.\n\ncommand: `python -m mosaic_core bench --n 4`\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nstages note\n"
    block = module.results_block(bench_md, "out/bench.md")
    assert "Made by `python -m mosaic_core bench --n 4` (out/bench.md):" in block
    assert "| 1 | 2 |" in block and "**m**, header line." in block and block.endswith("stages note\n<!-- /results-table -->")
    readme = "intro\n<!-- results-table: old -->\nstale | table\n<!-- /results-table -->\noutro\n"
    spliced = module.replace_block(readme, block)
    assert spliced.startswith("intro\n<!-- results-table: out/bench.md -->") and spliced.endswith("-->\noutro\n")
    assert "stale" not in spliced
    with pytest.raises(ValueError, match="records no command line"):
        module.results_block("| a |\n", "x.md")
    # the committed README's block is what the script makes of the file it names
    text = (ROOT / "README.md").read_text()
    source = text.split("<!-- results-table: ", 1)[1].split(" -->", 1)[0]
    command = text.split("Made by `", 1)[1].split("`", 1)[0]
    assert module.results_block((ROOT / source).read_text(), source, command) in text


def test_bench_config_checks_the_reduced_steps_and_leaves_opt_in_rows_out_by_default():
    from mosaic_core.conquer.bench import BenchConfig

    with pytest.raises(ValueError, match=r"reduced steps must be in \[1, 9\], got 10"):
        BenchConfig(num_inference_steps=10, reduced_steps=10)
    default = BenchConfig(num_inference_steps=10, reduced_steps=None)
    assert default.wants("mosaic-measured") and default.wants("cache") and not default.wants("mosaic-measured-gemm")
    named = BenchConfig(num_inference_steps=10, reduced_steps=None, methods=("mosaic-measured-gemm",))
    assert named.wants("mosaic-measured-gemm") and named.wants("dense") and not named.wants("mosaic-measured")


@pytest.mark.parametrize("value", [0.1001, 0.1004, 0.10049, 0.1049, 0.105, 0.12, 0.5])
def test_a_flag_never_shows_a_value_that_is_not_past_its_limit(value):
    """'floors of even/odd runs 10% apart > 10%' was printed for 10.4 %: the shown number must be past the shown limit."""
    import re

    from mosaic_core.conquer.bench import MAX_FLOOR_SPLIT, MAX_SPREAD, floor_flags, timing_flags

    (split,) = floor_flags(1.0, value)
    shown, limit = (float(x) for x in re.fullmatch(r"floors of even/odd runs ([\d.]+)% apart > ([\d.]+)%", split).groups())
    assert shown > limit == MAX_FLOOR_SPLIT * 100 and abs(shown / 100 - value) < 0.005
    spread = 2 * value  # past MAX_SPREAD = 0.2 by as little
    (median,) = timing_flags(1.0, spread)
    shown, limit = (float(x) for x in re.fullmatch(r"median ([\d.]+)% above min > ([\d.]+)%", median).groups())
    assert shown > limit == MAX_SPREAD * 100
    for ratio, past in ((1.1 + value / 1000, 1.1), (0.5 - value / 1000, 0.5)):
        (flag,) = floor_flags(ratio, 0.0)
        number = float(re.fullmatch(r"measured/ideal ([\d.]+) outside \[0.5, 1.1\]", flag).group(1))
        assert (number > past) if past == 1.1 else (number < past)
