"""Divide: golden stage bounds of docs/method.md §1 and properties of the partition."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaic_core.divide.noise_schedule import alphas_cumprod, importance_score
from mosaic_core.models.samplers import sampler_timesteps
from mosaic_core.divide.stages import EARLY, LATE, MIDDLE, STAGE_NAMES, StageBounds, divide_stages

LINEAR = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
SCALED_LINEAR = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
COSINE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}


def bounds_for(config, lam=0.01, M=0.55, cx=1.0) -> StageBounds:
    return divide_stages(importance_score(alphas_cumprod(config), lam, cx), M)


@st.composite
def scheduler_configs(draw):
    """linear (random β range), scaled_linear or cosine, T in [200, 1000]."""
    kind = draw(st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"]))
    config = {"num_train_timesteps": draw(st.integers(200, 1000)), "beta_schedule": kind}
    if kind == "linear":
        config.update(beta_start=draw(st.floats(1e-5, 1e-3)), beta_end=draw(st.floats(5e-3, 5e-2)))
    elif kind == "scaled_linear":
        config.update(beta_start=draw(st.floats(1e-4, 2e-3)), beta_end=draw(st.floats(5e-3, 3e-2)))
    return config


@pytest.mark.parametrize(
    "config, lam, middle",
    [(LINEAR, 0.01, (103, 568)), (LINEAR, 0.0, (108, 580)), (SCALED_LINEAR, 0.01, (105, 846))],
    ids=["linear-lam0.01", "linear-lam0", "scaled_linear-lam0.01"],
)
def test_golden_middle_stage(config, lam, middle):
    bounds = bounds_for(config, lam)
    assert abs(bounds.middle[0] - middle[0]) <= 1 and abs(bounds.middle[1] - middle[1]) <= 1
    assert bounds.early == (bounds.middle[1] + 1, 999)
    assert bounds.late == (0, bounds.middle[0] - 1)


def test_cosine_has_an_empty_early_stage_and_does_not_crash():
    bounds = bounds_for(COSINE)
    assert bounds.early is None
    assert bounds.middle[1] == 999
    assert bounds.sizes()[EARLY] == 0 and sum(bounds.sizes()) == 1000
    assert bounds.indices(EARLY).size == 0
    counts = bounds.count_steps(sampler_timesteps("ddim", COSINE, 50))
    assert counts[EARLY] == 0 and sum(counts) == 50


def test_ddim50_step_counts_on_the_linear_schedule():
    counts = bounds_for(LINEAR).count_steps(sampler_timesteps("ddim", LINEAR, 50))
    assert counts == (21, 23, 6)


def test_stage_of_rounds_half_up_and_clips():
    bounds = StageBounds.from_middle((103, 568), 1000, 0.55)
    given_t = [568.4, 568.5, 102.5, 102.49, -3.0, 1e6, 0, 999]
    expected = [MIDDLE, EARLY, MIDDLE, LATE, LATE, EARLY, LATE, EARLY]
    np.testing.assert_array_equal(bounds.stage_of(given_t), expected)
    assert bounds.stage_of(np.array([[300.0]])).shape == (1, 1)
    assert STAGE_NAMES == ("early", "middle", "late")


def test_inconsistent_bounds_are_refused():
    with pytest.raises(ValueError, match="middle stage"):
        StageBounds.from_middle((600, 500), 1000, 0.55)
    with pytest.raises(ValueError, match="early/late"):
        StageBounds(num_train_timesteps=1000, early=(700, 999), middle=(100, 500), late=(0, 99), M=0.5)


@pytest.mark.parametrize("M", [0.0, 1.0, -0.2, 1.5, float("nan"), float("inf")])
def test_M_outside_the_open_unit_interval_is_refused(M):
    curve = importance_score(alphas_cumprod(LINEAR), 0.01)
    with pytest.raises(ValueError, match=rf"M must be in \(0, 1\), got {M}"):
        divide_stages(curve, M)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' own numpy-2 warning
@settings(max_examples=50, deadline=None)
@given(
    config=scheduler_configs(),
    M=st.floats(0.05, 0.95),
    lam=st.floats(-0.02, 0.05),
    data=st.data(),
)
def test_stages_partition_every_timestep_and_every_step(config, M, lam, data):
    curve = importance_score(alphas_cumprod(config), lam)
    bounds = divide_stages(curve, M)
    T = config["num_train_timesteps"]
    # Every τ in exactly one stage, ranges contiguous, in order late < middle < early.
    stage = bounds.stage_of(np.arange(T))
    assert tuple(np.bincount(stage, minlength=3)) == bounds.sizes()
    assert sum(bounds.sizes()) == T
    covered = np.concatenate([bounds.indices(i) for i in (LATE, MIDDLE, EARLY)])
    np.testing.assert_array_equal(covered, np.arange(T))
    # The middle stage is the maximal run around argmax with score ≥ M·max.
    low, high = bounds.middle
    threshold = M * curve.max_score
    assert low <= curve.argmax <= high
    assert np.all(curve.score[low : high + 1] >= threshold)
    assert low == 0 or curve.score[low - 1] < threshold
    assert high == T - 1 or curve.score[high + 1] < threshold
    # Sampler steps: each lands in one stage; the counts sum to N.
    scheduler = data.draw(st.sampled_from(["ddim", "ddpm", "dpm", "euler"]))
    steps = data.draw(st.integers(1, T // 2))
    timesteps = sampler_timesteps(scheduler, config, steps)
    counts = bounds.count_steps(timesteps)
    assert sum(counts) == len(timesteps) == steps
    for index, count in enumerate(counts):
        if bounds.ranges[index] is None:
            assert count == 0
