"""The studio's schedule chart and teaching note for a flow-matching plan (docs/method.md §8)."""

from __future__ import annotations

import os
from types import MappingProxyType

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np

from mosaic_core.divide.plan import build_plan
from mosaic_core.divide.shapes import TransformerShape
from mosaic_core.models.registry import ModelSpec
from ui import charts
from ui.divide_tab import FLOW_NOTE, DivideHandlers

SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def _flow_plan():
    spec = ModelSpec(
        name="tiny-flow", description="planning only", scheduler_config=MappingProxyType(SD3),
        shape=TransformerShape(num_layers=4, num_heads=4, head_dim=16, mlp_hidden=256, num_tokens=256),
        num_classes=0, source="folder",
    )
    return build_plan(spec, 28, scheduler="flow-euler", sparsity=0.3)


def test_flow_chart_plots_the_flow_score_and_marks_every_sampler_step_with_its_sigma():
    plan = _flow_plan()
    curve = plan.curve()
    figure = charts.mark_flow_schedule(charts.schedule_figure(curve, plan), plan)
    score = next(trace for trace in figure.data if trace.name == "importance score (sum)")
    np.testing.assert_array_equal(np.asarray(score.y), curve.score)
    steps = [trace for trace in figure.data if trace.mode == "markers"]
    xs = np.concatenate([np.asarray(trace.x, dtype=float) for trace in steps])
    assert sorted(xs.tolist()) == sorted(plan.timesteps) and len(xs) == 28
    sigmas = np.concatenate([np.asarray(trace.customdata, dtype=float)[:, 0] for trace in steps])
    np.testing.assert_allclose(sigmas, xs / 1000)  # σ = t / T in the hover text
    assert [int((np.asarray(t.x) > 0).sum()) for t in steps] == list(plan.step_counts)
    assert tuple(figure.layout.xaxis.range) == (1000, 0)  # the first step (t = 1000) is on the chart
    assert "σ" in figure.layout.xaxis.title.text
    assert any(trace.name == "Grad term (growth per sampler step, normalised)" for trace in figure.data)


def test_ddpm_chart_is_left_alone():
    plan = build_plan("digits-dit", 50)
    figure = charts.schedule_figure(plan.curve(), plan)
    before = figure.to_json()
    assert charts.mark_flow_schedule(figure, plan).to_json() == before


def test_teaching_note_says_the_premise_is_unmeasured_for_flow_models_only():
    assert FLOW_NOTE in DivideHandlers._teaching_note(None, None, _flow_plan())
    assert FLOW_NOTE not in DivideHandlers._teaching_note(None, None, build_plan("digits-dit", 50))
    assert "not" in FLOW_NOTE.lower() and "measured" in FLOW_NOTE
