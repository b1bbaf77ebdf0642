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


@pytest.mark.slow
def test_bench_command_writes_json_markdown_and_samples(tiny_pixel_folder, tmp_path):
    out = tmp_path / "bench"
    command = [
        sys.executable, "-m", "mosaic_core", "bench", "--model", str(tiny_pixel_folder), "--sparsity", "0.4",
        "--steps", "6", "--n", "4", "--repeats", "1", "--reduced-steps", "3", "--calib-size", "8",
        "--calib-source", "samples", "--out", str(out),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "bench.json").read_text())
    names = [row["name"] for row in report["methods"]]
    assert names == ["dense", "fewer-steps", "uniform", "mosaic", "mosaic-random-calib", "mosaic-clean-calib", "mosaic-magnitude", "mosaic-per-block", "mosaic-3-steps"]
    for row in report["methods"]:
        for key in ("name", "macs", "params", "seconds", "speedup", "ideal_speedup", "accuracy", "fd", "psnr"):
            assert key in row, key
        assert row["seconds"] > 0 and row["macs"] > 0 and row["params"] > 0
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
    assert "| mosaic |" in table and "Ranked by PSNR" in table


def test_bench_rejects_bad_values_clearly(tmp_path):
    done = run_cli("bench", "--sparsity", "0.95", "--out", str(tmp_path))
    assert done.returncode == 2 and "0.95" in done.stderr and "Traceback" not in done.stderr
