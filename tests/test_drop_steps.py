"""Dropping reference steps: which steps run, the DDIM jump against diffusers' own DDIM step, and refusals."""

import numpy as np
import pytest
import torch

from conftest import LINEAR_SCHEDULER, run_cli, tiny_pixel_dit
from mosaic_core.conquer.sampling import SampleConfig, initial_noise, run_to_end, sample, sample_steps
from mosaic_core.models.samplers import kept_step_indices

SHAPE = (1, 8, 8)
SCHEDULER = {**LINEAR_SCHEDULER, "clip_sample": True}


@pytest.fixture(scope="module")
def model():
    return tiny_pixel_dit()


@pytest.mark.parametrize("steps", [2, 3, 10, 25, 50, 51])
def test_kept_steps_are_evenly_spread_reference_steps_with_first_and_last(steps):
    for drop in range(steps):
        kept = kept_step_indices(steps, drop)
        assert len(kept) == steps - drop
        assert kept[0] == 0 and (len(kept) == 1 or kept[-1] == steps - 1)
        gaps = np.diff(kept)
        assert (gaps >= 1).all()  # distinct, in order
        if len(kept) > 1:  # evenly: every gap is the mean gap rounded down or up
            mean = (steps - 1) / (len(kept) - 1)
            assert set(gaps.tolist()) <= {int(np.floor(mean)), int(np.ceil(mean))}


def test_dropping_two_of_ten_steps_jumps_like_diffusers_ddim_over_the_gaps(model):
    """10 steps at t = 900 … 0, drop 2: the kept steps 0,1,3,4,5,6,8,9 (by hand: round(linspace(0, 9, 8))).
    Where two reference steps are jumped (gap 200) diffusers' DDIM step takes the same jump when told
    it samples 5 steps, so the reference below is diffusers' arithmetic, not this project's."""
    from diffusers import DDIMScheduler

    noise = initial_noise(2, SHAPE, seed=5)
    events = []
    result = run_to_end(
        sample_steps(model, SCHEDULER, [3, 7], SampleConfig(10, 1.0, "ddim", 5, drop_steps=2), num_classes=10,
                     sample_shape=SHAPE, noise=noise),
        events.append,
    )
    kept = [900, 800, 600, 500, 400, 300, 100, 0]
    assert result.timesteps.tolist() == kept and len(events) == 8

    scheduler = DDIMScheduler(**SCHEDULER)
    scheduler.set_timesteps(10)
    x = noise.clone()
    with torch.no_grad():
        for t, to in zip(kept, kept[1:] + [-100]):
            eps = model(x, timestep=torch.tensor([t, t]), class_labels=torch.tensor([3, 7])).sample
            scheduler.num_inference_steps = 1000 // (t - to)  # diffusers' DDIM steps t -> t − 1000 / N
            out = scheduler.step(eps, torch.tensor(t), x)
            x = out.prev_sample
    torch.testing.assert_close(events[-1].latents, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(events[-1].pred_original, out.pred_original_sample, atol=1e-5, rtol=1e-5)
    full = sample(model, SCHEDULER, [3, 7], SampleConfig(10, 1.0, "ddim", 5), num_classes=10, sample_shape=SHAPE, noise=noise)
    assert not np.array_equal(result.images, full.images)  # the dropped steps changed something


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"drop_steps": 10}, r"drop_steps must be in \[0, 9\] \(at least one of the 10 steps runs\), got 10"),
        ({"drop_steps": -1}, r"got -1"),
        ({"drop_steps": 1.5}, r"drop_steps must be a whole number in \[0, 9\], got 1.5"),
        ({"drop_steps": 2, "scheduler": "dpm"}, r"dropping steps needs the ddim sampler .* got 'dpm'"),
        ({"drop_steps": 2, "scheduler": "euler"}, r"got 'euler'"),
    ],
)
def test_bad_drop_steps_are_refused_with_the_allowed_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SampleConfig(num_inference_steps=10, **kwargs)


def test_cli_drop_steps_writes_the_engines_images_and_refuses_other_samplers(tmp_path):
    out = tmp_path / "dropped.npz"
    result = run_cli("sample", "--steps", "10", "--drop-steps", "4", "--n", "2", "--seed", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    from mosaic_core.models.loading import load_model

    loaded = load_model("digits-dit", device="cpu")
    spec = loaded.spec
    expected = sample(loaded.transformer, loaded.scheduler_config, [0, 1], SampleConfig(10, spec.default_cfg, "ddim", 3, drop_steps=4),
                      num_classes=spec.num_classes, sample_shape=(spec.in_channels, spec.sample_size, spec.sample_size))
    np.testing.assert_array_equal(np.load(out)["images"], expected.images)

    refused = tmp_path / "refused.npz"
    result = run_cli("sample", "--steps", "10", "--drop-steps", "4", "--scheduler", "dpm", "--n", "2", "--out", str(refused))
    assert result.returncode == 2 and "needs the ddim sampler" in result.stderr and not refused.exists()


def test_a_plan_with_dropped_steps_counts_and_costs_only_the_kept_reference_steps():
    import json

    from mosaic_core.divide.plan import Plan, build_plan
    from mosaic_core.models.samplers import sampler_timesteps

    full = build_plan("digits-dit", 50, sparsity=0.22)
    dropped = build_plan("digits-dit", 50, sparsity=0.22, drop_steps=5)
    reference = sampler_timesteps("ddim", full.scheduler_config, 50)
    by_hand = [reference[i] for i in range(50) if i not in (5, 15, 25, 34, 44)]  # round(linspace(0, 49, 45)) skips these
    assert list(dropped.timesteps) == by_hand and dropped.num_inference_steps == 50
    assert sum(dropped.step_counts) == 45
    assert dropped.step_stages == tuple(full.step_stages[i] for i in range(50) if i not in (5, 15, 25, 34, 44))
    assert dropped.macs_dense * 50 == full.macs_dense * 45  # the dense cost of 45 of the 50 equal steps
    data = dropped.to_dict()
    assert data["drop_steps"] == 5 and "drop_steps" not in full.to_dict()  # plans of every step keep their dict
    assert Plan.from_dict(json.loads(json.dumps(data))).to_dict() == data

    result = run_cli("plan", "--sparsity", "0.22", "--drop-steps", "5", "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["drop_steps"] == 5 and printed["timesteps"] == [int(t) for t in by_hand]
    text = run_cli("plan", "--sparsity", "0.22", "--drop-steps", "5").stdout
    assert "50 steps (5 dropped evenly: 45 run)" in text and "against all 50 reference steps" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--drop-steps", "5", "--scheduler", "dpm"], "needs the ddim sampler"),
        (["--drop-steps", "50"], r"drop_steps must be in [0, 49]"),
        (["--drop-steps", "5", "--stages", "4"], "--drop-steps is planned for three stages"),
    ],
)
def test_plan_refuses_drop_steps_it_cannot_plan(args, message):
    result = run_cli("plan", *args)
    assert result.returncode == 2 and message in result.stderr


def test_the_tuner_prices_dropped_steps_by_the_kept_ones_and_keeps_them_to_ddim(tiny_pixel_folder):
    """measured+drop at n of N₀ steps costs the MACs its plan of the kept steps says, fits the budget,
    and its drop_steps say which subset it sampled; dpm leaves the drop methods out by default and
    refuses them when named."""
    from mosaic_core.conquer.tune import DEFAULT_METHODS, tune
    from mosaic_core.models.loading import load_model
    from mosaic_core.prune.calibration import CalibrationConfig
    from mosaic_core.prune.stage_pruning import PruneConfig

    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    config = PruneConfig(CalibrationConfig(size=8, batch_size=8, source="samples", sample_steps=4))
    analyses: dict = {}
    result = tune(loaded, 0.7, config, reference_steps=10, steps_grid=(6, 8, 10), images=2, analyses=analyses,
                  methods=("dense", "measured", "drop", "measured+drop"), guidance_scale=1.5)
    dropped = [p for p in result.points if p.allocation == "measured+drop"]
    assert {p.steps for p in dropped} == {8} and all(p.drop_steps == 2 for p in dropped)  # 6 fits dense; 10 drops nothing
    point = dropped[0]
    # its cost, counted from the rebuilt networks: each kept step at its stage network's block MACs
    from mosaic_core.conquer.caching import block_macs
    from mosaic_core.conquer.tune import candidate_denoiser
    from mosaic_core.models.samplers import sampler_timesteps

    staged = candidate_denoiser(loaded, point, config, analyses=analyses)
    kept = [t for i, t in enumerate(sampler_timesteps("ddim", loaded.scheduler_config, 10)) if i not in (2, 7)]  # kept: round(linspace(0, 9, 8)) = 0,1,3,4,5,6,8,9
    per_network = [sum(block_macs(network, loaded.spec.shape)) for network in staged.networks()]
    macs = sum(per_network[s] for s in staged.stage_index(torch.tensor(kept)).tolist())
    dense_10 = 10 * sum(block_macs(loaded.transformer, loaded.spec.shape))
    assert point.macs_fraction == pytest.approx(macs / dense_10, rel=1e-9) and point.macs_fraction <= 0.7 + 1e-12
    assert [p.drop_steps for p in result.points if p.allocation == "drop"] == [4]  # 6 of 10 fits 0.7; 8 of 10 does not

    other = tune(loaded, 0.7, config, reference_steps=10, steps_grid=(6, 8, 10), images=2, analyses=analyses,
                 methods=DEFAULT_METHODS, guidance_scale=1.5, scheduler="dpm", check=0)
    assert not any(p.drop_steps for p in other.points) and {"dense", "measured"} <= {p.allocation for p in other.points}
    with pytest.raises(ValueError, match="need the ddim sampler, got 'dpm'"):
        tune(loaded, 0.7, config, reference_steps=10, steps_grid=(6, 8, 10), images=2, methods=("dense", "drop"), scheduler="dpm")


@pytest.mark.slow  # a real prune of digits-dit
def test_sample_notes_a_checkpoint_pruned_for_dropped_steps_when_sampled_otherwise(tmp_path):
    pruned = tmp_path / "p"
    result = run_cli("prune", "--steps", "10", "--drop-steps", "2", "--sparsity", "0.2", "--calib-size", "8",
                     "--calib-batch-size", "8", "--out", str(pruned))
    assert result.returncode == 0, result.stderr
    import json

    assert json.loads((pruned / "manifest.json").read_text())["plan"]["drop_steps"] == 2
    other = run_cli("sample", "--pruned", str(pruned), "--steps", "10", "--n", "1", "--out", str(tmp_path / "a.npz"))
    assert other.returncode == 0 and "sample it as planned with --steps 10 --drop-steps 2" in other.stderr
    planned = run_cli("sample", "--pruned", str(pruned), "--steps", "10", "--drop-steps", "2", "--n", "1", "--out", str(tmp_path / "b.npz"))
    assert planned.returncode == 0 and "as planned" not in planned.stderr


def test_the_bench_drop_row_runs_the_kept_steps_at_mosaics_macs(tiny_pixel_folder):
    from mosaic_core.conquer.bench import BenchConfig, bench_steps, markdown_table
    from mosaic_core.divide.plan import build_plan
    from mosaic_core.models.loading import load_model

    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    from mosaic_core.prune.calibration import CalibrationConfig

    config = BenchConfig(sparsity=0.4, num_inference_steps=10, num_images=3, time_images=1, repeats=2, reduced_steps=None,
                         methods=("mosaic-measured-drop",), threads=1, drop_steps=2,
                         calibration=CalibrationConfig(size=8, batch_size=8, source="samples", sample_steps=4))
    result = run_to_end(bench_steps(loaded, config))
    rows = {r.name: r for r in result.results}
    assert list(rows) == ["dense", "mosaic-measured-drop"]
    row = rows["mosaic-measured-drop"]
    mosaic = build_plan(loaded.spec, 10, sparsity=0.4)
    assert row.num_inference_steps == 8 and row.step_runs.shape == (2, 8)  # 8 model calls per run, not 10
    assert 0.9 * mosaic.macs_staged <= row.macs <= mosaic.macs_staged  # raised until it fits mosaic's MACs, and close to them
    assert "8 of 10 steps, 2 dropped evenly" in markdown_table(result, loaded)
    with pytest.raises(ValueError, match="needs the ddim sampler, got 'dpm'"):
        BenchConfig(methods=("mosaic-measured-drop",), scheduler="dpm")


def test_a_retune_predicts_measured_drop_candidates_with_the_errors_and_macs_an_exhaustive_tune_builds(tiny_pixel_folder):
    """At a second budget measured+drop candidates are predicted from the measured allocation's recorded error
    (not the paper rule's), and cost what the networks an exhaustive tune builds cost."""
    from mosaic_core.conquer.tune import tune
    from mosaic_core.models.loading import load_model
    from mosaic_core.prune.calibration import CalibrationConfig
    from mosaic_core.prune.stage_pruning import PruneConfig

    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    config = PruneConfig(CalibrationConfig(size=8, batch_size=8, source="samples", sample_steps=4))
    analyses, memo = {}, {}
    kwargs = dict(reference_steps=8, steps_grid=(4, 5, 6, 7, 8), images=2, analyses=analyses, methods=("dense", "measured+drop"))
    tune(loaded, 0.45, config, memo=memo, **kwargs)  # 4, 5, 6 and 7 of the 8 steps: enough points to fit
    second = tune(loaded, 0.6, config, memo=memo, check=1, **kwargs)
    exhaustive = tune(loaded, 0.6, config, memo={}, check=0, **kwargs)
    assert "measured+drop" in second.quality_models
    by_steps = {p.steps: p for p in exhaustive.points if p.allocation == "measured+drop"}
    predicted = [p for p in second.points if p.allocation == "measured+drop" and p.predicted]
    assert predicted
    for p in predicted:
        reference = by_steps[p.steps]
        assert p.recorded_error == pytest.approx(reference.recorded_error, rel=1e-9)
        assert (p.macs, p.stage_sparsity, p.drop_steps) == (reference.macs, reference.stage_sparsity, reference.drop_steps)
