"""Plans: build, serialise, and the `plan` command line (good output, one-line errors)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mosaic_core.divide.plan import Plan, build_plan
from mosaic_core.divide.stages import STAGE_NAMES
from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
TOP_KEYS = {
    "model", "scheduler", "num_inference_steps", "M", "lam", "cx", "mode", "stages", "overall_sparsity",
    "requested_sparsity", "macs_dense", "macs_staged", "ideal_speedup", "timesteps", "step_stages",
}
STAGE_KEYS = {"name", "t_min", "t_max", "num_steps", "sparsity", "requested_sparsity", "heads_kept", "units_kept"}


def run_plan_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mosaic_core", "plan", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def digits_plan() -> Plan:
    return build_plan("digits-dit", sparsity=0.3)


def test_plan_matches_the_reference_and_round_trips_through_json(digits_plan):
    data = digits_plan.to_dict()
    assert TOP_KEYS <= set(data)
    assert [stage["name"] for stage in data["stages"]] == list(STAGE_NAMES)
    assert all(STAGE_KEYS <= set(stage) for stage in data["stages"])
    assert [(s["t_min"], s["t_max"]) for s in data["stages"]] == [(569, 999), (103, 568), (0, 102)]
    assert [s["num_steps"] for s in data["stages"]] == [21, 23, 6]
    assert data["mode"] == "auto" and data["requested_sparsity"] == pytest.approx(0.3)
    assert len(data["timesteps"]) == len(data["step_stages"]) == 50
    again = Plan.from_dict(json.loads(json.dumps(data)))
    assert again == digits_plan
    assert again.to_dict() == data


def test_plan_exposes_stage_of_and_a_recomputable_curve(digits_plan):
    np.testing.assert_array_equal(digits_plan.stage_of(digits_plan.timesteps), digits_plan.step_stages)
    curve = digits_plan.curve()
    assert curve.num_train_timesteps == 1000 and curve.lam == digits_plan.lam
    assert digits_plan.macs_staged < digits_plan.macs_dense
    assert digits_plan.ideal_speedup == pytest.approx(digits_plan.macs_dense / digits_plan.macs_staged)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' own numpy-2 warning (DPM)
def test_modes():
    dense = build_plan("digits-dit")
    assert dense.mode == "auto" and dense.macs_staged == dense.macs_dense and dense.overall_sparsity == 0.0
    uniform = build_plan("digits-dit", sparsity=0.3, uniform=True)
    assert uniform.mode == "uniform" and len(set(uniform.allocation.achieved)) == 1
    manual = build_plan("digits-dit", stage_sparsity=(0.5, 0.1, 0.4), scheduler="dpm", num_inference_steps=20)
    assert manual.mode == "manual" and manual.allocation.requested == (0.5, 0.1, 0.4)
    assert sum(manual.step_counts) == 20
    wider = build_plan("digits-dit", sparsity=0.3, M=0.3)  # a lower threshold widens the middle
    assert wider.bounds.middle[0] < dense.bounds.middle[0] and wider.bounds.middle[1] > dense.bounds.middle[1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparsity=0.3, stage_sparsity=(0.1, 0.1, 0.1)), "not both"),
        (dict(stage_sparsity=(0.1, 0.1, 0.1), uniform=True), "uniform"),
        (dict(stage_sparsity=(0.1, 0.1)), "exactly 3 values"),
        (dict(M=1.0), r"M must be in \(0, 1\)"),
        (dict(lam=float("nan")), "lam"),
        (dict(num_inference_steps=0), r"steps must be in \[1, 1000\], got 0"),
        (dict(scheduler="heun"), "unknown scheduler 'heun'"),
    ],
)
def test_build_plan_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_plan("digits-dit", **kwargs)


def test_from_dict_refuses_a_malformed_dict(digits_plan):
    data = digits_plan.to_dict()
    del data["stages"]
    with pytest.raises(ValueError, match="stages"):
        Plan.from_dict(data)


@pytest.mark.slow  # a real process: the `python -m mosaic_core` entry point itself
def test_cli_json_prints_one_object_with_the_keys():
    """The real `python -m mosaic_core` entry point, in its own process."""
    result = run_plan_process("--model", "digits-dit", "--sparsity", "0.3", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)  # exactly one JSON document
    assert TOP_KEYS <= set(data)
    assert [stage["name"] for stage in data["stages"]] == list(STAGE_NAMES)
    assert all(STAGE_KEYS <= set(stage) for stage in data["stages"])


def test_cli_table(capsys):
    """The readable table (in-process: a second subprocess would re-import torch for nothing)."""
    from mosaic_core.cli import main

    assert main(["plan", "--model", "facebook/DiT-XL-2-256", "--stage-sparsity", "0.5,0.1,0.4"]) == 0
    table = capsys.readouterr().out
    for word in ("early", "middle", "late", "103-568", "5.71 T", "speed-up", "14/16"):
        assert word in table


@pytest.mark.parametrize(
    "args, bad",
    [
        (["--M", "1.5"], "1.5"),
        (["--M", "0"], "0.0"),
        (["--lam", "nan"], "nan"),
        (["--lam", "inf"], "inf"),
        (["--sparsity", "0.95"], "0.95"),
        (["--sparsity", "-0.1"], "-0.1"),
        (["--stage-sparsity", "0.1,0.2,1.2"], "1.2"),
        (["--stage-sparsity", "0.1,0.2"], "0.1,0.2"),
        (["--stage-sparsity", "a,b,c"], "a,b,c"),
        (["--steps", "0"], "got 0"),
        (["--model", "no-such-model"], "no-such-model"),
        (["--cx", "-1"], "-1.0"),
        (["--scheduler", "heun"], "heun"),
        (["--sparsity", "0.3", "--stage-sparsity", "0.1,0.1,0.1"], "--sparsity"),
    ],
)
def test_cli_bad_input_is_one_clear_line(args, bad):
    result = run_cli("plan", *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert bad in lines[0]
    assert result.stdout == ""
