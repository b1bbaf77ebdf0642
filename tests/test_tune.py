"""Budget tuner: the Pareto filter against exhaustive domination, and `tune` end to end on a tiny DiT."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaic_core.conquer.tune import check_budget, pareto_front


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=12))
def test_pareto_front_is_exactly_the_undominated_points(pairs):
    macs, quality = [float(a) for a, _ in pairs], [float(b) for _, b in pairs]

    def dominated(i):
        return any(
            macs[j] <= macs[i] and quality[j] >= quality[i] and (macs[j] < macs[i] or quality[j] > quality[i])
            for j in range(len(pairs))
        )

    front = pareto_front(macs, quality)
    undominated = [i for i in range(len(pairs)) if not dominated(i)]
    # every front point is undominated, and every undominated (macs, quality) value is on the front once
    assert all(not dominated(i) for i in front)
    assert {(macs[i], quality[i]) for i in front} == {(macs[i], quality[i]) for i in undominated}
    assert [macs[i] for i in front] == sorted(macs[i] for i in front)


def test_budget_is_checked():
    with pytest.raises(ValueError, match=r"budget must be a fraction of the dense MACs in \(0, 1\]"):
        check_budget(0.0)
    with pytest.raises(ValueError, match="budget must be"):
        check_budget(1.5)


@pytest.mark.slow
def test_tune_cli_end_to_end(tiny_pixel_folder, tmp_path, capsys):
    from mosaic_core.cli import main

    out = tmp_path / "tune.json"
    code = main([
        "tune", "--model", str(tiny_pixel_folder), "--steps", "10", "--steps-grid", "4,6,8,10", "--budget", "0.5",
        "--calib-size", "8", "--calib-batch-size", "8", "--images", "2", "--device", "cpu", "--json", "--out", str(out),
    ])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    assert printed["points"] == written["points"]
    points = written["points"]
    kinds = {(p["steps"], p["allocation"]) for p in points}
    # 4 steps fit dense (0.4 of the MACs); 6, 8 and 10 need pruning, with either allocation
    assert {(4, "dense"), (6, "paper"), (6, "measured"), (10, "measured")} <= kinds
    assert (4, "paper") not in kinds
    chosen = points[written["chosen"]]
    assert chosen["macs_fraction"] <= 0.5
    assert chosen["psnr"] == max(p["psnr"] for p in points if p["macs_fraction"] <= 0.5)
    front = [points[i] for i in written["front"]]
    for p in front:  # no point of the front is dominated by any candidate
        assert not any(
            q["macs"] <= p["macs"] and q["psnr"] >= p["psnr"] and (q["macs"] < p["macs"] or q["psnr"] > p["psnr"]) for q in points
        )
    for p in points:  # the pruned points meet the budget (the plan is raised to fit, the measured rule keeps its MACs)
        if p["allocation"] != "dense":
            assert p["macs_fraction"] <= 0.5 + 1e-9
    dense_10 = next(p for p in points if p["steps"] == 10 and p["allocation"] == "dense")
    assert dense_10["psnr"] == 100.0  # the reference itself (capped)


def test_tune_takes_the_models_own_step_count_without_steps(tiny_pixel_folder, tmp_path, monkeypatch):
    """`tune` without --steps used 50 for every model; it takes the model's own count, as `plan` does."""
    from conftest import run_cli, with_default_steps

    with_default_steps(monkeypatch, 8)
    done = run_cli("tune", "--model", str(tiny_pixel_folder), "--budget", "0.5", "--steps-grid", "4", "--methods", "dense",
                   "--images", "1", "--device", "cpu", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["reference_steps"] == 8
    assert [(p["steps"], p["macs_fraction"]) for p in result["points"]] == [(4, 0.5)]  # 4 of 8 dense steps


def test_best_at_this_budget_fills_the_controls_from_the_chosen_point():
    from ui.jobs import DONE, JobStatus
    from ui.prune_tab import TuneHandlers

    point = dict(steps=20, allocation="measured", sparsity=0.5, macs=1.0, macs_fraction=0.49, recorded_error=1.0,
                 psnr=30.0, seconds=0.1, stage_sparsity=[0.55, 0.2, 0.95])
    dense = dict(point, steps=10, allocation="dense", sparsity=0.0, macs_fraction=0.2, psnr=20.0, stage_sparsity=[0, 0, 0])
    result = dict(budget=0.5, reference_steps=50, images=4, points=[dense, point], front=[0, 1], chosen=1, seconds=1.0,
                  model="digits-dit", sampler="ddim")
    figure, note, steps, drop, per_stage, early, middle, late, allocation, replan, reference, memory = TuneHandlers.render(
        JobStatus("tune-1", "tune", DONE, result=result)
    )
    # what the next tuning reads: it keeps the reference 50 while the plan holds the chosen 20 steps
    assert memory == {"model": "digits-dit", "sampler": "ddim", "steps": 20, "reference_steps": 50}
    assert steps["value"] == 20 and drop["value"] == 0 and per_stage["value"] is True and allocation["value"] == "measured"
    assert replan["value"].startswith("tune-1 ")  # a new value per job: the Divide section re-plans on its change
    assert reference["value"] == "tune-1 50"  # Compare's dense reference: the steps the point was scored against
    assert "Compare samples dense at the tuner's 50 steps" in note
    assert (early["value"], middle["value"], late["value"]) == (0.55, 0.2, 0.9)  # a slider holds at most 0.9
    assert "20 steps, measured" in note
    traces = {trace["name"]: trace for trace in json.loads(figure.plot)["data"]}
    assert traces["Pareto front"]["x"] == [0.2, 0.49] and traces["chosen"]["y"] == [30.0]


def test_a_chosen_dropped_steps_point_fills_the_reference_steps_and_the_dropped_steps_box():
    """45 of 50 steps kept: the Steps box holds the 50 reference steps the kept ones are a subset of,
    the Dropped steps box 5, so the plan (and Prune, Compare) replay exactly that point."""
    from ui.jobs import DONE, JobStatus
    from ui.prune_tab import TuneHandlers

    point = dict(steps=45, drop_steps=5, allocation="measured+drop", sparsity=0.22, macs=1.0, macs_fraction=0.699,
                 recorded_error=1.0, psnr=45.0, seconds=0.1, stage_sparsity=[0.3, 0.05, 0.25])
    result = dict(budget=0.7, reference_steps=50, images=4, points=[point], front=[0], chosen=0, seconds=1.0,
                  model="digits-dit", sampler="ddim")
    _, note, steps, drop, per_stage, early, middle, late, allocation, replan, reference, memory = TuneHandlers.render(
        JobStatus("tune-2", "tune", DONE, result=result)
    )
    assert (steps["value"], drop["value"], allocation["value"]) == (50, 5, "measured")
    assert (early["value"], middle["value"], late["value"]) == (0.3, 0.05, 0.25)
    assert "45 of 50 steps (5 dropped evenly), measured+drop" in note
    assert "Compare samples dense" not in note  # the Steps box already holds the reference
    assert memory["steps"] == memory["reference_steps"] == 50 and reference["value"] == "tune-2 50"
    # the controls as filled plan the point the tuner costed: 45 kept steps, 5 dropped
    from mosaic_core.requests import PlanRequest

    plan = PlanRequest.from_controls(
        "digits-dit", "", "ddim", steps["value"], 0.55, 0.01, 1.0, 0.0, True, early["value"], middle["value"], late["value"],
        None, drop["value"],
    ).plan()
    assert (plan.num_inference_steps, plan.drop_steps, len(plan.step_stages)) == (50, 5, 45)


def test_the_studio_tunes_dropped_steps_only_with_ddim():
    from ui.prune_tab import methods_for_sampler

    every = ("dense", "paper", "measured", "drop", "measured+drop")
    assert methods_for_sampler(every, "ddim", named=True) == every
    assert methods_for_sampler(every, "dpm", named=False) == ("dense", "paper", "measured")  # the page's boxes, defaults
    with pytest.raises(ValueError, match=r"tuner methods drop, measured\+drop jump DDIM over dropped steps: they need the ddim sampler, got 'dpm'"):
        methods_for_sampler(("dense", "measured+drop"), "dpm", named=True)  # the API's methods, named
    assert methods_for_sampler(("dense", "measured"), "flow-euler", named=True) == ("dense", "measured")


def test_the_tuner_chart_spans_the_candidates_not_the_references_capped_psnr():
    """The dense run at the reference steps scores the metric's cap (100 dB, identical images); the
    y axis must span the candidates (here 20-30 dB) so their differences stay visible."""
    from ui.charts import tune_front_figure

    base = dict(allocation="measured", sparsity=0.5, macs=1.0, recorded_error=1.0, seconds=0.1, stage_sparsity=[0.5, 0.2, 0.9])
    points = [
        dict(base, steps=10, allocation="dense", sparsity=0.0, macs_fraction=0.2, psnr=20.0),
        dict(base, steps=20, macs_fraction=0.49, psnr=30.0),
        dict(base, steps=50, allocation="dense", sparsity=0.0, macs_fraction=1.0, psnr=100.0),  # the reference
    ]
    result = dict(budget=0.5, reference_steps=50, points=points, front=[0, 1, 2], chosen=1)
    layout = tune_front_figure(result).to_plotly_json()["layout"]
    low, high = layout["yaxis"]["range"]
    assert low < 20.0 and 30.0 < high < 40.0
    assert any("dense at 50 steps" in a["text"] for a in layout["annotations"])
    # without a reference point among them, plotly's own range (none set)
    del points[2]
    result["front"] = [0, 1]
    assert "range" not in tune_front_figure(result).to_plotly_json()["layout"]["yaxis"]


@pytest.mark.slow
def test_retuning_at_another_budget_reuses_the_analyses_and_the_dense_runs(tiny_pixel_folder):
    from mosaic_core.conquer.tune import tune
    from mosaic_core.models.loading import load_model
    from mosaic_core.prune.calibration import CalibrationConfig
    from mosaic_core.prune.stage_pruning import PruneConfig

    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    config = PruneConfig(CalibrationConfig(size=8, batch_size=8, source="samples", sample_steps=4))
    analyses, memo, messages = {}, {}, []
    kwargs = dict(reference_steps=8, steps_grid=(4, 8), images=2, analyses=analyses, memo=memo)
    first = tune(loaded, 0.7, config, **kwargs)
    keys = set(analyses)
    second = tune(loaded, 0.6, config, on_progress=messages.append, **kwargs)
    assert set(analyses) == keys  # no new Hessians
    assert not any(m.startswith("dense") for m in messages)  # the reference and fewer-steps runs are remembered
    assert [p for p in second.points if p.allocation == "dense"] == [p for p in first.points if p.allocation == "dense"]
    chosen = second.points[second.chosen]
    assert chosen.macs_fraction <= 0.6


@pytest.mark.slow
def test_every_method_meets_the_budget_and_its_point_can_be_rebuilt(tiny_pixel_folder):
    """Each method's candidate fits the budget, and `candidate_denoiser` rebuilds exactly the images it was scored on."""
    import numpy as np

    from mosaic_core.conquer.metrics import mean_psnr
    from mosaic_core.conquer.sampling import SampleConfig, labels_for, run_to_end, sample_loaded
    from mosaic_core.conquer.tune import METHODS, candidate_denoiser, tune
    from mosaic_core.models.loading import load_model
    from mosaic_core.prune.calibration import CalibrationConfig
    from mosaic_core.prune.stage_pruning import PruneConfig

    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    config = PruneConfig(CalibrationConfig(size=8, batch_size=8, source="samples", sample_steps=4))
    analyses: dict = {}
    common = dict(M=0.55, lam=0.01, scheduler="ddim", cx=1.0)
    result = tune(loaded, 0.6, config, reference_steps=8, steps_grid=(4, 6, 8), images=2, analyses=analyses,
                  methods=METHODS, guidance_scale=1.5, cfg_grid=(1.0,), cfg_top=1, **common)
    kinds = {p.allocation for p in result.points}
    assert {"dense", "cache", "paper", "measured", "measured+cache", "measured+cache-dit", "drop", "measured+drop"} <= kinds
    for p in result.points:
        assert (p.drop_steps > 0) == (p.allocation in ("drop", "measured+drop")) and p.steps + p.drop_steps <= 8
        if p.allocation not in ("dense", "drop"):  # fewer steps, either form, are listed at every count
            assert p.macs_fraction <= 0.6 + 1e-12, p
        assert (p.cache is not None) == p.allocation.endswith("cache")
        assert (p.cache_dit is not None) == (p.allocation == "measured+cache-dit")
    retried = [p for p in result.points if p.guidance_scale == 1.0]
    assert len(retried) == 1  # the best one, again at the other scale of the grid

    labels = labels_for(2, loaded.spec.num_classes)
    reference = run_to_end(sample_loaded(loaded, labels, SampleConfig(8, 1.5, "ddim", 0))).images
    for method in ("cache", "measured", "measured+cache", "measured+cache-dit", "drop", "measured+drop"):
        point = next(p for p in result.points if p.allocation == method and p.guidance_scale == 1.5)
        denoiser = candidate_denoiser(loaded, point, config, analyses=analyses, **common)
        replay = SampleConfig(point.steps + point.drop_steps, point.guidance_scale, "ddim", 0, drop_steps=point.drop_steps)
        images = run_to_end(sample_loaded(loaded, labels, replay, transformer=denoiser)).images
        assert mean_psnr(images, reference) == pytest.approx(point.psnr, abs=1e-9), method
    assert np.isfinite([p.psnr for p in result.points]).all()


def test_tuner_methods_are_checked():
    from mosaic_core.conquer.tune import check_methods

    assert check_methods("measured,dense") == ("dense", "measured")  # in the tuner's order
    with pytest.raises(ValueError, match=r"tuner methods must be some of dense, cache, paper, measured, measured\+cache, measured\+cache-dit, drop, measured\+drop, got speed"):
        check_methods(["speed"])
    with pytest.raises(ValueError, match="got none"):
        check_methods("")


def test_the_comparison_history_joins_and_stars_its_front():
    from ui.compare_tab import AXES, history_figure

    def run(n, speedup, seconds, psnr, ideal):
        return dict(job=f"c{n}", run=n, variant="all stages", label=f"#{n}", settings="s", seconds=seconds, dense_seconds=2.0,
                    speedup=speedup, ideal_speedup=ideal, psnr=psnr, ssim=0.9, accuracy=None)

    # #2 is dominated on speed (slower and further from dense than #1); on MACs (1/ideal) #3 is
    # dominated by #1 (0.5 of the MACs at 30 dB beats 0.7 at 28 dB); an entry of an earlier version has no macs_fraction
    history = [run(1, 1.5, 1.3, 30.0, 2.0), run(2, 1.2, 1.6, 29.0, 1.25), run(3, 2.0, 1.0, 28.0, 1 / 0.7)]
    by_axis = {}
    for axis in AXES:
        traces = {t["name"]: t for t in json.loads(history_figure(history, axis).to_json())["data"]}
        by_axis[axis] = traces
    assert by_axis[AXES[0]]["front (no run cheaper and closer)"]["x"] == [1.5, 2.0]
    assert by_axis[AXES[1]]["front (no run cheaper and closer)"]["x"] == [1.0, 1.3]
    assert "front (no run cheaper and closer)" not in by_axis[AXES[2]]  # one run alone on the front: nothing to join
    labels = by_axis[AXES[0]]["all stages"]["text"]
    assert labels == ["#1 ★", "#2", "#3 ★"]
    macs_labels = by_axis[AXES[2]]["all stages"]["text"]
    assert macs_labels == ["#1 ★", "#2", "#3"]


def test_quality_model_recovers_the_curve_it_was_drawn_from():
    """Rows drawn from MSE = MSE_dense + κ·E^α (α, log κ on the fit's grid) give back α and κ, residual ~0."""
    import numpy as np

    from mosaic_core.conquer.tune import fit_quality

    rng = np.random.default_rng(0)
    steps = rng.integers(10, 50, 12)
    dense = rng.uniform(30.0, 45.0, 12)
    error = rng.uniform(1.0, 200.0, 12)
    alpha, kappa = 1.25, 10.0**-4.5
    sampled = -10.0 * np.log10(10.0 ** (-dense / 10.0) + kappa * error**alpha)
    model = fit_quality(list(zip(steps, dense, error, sampled)))
    assert model.alpha == 1.25 and model.log_kappa == pytest.approx(-4.5, abs=1e-6)
    assert model.rmse < 1e-6 and model.count == 12
    # no error predicts the dense model at those steps; more error, lower PSNR
    assert model.psnr(40.0, 0.0) == pytest.approx(40.0)
    assert model.psnr(40.0, 10.0) > model.psnr(40.0, 100.0)
    # too few rows, or one step count only: no model
    assert fit_quality(list(zip(steps, dense, error, sampled))[:3]) is None
    assert fit_quality([(20, d, e, s) for d, e, s in zip(dense, error, sampled)]) is None


@pytest.mark.parametrize("rho", [-0.4, 0.3])
def test_quality_model_recovers_how_the_two_errors_interact(rho):
    """Rows whose pruned and fewer-steps errors are correlated vectors give back ρ; the fit with ρ
    forced to 0 cannot match them.

    The reference is built from images, not from the model's formula: each row's pruned image
    is dense + a + b, with a the fewer-steps error and b the pruning error, b drawn with
    correlation ρ to a and E chosen so that ‖b‖² = κ·E^α."""
    import numpy as np

    from mosaic_core.conquer.tune import fit_quality

    rng = np.random.default_rng(1)
    pixels = 200_000
    alpha, kappa = 1.5, 10.0**-5.0
    rows = []
    for steps, dense_psnr, error in zip(rng.integers(10, 50, 14), rng.uniform(30.0, 40.0, 14), rng.uniform(2.0, 150.0, 14)):
        a = rng.standard_normal(pixels)
        a *= np.sqrt(10.0 ** (-dense_psnr / 10.0) / np.mean(a * a))  # ‖a‖² = MSE of the dense run at these steps
        noise = rng.standard_normal(pixels)
        noise -= a * (noise @ a) / (a @ a)  # orthogonal to a
        unit_a, unit_noise = a / np.sqrt(np.mean(a * a)), noise / np.sqrt(np.mean(noise * noise))
        b = np.sqrt(kappa * error**alpha) * (rho * unit_a + np.sqrt(1 - rho**2) * unit_noise)
        rows.append((int(steps), float(dense_psnr), float(error), float(-10 * np.log10(np.mean((a + b) ** 2)))))
    model = fit_quality(rows)
    assert model.rho == pytest.approx(rho) and model.alpha == 1.5 and model.log_kappa == pytest.approx(-5.0, abs=0.051)
    assert model.rmse < 0.05
    # with the errors forced independent, the best fit leaves a residual the interaction explains
    independent = min(
        np.sqrt(np.mean([(model_psnr - r[3]) ** 2 for model_psnr, r in zip(
            [-10 * np.log10(10 ** (-r[1] / 10) + 10 ** lk * r[2] ** a) for r in rows], rows)]))
        for a in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0) for lk in np.arange(-8.0, -2.0, 0.05)
    )
    assert independent > 5 * model.rmse


@pytest.mark.slow
def test_retune_predicts_what_an_exhaustive_tune_measures_and_samples_at_most_check(tiny_pixel_folder):
    """At a second budget the pruned candidates are predicted: their recorded errors and MACs equal those of the
    networks an exhaustive tune builds, at most `check` are sampled (and then equal the exhaustive points), the
    front and the choice use sampled points only, and a revisited budget samples nothing."""
    from mosaic_core.conquer.tune import tune
    from mosaic_core.models.loading import load_model
    from mosaic_core.prune.calibration import CalibrationConfig
    from mosaic_core.prune.stage_pruning import PruneConfig

    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    config = PruneConfig(CalibrationConfig(size=8, batch_size=8, source="samples", sample_steps=4))
    analyses, memo = {}, {}
    kwargs = dict(reference_steps=8, steps_grid=(4, 5, 6, 7, 8), images=2, analyses=analyses, methods=("dense", "paper", "measured"))
    first = tune(loaded, 0.6, config, memo=memo, **kwargs)
    assert not any(p.predicted for p in first.points)  # nothing to fit yet: every candidate sampled
    messages = []
    second = tune(loaded, 0.45, config, memo=memo, check=1, on_progress=messages.append, **kwargs)
    exhaustive = tune(loaded, 0.45, config, memo={}, check=0, **kwargs)
    assert not any(p.predicted for p in exhaustive.points)
    assert set(second.quality_models) == {"paper", "measured"}
    by_kind = {(p.steps, p.allocation): p for p in exhaustive.points}
    assert {(p.steps, p.allocation) for p in second.points} == set(by_kind)
    predicted = [p for p in second.points if p.predicted]
    sampled_now = [m for m in messages if not m.startswith("dense")]
    assert predicted and len(sampled_now) <= 1
    for p in second.points:
        reference = by_kind[(p.steps, p.allocation)]
        assert p.recorded_error == pytest.approx(reference.recorded_error, rel=1e-9)
        assert (p.macs, p.stage_sparsity, p.target_sparsity) == (reference.macs, reference.stage_sparsity, reference.target_sparsity)
        if not p.predicted:
            assert p.psnr == reference.psnr
    assert all(not second.points[i].predicted for i in second.front)
    assert not second.points[second.chosen].predicted and second.points[second.chosen].macs_fraction <= 0.45
    # back to the first budget: every point is remembered, nothing is sampled, the result is the same
    messages.clear()
    again = tune(loaded, 0.6, config, memo=memo, on_progress=messages.append, **kwargs)
    assert messages == [] and again.points == first.points and again.chosen == first.chosen


def test_reuse_model_recovers_the_reuse_error_it_was_drawn_from():
    """Rows drawn from the measured model plus R = 10^λ·(c/L)^a·(I − 1)^b·(n/N₀)^g (values on the fit's
    grid) give back λ, a, b and g with residual ~0; too few rows, one interval or no measured model: none."""
    import numpy as np

    from mosaic_core.conquer.tune import QualityModel, fit_reuse

    measured = QualityModel(alpha=1.5, log_kappa=-6.0, rmse=0.5, count=9, rho=-0.3)
    rng = np.random.default_rng(2)
    rows = []
    for _ in range(16):
        steps, dense_psnr = int(rng.integers(10, 51)), float(rng.uniform(30.0, 45.0))
        error = float(rng.choice([0.0, rng.uniform(1.0, 30.0)]))  # cache (dense network) and measured+cache rows
        interval, keep_first = int(rng.integers(2, 6)), int(rng.integers(1, 3))
        cache = (interval, keep_first, int(rng.integers(1, 6 - keep_first)))
        share = (6 - cache[1] - cache[2]) / 6
        pruned = 10.0 ** (-measured.psnr(dense_psnr, error) / 10.0)
        reuse = 10.0**-3.5 * share**1.5 * (interval - 1) ** 2.0 * (steps / 50) ** -0.5
        rows.append((steps, dense_psnr, error, cache, float(-10.0 * np.log10(pruned + reuse))))
    model = fit_reuse(rows, measured, num_blocks=6, reference_steps=50)
    assert (model.share_exponent, model.interval_exponent, model.steps_exponent) == (1.5, 2.0, -0.5)
    assert model.log_reuse == pytest.approx(-3.5, abs=1e-6) and model.rmse < 1e-6 and model.count == 16
    assert (model.alpha, model.log_kappa, model.rho) == (1.5, -6.0, -0.3)  # the measured model's, unchanged
    # reuse only ever costs: below the pruned network alone, and lower the longer the interval
    assert model.psnr(40.0, 5.0, (2, 1, 1), 40) < measured.psnr(40.0, 5.0)
    assert model.psnr(40.0, 5.0, (5, 1, 1), 40) < model.psnr(40.0, 5.0, (3, 1, 1), 40)
    assert fit_reuse(rows[:3], measured, 6, 50) is None
    assert fit_reuse([r[:3] + ((3, 1, 1),) + r[4:] for r in rows], measured, 6, 50) is None
    assert fit_reuse(rows, None, 6, 50) is None


@pytest.mark.slow
def test_retune_predicts_the_reuse_candidates_as_the_networks_an_exhaustive_tune_builds(tiny_pixel_folder):
    """With `cache` and `measured+cache`, a second budget predicts those candidates too: each predicted point's
    reuse setting, MACs and recorded error equal those of the networks an exhaustive tune builds (the setting
    comes from the recorded removals, not from built networks), at most `check` are sampled, and the reuse
    model is reported for both methods."""
    from mosaic_core.conquer.tune import tune
    from mosaic_core.models.loading import load_model
    from mosaic_core.prune.calibration import CalibrationConfig
    from mosaic_core.prune.stage_pruning import PruneConfig

    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    config = PruneConfig(CalibrationConfig(size=8, batch_size=8, source="samples", sample_steps=4))
    analyses, memo = {}, {}
    kwargs = dict(reference_steps=8, steps_grid=(4, 5, 6, 7, 8), images=2, analyses=analyses,
                  methods=("dense", "cache", "measured", "measured+cache"))
    tune(loaded, 0.7, config, memo=memo, **kwargs)
    tune(loaded, 0.55, config, memo=memo, check=0, **kwargs)  # a second sampled budget: reuse points at several intervals
    messages = []
    second = tune(loaded, 0.45, config, memo=memo, check=1, on_progress=messages.append, **kwargs)
    exhaustive = tune(loaded, 0.45, config, memo={}, check=0, **kwargs)
    assert set(second.quality_models) == {"measured", "cache", "measured+cache"}
    assert second.quality_models["cache"] == second.quality_models["measured+cache"]
    by_kind = {(p.steps, p.allocation): p for p in exhaustive.points}
    assert {(p.steps, p.allocation) for p in second.points} == set(by_kind)
    predicted = [p for p in second.points if p.predicted and p.cache is not None]
    assert {p.allocation for p in predicted} == {"cache", "measured+cache"}
    assert len([m for m in messages if not m.startswith("dense")]) <= 1
    for p in second.points:
        reference = by_kind[(p.steps, p.allocation)]
        assert (p.cache, p.macs, p.target_sparsity, p.stage_sparsity) == (
            reference.cache, reference.macs, reference.target_sparsity, reference.stage_sparsity), p
        assert p.recorded_error == pytest.approx(reference.recorded_error, rel=1e-9)
        if not p.predicted:
            assert p.psnr == reference.psnr
    assert not second.points[second.chosen].predicted


def test_check_is_validated():
    from mosaic_core.conquer.tune import check_count

    assert check_count(0) == 0 and check_count(3) == 3
    for bad in (-1, 65, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"check must be a whole number of candidates to sample in \[0, 64\]"):
            check_count(bad)


@pytest.mark.slow
def test_tune_cli_several_budgets_predicts_the_later_ones(tiny_pixel_folder, tmp_path, capsys):
    from mosaic_core.cli import main

    out = tmp_path / "tune.json"
    code = main([
        "tune", "--model", str(tiny_pixel_folder), "--steps", "8", "--steps-grid", "4,5,6,7,8", "--budget", "0.6,0.45",
        "--methods", "dense,paper,measured", "--calib-size", "8", "--calib-batch-size", "8", "--images", "2", "--device", "cpu",
        "--json", "--out", str(out),
    ])
    assert code == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    written = json.loads(out.read_text())["results"]
    assert [r["budget"] for r in written] == [0.6, 0.45] and printed == written
    assert not any(p["predicted"] for p in written[0]["points"])  # nothing sampled before: every candidate sampled
    assert any(p["predicted"] for p in written[1]["points"]) and set(written[1]["quality_models"]) == {"paper", "measured"}
    assert not written[1]["points"][written[1]["chosen"]]["predicted"]


@pytest.mark.slow
def test_tune_cli_names_the_reuse_model_once_for_both_reuse_methods(tiny_pixel_folder, capsys):
    """The text table states the fit it predicted from: the reuse model once, for cache and measured+cache."""
    from mosaic_core.cli import main

    code = main([
        "tune", "--model", str(tiny_pixel_folder), "--steps", "8", "--steps-grid", "4,5,6,7,8", "--budget", "0.7,0.55,0.45",
        "--methods", "dense,cache,measured,measured+cache", "--calib-size", "8", "--calib-batch-size", "8", "--images", "2",
        "--device", "cpu", "--check", "1",
    ])
    assert code == 0
    last = capsys.readouterr().out.split("budget 0.45")[-1]
    legend = next(line for line in last.splitlines() if line.startswith("~ predicted"))
    assert "cache, measured+cache: MSE = D + P + 2·(" in legend and ")·√(D·P) + R, D = MSE_dense" in legend
    assert legend.count("R = 10^") == 1 and "measured: MSE = D + P" in legend
    assert any(line.startswith("~") and "measured+cache" in line for line in last.splitlines())


def test_tune_cli_rejects_a_bad_budget_list(capsys):
    from mosaic_core.cli import main

    with pytest.raises(SystemExit):
        main(["tune", "--budget", "0.5,1.5"])
    assert "--budget" in capsys.readouterr().err


def test_the_studio_draws_predicted_points_open_and_says_how_many():
    from ui.jobs import DONE, JobStatus
    from ui.prune_tab import TuneHandlers

    base = dict(macs=1.0, recorded_error=1.0, seconds=0.1, stage_sparsity=[0.3, 0.1, 0.5])
    points = [
        dict(base, steps=10, allocation="dense", sparsity=0.0, macs_fraction=0.2, psnr=20.0, stage_sparsity=[0, 0, 0]),
        dict(base, steps=20, allocation="measured", sparsity=0.5, macs_fraction=0.49, psnr=30.0, predicted=False),
        dict(base, steps=25, allocation="measured", sparsity=0.6, macs_fraction=0.48, psnr=29.0, predicted=True),
        dict(base, steps=25, allocation="paper", sparsity=0.6, macs_fraction=0.48, psnr=25.0, predicted=True),
    ]
    result = dict(budget=0.5, reference_steps=50, images=4, points=points, front=[0, 1], chosen=1, seconds=1.0)
    figure, note, *_ = TuneHandlers.render(JobStatus("tune-1", "tune", DONE, result=result))
    traces = {trace["name"]: trace for trace in json.loads(figure.plot)["data"]}
    assert traces["measured"]["x"] == [0.49] and traces["measured, predicted"]["y"] == [29.0]
    assert traces["measured, predicted"]["marker"]["symbol"] == "circle-open"
    assert traces["paper, predicted"]["y"] == [25.0] and traces["paper"]["x"] == []
    assert "2 of 4 candidates predicted" in note


@pytest.mark.slow
def test_the_studios_sampled_points_survive_a_restart_and_a_bad_file_is_resampled(tiny_pixel_folder, tmp_path):
    from mosaic_core.conquer.tune import load_memo_points
    from mosaic_core.divide.plan import build_plan
    from mosaic_core.prune.calibration import CalibrationConfig
    from mosaic_core.prune.stage_pruning import PruneConfig
    from ui.engine import StudioEngine

    def engine():
        return StudioEngine(cache_root=tmp_path / "cache", local_model_roots=[tiny_pixel_folder.parent])

    first = engine()
    spec = first.resolve(str(tiny_pixel_folder))
    plan = build_plan(spec, 8)
    config = PruneConfig(CalibrationConfig(size=8, batch_size=8, source="samples", sample_steps=4))
    tuned = first.tune(spec, 0.6, plan, config)
    (saved,) = (tmp_path / "cache" / "tune").glob("*.json")
    kept = load_memo_points(saved)
    assert {p for p in kept.values()} >= {p for p in tuned.points}  # every point of the result, as it was
    messages: list = []
    second = engine().tune(spec, 0.45, plan, config, on_progress=messages.append)  # a new process, the same cache
    assert any(p.predicted for p in second.points)
    assert not [m for m in messages if m.startswith("dense,")]  # the fewer-steps points came from the file
    saved.write_text("{not json")
    messages.clear()
    again = engine().tune(spec, 0.45, plan, config, on_progress=messages.append)
    assert [m for m in messages if m.startswith("dense,")] and not any(p.predicted for p in again.points)
    assert load_memo_points(saved)  # rewritten whole
    other = tmp_path / "other.json"
    other.write_text('{"format": 99, "entries": []}')
    assert load_memo_points(other) == {} and load_memo_points(tmp_path / "missing.json") == {}


@pytest.mark.slow
def test_tune_cli_cache_keeps_hessians_and_points_for_the_next_command(tiny_pixel_folder, tmp_path, capsys):
    from mosaic_core.cli import main

    cache = tmp_path / "cache"
    common = ["tune", "--model", str(tiny_pixel_folder), "--steps", "8", "--steps-grid", "4,5,6,7,8", "--methods", "dense,paper,measured",
              "--calib-size", "8", "--calib-batch-size", "8", "--images", "2", "--device", "cpu", "--json", "--cache", str(cache)]
    assert main(common + ["--budget", "0.6"]) == 0
    first = json.loads(capsys.readouterr().out)
    analyses = sorted(p.name for p in (cache / "analyses").iterdir())
    assert analyses and len(list((cache / "tune").glob("*.json"))) == 1 and not any(p["predicted"] for p in first["points"])
    assert main(common + ["--budget", "0.45"]) == 0  # a new command: nothing in memory
    second = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in (cache / "analyses").iterdir()) == analyses  # no new Hessians were gathered
    assert any(p["predicted"] for p in second["points"]) and not second["points"][second["chosen"]]["predicted"]


def _pending_points(errors):
    from mosaic_core.conquer.tune import TunePoint

    return [TunePoint(40, "measured", 0.3, 1.0, 0.5, e, 0.0, 0.0, target_sparsity=0.3 + i / 100, predicted=True)
            for i, e in enumerate(errors)]


def test_check_seconds_bounds_the_candidates_checked_after_the_first():
    """A deadline already behind stops the checking after the first candidate and says how many it left;
    without a deadline the same candidates are all checked (`check` of them, best predicted first)."""
    import time

    from mosaic_core.conquer.tune import QualityModel, TunePoint, _check_predicted

    model = QualityModel(alpha=1.0, log_kappa=-3.0, rmse=0.5, count=6)
    dense = {(40, 0): 40.0}  # (steps, dropped reference steps) -> the dense PSNR over those steps
    sampled_before = [TunePoint(40, "dense", 0.0, 1.0, 0.5, 0.0, 10.0, 0.0)]  # a poor sampled point: every candidate may win

    def run(deadline):
        sampled = []

        def sample(point):
            time.sleep(0.01)  # a candidate costs time: the bound compares against the slowest so far
            sampled.append(point.target_sparsity)
            return TunePoint(**{**point.__dict__, "predicted": False, "psnr": 30.0})

        points, unchecked = _check_predicted(_pending_points([1e-4, 1e-3, 1e-2]), sampled_before, 3, 0.6,
                                             lambda: {"measured": model}, dense, sample, lambda message: None, deadline)
        return sampled, unchecked, points

    sampled, unchecked, points = run(None)
    assert sampled == [0.30, 0.31, 0.32] and unchecked == 0  # least recorded error first
    sampled, unchecked, points = run(time.perf_counter())  # the bound is already spent
    assert sampled == [0.30] and unchecked == 2
    assert [p.predicted for p in points] == [False, True, True] and len(points) == 3
    sampled, unchecked, _ = run(time.perf_counter() + 60.0)  # a bound far off changes nothing
    assert sampled == [0.30, 0.31, 0.32] and unchecked == 0


def test_check_seconds_is_validated(tiny_pixel_folder):
    from mosaic_core.conquer.tune import tune
    from mosaic_core.models.loading import load_model
    from mosaic_core.prune.stage_pruning import PruneConfig

    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    for bad in (0, -1.0, float("nan"), True, "3", 4000):
        with pytest.raises(ValueError, match=r"check_seconds must be a number of seconds in \(0, 3600\]"):
            tune(loaded, 0.5, PruneConfig(), reference_steps=4, check_seconds=bad)


def test_tune_cli_refuses_a_bad_check_seconds():
    from conftest import run_cli

    done = run_cli("tune", "--budget", "0.5", "--check-seconds", "0")
    assert done.returncode == 2 and "--check-seconds" in done.stderr and "0" in done.stderr and "Traceback" not in done.stderr


def test_cache_dit_is_refused_by_name_for_other_families_and_its_points_survive_the_memo_file(tmp_path):
    from torch import nn

    from mosaic_core.conquer.cache_dit_row import serves_cache_dit
    from mosaic_core.conquer.tune import TunePoint, load_memo_points, save_memo_points

    with pytest.raises(ValueError, match="measured\\+cache-dit needs diffusers' DiTTransformer2DModel .* denoiser is Linear"):
        serves_cache_dit(nn.Linear(2, 2), True, "measured+cache-dit")
    assert serves_cache_dit(nn.Linear(2, 2), False, "measured+cache-dit") is False  # among all methods: left out
    point = TunePoint(40, "measured+cache-dit", 0.2, 1.0e9, 0.48, 3.5, 39.8, 1.2, (0.3, 0.1, 0.2), 1.25,
                      target_sparsity=0.19, cache_dit=(0.075, 1, 0, 6))
    key = (("digits-dit", "abc", "ddim", 4, 0, 1.25), "point", (50,), 40, "measured+cache-dit", 0.19, 0.5, 1.25)
    path = tmp_path / "memo.json"
    assert save_memo_points({key: point}, path) == 1
    assert load_memo_points(path) == {key: point}


@pytest.mark.slow
def test_tune_keeps_hand_set_edges_in_every_candidate(tiny_pixel_folder):
    """`tune --edges` was accepted and ignored: every plan came from M. Each pruned candidate is
    now the plan `plan --edges` builds at its steps and sparsity."""
    from conftest import run_cli

    from mosaic_core.divide.plan import build_plan

    edges = (300, 800)
    done = run_cli("tune", "--model", str(tiny_pixel_folder), "--steps", "10", "--steps-grid", "10", "--budget", "0.6",
                   "--methods", "paper", "--edges", "300,800", "--calib-size", "8", "--calib-batch-size", "8",
                   "--images", "1", "--device", "cpu", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["edges"] == list(edges)
    (point,) = [p for p in result["points"] if p["allocation"] == "paper"]
    by_hand = build_plan(str(tiny_pixel_folder), 10, sparsity=point["target_sparsity"], edges=edges)
    from_M = build_plan(str(tiny_pixel_folder), 10, sparsity=point["target_sparsity"])
    assert by_hand.step_counts != from_M.step_counts  # the edges make a different plan than M's
    assert point["macs"] == pytest.approx(by_hand.macs_staged, rel=1e-9)
    assert point["stage_sparsity"] == pytest.approx(list(by_hand.allocation.achieved), abs=1e-9)
