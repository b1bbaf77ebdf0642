"""Property-based fuzzing of the engine's entry points with hostile values.

Every call must return a result or raise a ValueError whose message names the parameter,
and stay within a memory bound (peak traced allocation, measured with tracemalloc): no
TypeError/OverflowError tracebacks, no allocation sized by an attacker's number.
"""

from __future__ import annotations

import math
import tracemalloc

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mosaic_core import limits
from mosaic_core.conquer.sampling import SampleConfig
from mosaic_core.divide.plan import Plan, build_plan
from mosaic_core.models.registry import resolve_model
from mosaic_core.prune.calibration import CalibrationConfig
from mosaic_core.prune.stage_pruning import PruneConfig

PEAK_BYTES = 50 * 2**20  # generous: the valid calls themselves need a few MB at most
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

huge_strings = st.builds(lambda c, n: c * n, st.characters(), st.integers(1000, 200_000))
hostile = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, -1, 2**31, 2**63, 10**18]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 5e-324]),
    st.text(max_size=40),
    huge_strings,
    st.lists(st.integers(), max_size=5),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


def bounded(call):
    """Run `call` under tracemalloc; return (result or the ValueError raised, peak bytes)."""
    tracemalloc.start()
    try:
        try:
            outcome = call()
        except ValueError as error:
            outcome = error
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"peak allocation {peak / 2**20:.1f} MiB"
    return outcome


def assert_names(outcome, *words: str) -> None:
    if isinstance(outcome, ValueError):
        message = str(outcome).lower()
        assert any(word.lower() in message for word in words), f"{outcome!r} does not name {words}"
        assert len(str(outcome)) < 2000, "the error must not echo a huge value"


PLAN_WORDS = {
    "num_inference_steps": ("steps",),
    "M": ("M",),
    "lam": ("lam", "λ"),
    "sparsity": ("sparsity",),
    "cx": ("cx", "c_x"),
    "scheduler": ("scheduler", "sampler"),
    "stage_sparsity": ("sparsity",),
}


@FUZZ
@given(parameter=st.sampled_from(sorted(PLAN_WORDS)), value=hostile)
def test_build_plan_returns_a_plan_or_names_the_bad_parameter(parameter, value):
    outcome = bounded(lambda: build_plan("digits-dit", **{parameter: value}))
    assert isinstance(outcome, (Plan, ValueError))
    assert_names(outcome, *PLAN_WORDS[parameter])


SAMPLE_WORDS = {"num_inference_steps": ("steps",), "guidance_scale": ("guidance", "cfg"), "scheduler": ("scheduler", "sampler"), "seed": ("seed",)}


@FUZZ
@given(parameter=st.sampled_from(sorted(SAMPLE_WORDS)), value=hostile)
def test_sample_config_is_valid_or_names_the_bad_parameter(parameter, value):
    outcome = bounded(lambda: SampleConfig(**{parameter: value}))
    assert isinstance(outcome, (SampleConfig, ValueError))
    assert_names(outcome, *SAMPLE_WORDS[parameter])


CALIBRATION_WORDS = {
    "mode": ("mode",),
    "size": ("size",),
    "batch_size": ("batch size",),
    "source": ("source",),
    "seed": ("seed",),
    "sample_steps": ("steps",),
}


@FUZZ
@given(parameter=st.sampled_from(sorted(CALIBRATION_WORDS)), value=hostile)
def test_calibration_config_is_valid_or_names_the_bad_parameter(parameter, value):
    outcome = bounded(lambda: CalibrationConfig(**{parameter: value}))
    assert isinstance(outcome, (CalibrationConfig, ValueError))
    assert_names(outcome, *CALIBRATION_WORDS[parameter])


@FUZZ
@given(parameter=st.sampled_from(["scorer", "damping", "allocation"]), value=hostile)
def test_prune_config_is_valid_or_names_the_bad_parameter(parameter, value):
    outcome = bounded(lambda: PruneConfig(**{parameter: value}))
    assert isinstance(outcome, (PruneConfig, ValueError))
    assert_names(outcome, parameter)


@FUZZ
@given(
    text=st.one_of(
        hostile,
        st.lists(st.tuples(st.integers(-5, 10**9), st.integers(-5, 10**9)), max_size=50).map(
            lambda pairs: ",".join(f"{a}-{b}" for a, b in pairs)
        ),
        st.builds(lambda n: "0-9," * n, st.integers(0, 100_000)),
    ),
    num_classes=st.integers(1, 1000),
)
def test_label_lists_are_bounded_while_parsing(text, num_classes):
    outcome = bounded(lambda: limits.parse_label_list(text, num_classes))
    if not isinstance(outcome, ValueError):
        assert 1 <= len(outcome) <= limits.MAX_IMAGES and all(0 <= i < num_classes for i in outcome)
    assert_names(outcome, "label", "class")


@FUZZ
@given(name=st.one_of(hostile, st.sampled_from(["/", "/root", "/root/.ssh", "/etc/passwd", "~", "..", "/proc/self", "\x00"])))
def test_resolve_model_resolves_or_refuses_by_name(name):
    outcome = bounded(lambda: resolve_model(name))
    if not isinstance(outcome, ValueError):
        assert outcome.name  # a usable spec
    assert_names(outcome, "model")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    option=st.sampled_from(["--steps", "--M", "--lam", "--sparsity", "--stage-sparsity", "--cx", "--scheduler", "--model"]),
    value=hostile.map(str),
)
@example(option="--model", value="0\r0")  # a carriage return in the echoed name once split the line
@example(option="--scheduler", value="a\nb\x1b[31m")
def test_plan_command_answers_in_one_line(option, value, capsys):
    from mosaic_core.cli import main

    def run():
        try:
            return main(["plan", option, value, "--json"])
        except SystemExit as stop:  # argparse's one-line usage error
            return stop.code

    code = bounded(run)
    captured = capsys.readouterr()
    assert code in (0, 2)
    if code == 2:
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err
        assert len(lines[0]) < 2000
    else:
        assert captured.out.startswith("{")


def test_the_fuzzers_reach_both_outcomes():
    """The properties above are not vacuous: valid input passes and hostile input is refused."""
    assert isinstance(build_plan("digits-dit", sparsity=0.3), Plan)
    with pytest.raises(ValueError, match="sparsity"):
        build_plan("digits-dit", sparsity=math.nan)
    with pytest.raises(ValueError, match="seed"):
        SampleConfig(seed=math.inf)
