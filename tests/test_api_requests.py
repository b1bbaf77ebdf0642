"""mosaic_core.requests: one checked value per action, shared by the studio, its API and the CLI."""

from __future__ import annotations

import argparse
import math

import pytest
from hypothesis import given, settings, strategies as st

from mosaic_core.commands.plan import add_plan_arguments, plan_from_args
from mosaic_core.divide.plan import build_plan
from mosaic_core.models.registry import resolve_model
from mosaic_core.requests import CompareRequest, PlanRequest, PruneRequest

MODEL = "digits-dit"


def _same_plan(a, b) -> None:
    assert a.to_dict() == b.to_dict()


@settings(max_examples=30, deadline=None)
@given(
    M=st.floats(min_value=0.01, max_value=0.99),
    lam=st.floats(min_value=-0.05, max_value=0.05),
    sparsity=st.floats(min_value=0.0, max_value=0.9),
    steps=st.integers(min_value=1, max_value=100),
    sampler=st.sampled_from(["ddim", "dpm", "euler", "ddpm"]),
)
def test_a_valid_request_plans_exactly_what_build_plan_plans(M, lam, sparsity, steps, sampler):
    request = PlanRequest.from_values(MODEL, sampler, steps, M, lam, sparsity)
    _same_plan(request.plan(), build_plan(MODEL, steps, M, lam, sparsity=sparsity, scheduler=sampler))


def test_the_controls_pick_the_folder_and_the_per_stage_values():
    auto = PlanRequest.from_controls(MODEL, "", "ddim", 20, 0.5, 0.01, 1.0, 0.3, False, 0.9, "ignored", None)
    assert auto.sparsity == 0.3 and auto.stage_sparsity is None
    manual = PlanRequest.from_controls(MODEL, "  ", "ddim", 20, 0.5, 0.01, 1.0, "ignored", True, 0.5, 0.1, 0.4)
    assert manual.stage_sparsity == (0.5, 0.1, 0.4) and manual.sparsity is None
    _same_plan(manual.plan(), build_plan(MODEL, 20, 0.5, 0.01, stage_sparsity=(0.5, 0.1, 0.4)))
    assert PlanRequest.from_controls("x", " /some/folder ", "ddim", 20, 0.5, 0.01, 1.0, 0.3, False, 0, 0, 0).model == "/some/folder"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(model=""), r"model must be a registry name .* got an empty string"),
        (dict(model="m" * 600), r"model is 600 characters long: at most 512 allowed"),
        (dict(model=3), r"model must be a string, got int"),
        (dict(steps=2.5), r"steps must be a whole number in \[1, 1000\], got 2\.5"),
        (dict(steps=True), r"steps must be a whole number"),
        (dict(M="0.5"), r"M must be a number in \(0, 1\), got str '0\.5'"),
        (dict(M=10**400), r"M must be a finite number in \(0, 1\), got an integer of 401 digits"),
        (dict(lam=float("nan")), r"lam \(λ\) must be a finite number"),
        (dict(lam=1e300), r"lam \(λ\) must be a finite number in \[-1e6, 1e6\].*got 1e\+300"),  # would overflow λ·ln SNR
        (dict(cx=0.0), r"cx \(c_x\) must be a finite number in \(0, inf\)"),
        (dict(sparsity=0.95), r"sparsity must be in \[0, 0\.9\], got 0\.95"),
        (dict(stage_sparsity="0.1,0.1,0.1"), r"stage_sparsity must be 3 numbers"),
        (dict(stage_sparsity=[0.1, 0.1, float("inf")]), r"late sparsity must be a finite number"),
        (dict(sampler="heun"), r"unknown scheduler 'heun'"),
        (dict(uniform="yes"), r"uniform must be true or false"),
    ],
)
def test_bad_plan_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PlanRequest.from_values(**({"model": MODEL} | kwargs))


def test_prune_and_compare_requests_check_their_own_values():
    plan = PlanRequest.from_values(MODEL, steps=10, sparsity=0.3)
    with pytest.raises(ValueError, match=r"calibration_size \(images per stage\) must be in \[16, 1024\], got 8"):
        PruneRequest.from_values(plan, "snr", 8, "obs", size_range=(16, 1024))
    prune = PruneRequest.from_values(plan, "clean", 32, "magnitude")
    config = prune.config(resolve_model(MODEL))
    assert (config.calibration.mode, config.calibration.size, config.scorer) == ("clean", 32, "magnitude")
    request = CompareRequest.from_values(prune, 10, labels="1,3, 5-6", count=6, seed=7, cfg=2, repeats=2, only_stage="late only")
    assert request.labels == (1, 3, 5, 6, 1, 3) and request.count == 6 and request.stage == 2 and request.cfg == 2.0
    for kwargs, message in [
        (dict(labels="3,12"), r"class id 12 is out of range: allowed 0\.\.9"),
        (dict(labels=["0-9"]), r"class labels must be a string, got list"),
        (dict(seed=-1), r"seed must be in \[0, 2147483647\], got -1"),
        (dict(cfg=math.inf), r"cfg \(guidance scale\) must be a finite number in \[0, 20\], got inf"),
        (dict(only_stage=2), r"only_stage must be one of 'all stages'"),
    ]:
        with pytest.raises(ValueError, match=message):
            CompareRequest.from_values(prune, 10, **kwargs)


def test_a_compare_request_can_sample_its_dense_reference_at_other_steps():
    spec = resolve_model(MODEL)
    prune = PruneRequest.from_values(PlanRequest.from_values(MODEL, steps=10, sparsity=0.3))
    plan = prune.plan.build(spec)
    for unset in (None, 0, 10):  # 0 is the studio's "the plan's steps"; the plan's own count is no other plan
        assert CompareRequest.from_values(prune, 10, dense_steps=unset).dense_plan(spec, plan) is plan
    reference = CompareRequest.from_values(prune, 10, dense_steps=25).dense_plan(spec, plan)
    assert reference.num_inference_steps == 25 and len(reference.step_stages) == 25
    # the same schedule and stages at 25 steps: the per-step MACs of the dense network are the same
    assert reference.macs_dense / 25 == pytest.approx(plan.macs_dense / 10)
    assert (reference.M, reference.bounds.middle) == (plan.M, plan.bounds.middle)
    for value, message in [
        (-1, r"dense_steps \(0: the plan's steps\) must be in \[1, 1000\], got -1"),
        (2.5, r"dense_steps \(0: the plan's steps\) must be a whole number in \[1, 1000\], got 2\.5"),
        ("50", r"dense_steps \(0: the plan's steps\) must be a whole number in \[1, 1000\], got '50'"),
    ]:
        with pytest.raises(ValueError, match=message):
            CompareRequest.from_values(prune, 10, dense_steps=value)


def test_a_text_model_compares_prompts_repeated_to_the_count_with_a_negative_prompt():
    prune = PruneRequest.from_values(PlanRequest.from_values("sdxl-base", steps=10, sparsity=0.3))
    text = dict(conditioning="text")
    request = CompareRequest.from_values(prune, 0, "0-9", 0, 5, 5.0, 1, "all stages", "a cat\n\n  a dog  \n", " blurry ", **text)
    assert request.prompts == ("a cat", "a dog", "a cat", "a dog", "a cat") and request.labels == ()  # labels ignored
    assert request.count == 5 and request.conditions == list(request.prompts) and request.negative_prompt == "blurry"
    one = CompareRequest.from_values(prune, 0, count=3, prompts=["a lighthouse"], **text)  # one prompt for every image
    assert one.prompts == ("a lighthouse",) * 3 and one.negative_prompt == ""
    old = CompareRequest.from_values(PruneRequest.from_values(PlanRequest.from_values(MODEL)), 10, "0-2", 0, 3)
    assert old.labels == (0, 1, 2) and old.prompts == () and old.conditions == [0, 1, 2]  # class models as before
    for conditioning, kwargs, message in [
        ("text", dict(), r"this model is text-to-image: give prompts"),
        ("text", dict(prompts=" \n \n"), r"this model is text-to-image: give prompts"),
        ("text", dict(prompts=3), r"prompts must be text \(one prompt per line\) or a list of strings, got int"),
        ("text", dict(prompts=["ok", 7]), r"prompt 2 must be a string, got int"),
        ("text", dict(prompts=["x"] * 257), r"prompts has 257 entries: at most 256 allowed"),
        ("text", dict(prompts="x\n" * 257), r"prompts has 257 lines: at most 256 allowed"),
        ("text", dict(prompts="x" * 300_000), r"prompts is 300000 characters long"),
        ("text", dict(prompts="a cat", negative_prompt="y" * 1001), r"negative_prompt is 1001 characters long: at most 1000"),
        ("class", dict(prompts="a cat"), r"prompts are for text-to-image models; this model is class-conditional"),
        ("class", dict(negative_prompt="blurry"), r"negative_prompt is for text-to-image models"),
    ]:
        with pytest.raises(ValueError, match=message):
            CompareRequest.from_values(prune, 10, count=2, conditioning=conditioning, **kwargs)


def test_the_cli_builds_its_plan_through_the_same_request():
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    args = parser.parse_args(["--model", MODEL, "--stage-sparsity", "0.5,0.1,0.4", "--steps", "20", "--M", "0.45"])
    _same_plan(plan_from_args(args), build_plan(MODEL, 20, 0.45, stage_sparsity=(0.5, 0.1, 0.4)))
    # the CLI's own parser refuses a non-finite λ before a request is built; a Namespace that
    # skipped the parser (a script) still meets the request's check
    bad = parser.parse_args(["--model", MODEL])
    bad.lam = float("nan")
    with pytest.raises(ValueError, match=r"lam \(λ\) must be a finite number"):
        plan_from_args(bad)
