"""Stage edges set by hand (docs/method.md §12.1): plan, serialisation, requests and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mosaic_core.divide.plan import Plan, build_plan, stage_only_plan
from mosaic_core.divide.stages import check_edges
from mosaic_core.requests import PlanRequest

MODEL = "digits-dit"


def _ddim_counts(low: int, high: int, steps: int = 50) -> tuple[int, int, int]:
    """(early, middle, late) steps of DDIM `leading` spacing, counted by hand: it visits k·(1000 // N)."""
    visited = np.arange(steps) * (1000 // steps)
    return int((visited > high).sum()), int(((visited >= low) & (visited <= high)).sum()), int((visited < low).sum())


def test_edges_set_the_stages_by_hand():
    plan = build_plan(MODEL, sparsity=0.3, edges=(150, 600))
    assert plan.bounds.ranges == ((601, 999), (150, 600), (0, 149))
    # DDIM-50 visits 0, 20, …, 980: late 0…140 (8), middle 160…600 (23), early 620…980 (19)
    assert plan.step_counts == (19, 23, 8) == _ddim_counts(150, 600)
    assert plan.edges_source == "manual" and plan.manual_edges == (150, 600)
    assert plan.overall_sparsity == pytest.approx(0.3, abs=1e-3)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' own numpy-2 warning (DPM)
@pytest.mark.parametrize("scheduler, steps", [("ddim", 20), ("dpm", 20), ("euler", 35), ("ddpm", 10)])
def test_hand_set_edges_remap_onto_any_sampler(scheduler, steps):
    """The edges are training timesteps: every sampler's steps fall into them by eq. 1.5."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    from conftest import LINEAR_SCHEDULER

    classes = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler, "ddpm": DDPMScheduler}
    config = dict(LINEAR_SCHEDULER, **({"timestep_spacing": "leading"} if scheduler == "euler" else {}))  # docs/method.md §6.5
    scheduler_object = classes[scheduler](**config)
    scheduler_object.set_timesteps(steps)
    visited = np.floor(scheduler_object.timesteps.numpy().astype(np.float64) + 0.5)
    expected = (int((visited > 500).sum()), int(((visited >= 200) & (visited <= 500)).sum()), int((visited < 200).sum()))
    plan = build_plan(MODEL, steps, sparsity=0.3, scheduler=scheduler, edges=(200, 500))
    assert plan.step_counts == expected and sum(expected) == steps


def test_edges_equal_to_Ms_give_Ms_plan_but_say_they_were_set_by_hand():
    by_M = build_plan(MODEL, sparsity=0.3, M=0.45)
    by_hand = build_plan(MODEL, sparsity=0.3, M=0.45, edges=by_M.bounds.middle)
    assert by_hand.allocation == by_M.allocation and by_hand.bounds == by_M.bounds
    assert by_M.edges_source == "M" and by_M.manual_edges is None and by_hand.edges_source == "manual"


def test_the_plan_dict_records_where_the_edges_came_from():
    manual = build_plan(MODEL, sparsity=0.3, edges=(0, 999))  # one stage holds every timestep
    data = manual.to_dict()
    assert data["edges_source"] == "manual"
    assert [(s["t_min"], s["t_max"]) for s in data["stages"]] == [(None, None), (0, 999), (None, None)]
    again = Plan.from_dict(json.loads(json.dumps(data)))
    assert again == manual and again.to_dict() == data
    assert "edges_source" not in build_plan(MODEL, sparsity=0.3).to_dict()  # old plans: same dict, same cache keys
    with pytest.raises(ValueError, match=r"edges_source must be one of M, manual, got 'hand'"):
        Plan.from_dict(dict(data, edges_source="hand"))


def test_pruning_one_stage_keeps_the_hand_set_edges():
    plan = build_plan(MODEL, sparsity=0.3, edges=(150, 600))
    only = stage_only_plan(MODEL, plan, 0)
    assert only.bounds == plan.bounds and only.edges_source == "manual"
    assert only.allocation.achieved[0] == pytest.approx(plan.allocation.achieved[0]) and only.allocation.achieved[1:] == (0, 0)


@pytest.mark.parametrize(
    "edges, shown",
    [
        ((600, 150), "got 600,150"),
        ((0, 1000), "got 0,1000"),
        ((-1, 5), "got -1,5"),
        ((1.5, 3), r"got \(1\.5, 3\)"),
        ((True, 3), r"got \(True, 3\)"),
        (("1", 3), r"got \('1', 3\)"),
        ((5,), r"got \(5,\)"),
        ((1, 2, 3), r"got \(1, 2, 3\)"),
        ("150,600", "got '150,600'"),
        ((float("nan"), 3), r"got \(nan, 3\)"),
    ],
)
def test_bad_edges_are_refused_naming_them(edges, shown):
    with pytest.raises(ValueError, match=r"stage edges must be 2 whole numbers LO,HI with 0 <= LO <= HI < 1000 .*" + shown):
        build_plan(MODEL, edges=edges)


def test_check_edges_accepts_whole_floats_and_numpy_integers():
    assert check_edges((np.int64(3), 7.0), 1000) == (3, 7)
    assert check_edges([10**30, 10**30], None) == (10**30, 10**30)  # T unknown: only the form is checked
    assert check_edges([600, 150], None) == (600, 150)  # the range waits for T, so that its message can give T


def test_requests_carry_the_edges():
    request = PlanRequest.from_values(MODEL, "ddim", 50, 0.55, 0.01, 0.3, None, 1.0, edges=[150, 600])
    assert request.edges == (150, 600) and request.to_dict()["edges"] == [150, 600]
    assert request.plan() == build_plan(MODEL, sparsity=0.3, edges=(150, 600))
    assert PlanRequest.from_values(MODEL).edges is None  # old callers: edges from M
    controls = (MODEL, "", "ddim", 50, 0.55, 0.01, 1.0, 0.3, False, 0, 0, 0)
    assert PlanRequest.from_controls(*controls).edges is None
    assert PlanRequest.from_controls(*controls, "").edges is None
    assert PlanRequest.from_controls(*controls, [150, 600]).edges == (150, 600)
    with pytest.raises(ValueError, match=r"stage edges must be 2 whole numbers LO,HI with 0 <= LO <= HI < 1000 .*got 600,150"):
        PlanRequest.from_values(MODEL, edges=[600, 150]).plan()
    with pytest.raises(ValueError, match=r"stage edges must be 2 whole numbers LO,HI with 0 <= LO <= HI < the model's training timesteps, got \(5,\)"):
        PlanRequest.from_values(MODEL, edges=(5,))  # the form is checked at once
    with pytest.raises(ValueError, match=r"< 1000 .*got 150,5000"):
        PlanRequest.from_values(MODEL, edges=[150, 5000]).plan()


def test_cli_edges(capsys):
    from mosaic_core.cli import main

    assert main(["plan", "--edges", "150,600", "--sparsity", "0.3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["edges_source"] == "manual"
    assert [(s["t_min"], s["t_max"], s["num_steps"]) for s in data["stages"]] == [(601, 999, 19), (150, 600, 23), (0, 149, 8)]
    assert main(["plan", "--edges", "150,600"]) == 0
    assert "edges set by hand" in capsys.readouterr().out


@pytest.mark.parametrize(
    "value, shown",
    [
        ("150", "got '150'"), ("a,b", "got 'a,b'"), ("1.5,3", "got '1.5,3'"), ("0,1000", "HI < 1000 (training timesteps), got 0,1000"),
        # out of order: the same message with T's value, never a literal "HI < T"
        ("600,150", "HI < 1000 (training timesteps), got 600,150"), ("900,100", "HI < 1000 (training timesteps), got 900,100"),
    ],
)
def test_cli_bad_edges_are_one_clear_line(capsys, value, shown):
    from mosaic_core.cli import main

    assert main(["plan", "--edges", value]) != 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "edges" in lines[0] and shown in lines[0]
    assert "< T" not in lines[0]
    assert captured.out == ""


@pytest.mark.slow
def test_a_checkpoint_keeps_hand_set_edges(tiny_pixel_folder, tmp_path):
    """Pruned with edges set by hand, saved, loaded: the same stage switch points and outputs."""
    import torch

    from mosaic_core.jobs import run_to_end
    from mosaic_core.models.loading import load_model
    from mosaic_core.prune.calibration import CalibrationConfig
    from mosaic_core.prune.checkpoint import load_pruned, read_manifest, save_pruned
    from mosaic_core.prune.stage_pruning import PruneConfig, prune_steps

    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    plan = build_plan(loaded.spec, num_inference_steps=10, sparsity=0.4, edges=(300, 700))
    config = PruneConfig(CalibrationConfig(size=16, batch_size=8, source="samples", sample_steps=4))
    result = run_to_end(prune_steps(loaded, plan, config))
    save_pruned(result, loaded, tmp_path / "pruned")
    manifest = read_manifest(tmp_path / "pruned")
    assert manifest["plan"]["edges_source"] == "manual"
    assert [(s["t_min"], s["t_max"]) for s in manifest["stages"]] == [(701, 999), (300, 700), (0, 299)]
    staged = load_pruned(tmp_path / "pruned", loaded)
    assert (staged.t_min, staged.t_max) == (300, 700)
    x, labels = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    with torch.no_grad():
        for t in (701, 700, 300, 299):
            timestep = torch.full((3,), t)
            assert torch.equal(staged(x, timestep, class_labels=labels).sample, result.staged(x, timestep, class_labels=labels).sample)
