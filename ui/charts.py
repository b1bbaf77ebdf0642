"""Plotly figures of the studio: the importance score with its draggable threshold, the
training dynamics per noise level, and the model's own x̂₀ trajectory.

Pure functions: engine values in (`ScoreCurve`, `Plan`, `Dynamics`, `Trajectory`), a
`plotly.graph_objects.Figure` out. Every chart puts the model timestep τ on a reversed x
axis, so sampling reads left to right (τ = T-1 → 0, early → middle → late), and shades the
three stages with the same colours.

The threshold line and the two stage-edge lines are the schedule chart's only shapes, so
plotly's config `edits.shapePosition` (`SCHEDULE_CONFIG`) makes exactly those lines draggable
with one press; the shaded stage regions of that chart are filled traces, not shapes, for
that reason. The threshold is shape 0; the edges are shapes 1 (`edge-low`, drawn at
τ_lo − ½, between the late and the middle stage) and 2 (`edge-high`, at τ_hi + ½).
(Plotly's per-shape `editable=True` would need a click to activate the shape before a
drag.) The line carries `name="threshold"`, and `layout.meta` carries `max_score` and the M
range: all the browser-side listener (ui/frontend.py) needs to turn a dropped y into
M = y / max score; `layout.meta.edges` holds the current (τ_lo, τ_hi), and the listener sends
a dropped edge's x, which Python turns into new edges (`ui.divide_tab.dragged_edges`).
`figure_json` adds the config to the figure's JSON, which gradio's
plotly renderer passes to `Plotly.react`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import plotly.graph_objects as go

from mosaic_core.divide.plan import Plan
from mosaic_core.divide.noise_schedule import ScoreCurve
from mosaic_core.divide.stages import STAGE_NAMES

from ui import settings

THRESHOLD_SHAPE_NAME = "threshold"
EDGE_SHAPE_NAMES = ("edge-low", "edge-high")  # the middle stage's lower and upper edge
SCHEDULE_CONFIG = {"edits": {"shapePosition": True}, "displayModeBar": False, "displaylogo": False}
FONT = dict(family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif", size=12, color="#1f2933")


def _base_layout(height: int, num_train_timesteps: int, x_title: str, y_title: str, top: int = 44) -> dict:
    return dict(
        height=height,
        margin=dict(l=58, r=16, t=top, b=48),
        font=FONT,
        plot_bgcolor="white",
        paper_bgcolor="white",
        dragmode=False,  # no zoom box: a press on the plot is for the threshold line
        hovermode="closest",
        xaxis=dict(
            title=dict(text=x_title, standoff=6),
            range=[num_train_timesteps - 1, 0],  # reversed: sampling runs left to right
            showgrid=True,
            gridcolor="#eef1f4",
            zeroline=False,
            ticks="outside",
            fixedrange=True,
        ),
        yaxis=dict(
            title=dict(text=y_title, standoff=4),
            showgrid=True,
            gridcolor="#eef1f4",
            zeroline=False,
            ticks="outside",
            fixedrange=True,
        ),
        legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0, font=dict(size=11)),
    )


def _stage_label(plan: Plan, index: int) -> dict:
    """The stage's name above the plot, centred on its region but kept inside the plot's width."""
    name = STAGE_NAMES[index]
    low, high = plan.bounds.ranges[index]
    last = plan.bounds.num_train_timesteps - 1
    x, anchor = (low + high) / 2, "center"
    if x < 0.06 * last:  # near the right edge (the axis is reversed)
        x, anchor = 0, "right"
    elif x > 0.94 * last:
        x, anchor = last, "left"
    return dict(
        x=x, y=1.0, xref="x", yref="paper", xanchor=anchor, yanchor="bottom", showarrow=False,
        text=f"<b>{name}</b>", font=dict(size=12, color=settings.STAGE_COLORS[name]),
    )


def _stage_regions(plan: Plan) -> tuple[list[dict], list[dict]]:
    """Shaded rectangles (below the traces) and a name label on top of each non-empty stage."""
    shapes, annotations = [], []
    for index, name in enumerate(STAGE_NAMES):
        bounds = plan.bounds.ranges[index]
        if bounds is None:
            continue
        low, high = bounds
        shapes.append(
            dict(
                type="rect", xref="x", yref="paper", x0=high + 0.5, x1=low - 0.5, y0=0, y1=1,
                fillcolor=settings.STAGE_COLORS[name], opacity=0.13, line=dict(width=0), layer="below",
                name=f"stage-{name}",
            )
        )
        annotations.append(_stage_label(plan, index))
    return shapes, annotations


def _stage_traces(plan: Plan, low: float, high: float) -> list[go.Scatter]:
    """Shaded stage regions as filled polygons from y=low to y=high (traces, not shapes)."""
    traces = []
    for index, name in enumerate(STAGE_NAMES):
        bounds = plan.bounds.ranges[index]
        if bounds is None:
            continue
        left, right = bounds[1] + 0.5, bounds[0] - 0.5
        traces.append(
            go.Scatter(
                x=[left, right, right, left, left], y=[low, low, high, high, low], mode="lines", fill="toself",
                fillcolor=settings.STAGE_COLORS[name], opacity=0.13, line=dict(width=0), hoverinfo="skip",
                showlegend=False, name=f"stage-{name}",
            )
        )
    return traces


def schedule_figure(curve: ScoreCurve, plan: Plan) -> go.Figure:
    """Grad term, λ·ln SNR term and their sum over τ; the draggable M·max line; the sampler's steps."""
    tau = np.asarray(curve.timesteps)
    max_score = float(curve.max_score)
    threshold = plan.M * max_score
    values = np.concatenate([curve.grad_term, curve.snr_term, curve.score])
    low, high = float(values.min()), float(max(values.max(), max_score))
    pad = 0.06 * (high - low)
    y_range = [low - pad, high + pad]
    figure = go.Figure(_stage_traces(plan, *y_range))
    traces = (
        ("Grad term (learning speed, normalised)", curve.grad_term, settings.TERM_COLORS["grad"], "dot", 1.6),
        (f"λ·ln SNR term (λ = {plan.lam:g})", curve.snr_term, settings.TERM_COLORS["snr"], "dash", 1.6),
        ("importance score (sum)", curve.score, settings.TERM_COLORS["score"], "solid", 2.4),
    )
    for name, term, color, dash, width in traces:
        figure.add_trace(
            go.Scatter(
                x=tau, y=np.asarray(term), mode="lines", name=name, line=dict(color=color, dash=dash, width=width),
                hovertemplate="τ=%{x}<br>%{y:.4f}<extra>" + name.split(" (")[0] + "</extra>",
            )
        )
    timesteps = np.asarray(plan.timesteps, dtype=np.float64)
    stages = np.asarray(plan.step_stages)
    step_scores = np.interp(timesteps, tau, np.asarray(curve.score))
    for index, name in enumerate(STAGE_NAMES):
        mask = stages == index
        figure.add_trace(
            go.Scatter(
                x=timesteps[mask], y=step_scores[mask], mode="markers",
                name=f"{plan.scheduler} steps in {name} ({int(mask.sum())})",
                marker=dict(color=settings.STAGE_COLORS[name], size=8, line=dict(color="white", width=1)),
                hovertemplate="step at τ=%{x:.0f}<extra>" + name + "</extra>",
            )
        )
    annotations = [_stage_label(plan, i) for i in range(len(STAGE_NAMES)) if plan.bounds.ranges[i] is not None]
    shapes = [
        dict(
            type="line", name=THRESHOLD_SHAPE_NAME, xref="paper", x0=0, x1=1, yref="y",
            y0=threshold, y1=threshold, layer="above",
            line=dict(color=settings.THRESHOLD_COLOR, width=4, dash="dash"),
            label=dict(
                text=f"M·max score = {plan.M:.3f} × {max_score:.3f}  ⇕ drag",
                textposition="start", yanchor="bottom", font=dict(size=11, color=settings.THRESHOLD_COLOR),
            ),
        )
    ]
    low_edge, high_edge = plan.bounds.middle
    edge_word = "set by hand" if plan.manual_edges else "from M"
    for name, x, text in (
        (EDGE_SHAPE_NAMES[0], low_edge - 0.5, f"τ_lo = {low_edge}"),
        (EDGE_SHAPE_NAMES[1], high_edge + 0.5, f"τ_hi = {high_edge}"),
    ):
        shapes.append(
            dict(
                type="line", name=name, xref="x", x0=x, x1=x, yref="paper", y0=0, y1=1, layer="above",
                line=dict(color=settings.EDGE_COLOR, width=3, dash="dot" if plan.manual_edges is None else "solid"),
            )
        )
        annotations.append(
            dict(
                x=x, y=0.02, xref="x", yref="paper", xanchor="right" if name == EDGE_SHAPE_NAMES[0] else "left",
                yanchor="bottom", showarrow=False, text=f" ⇔ {text} ", font=dict(size=10, color=settings.EDGE_COLOR),
                bgcolor="rgba(255,255,255,0.75)",
            )
        )
    annotations.append(
        dict(
            x=1, y=0.98, xref="paper", yref="paper", xanchor="right", yanchor="top", showarrow=False,
            text=f"stage edges {edge_word}", font=dict(size=10, color=settings.EDGE_COLOR), bgcolor="rgba(255,255,255,0.75)",
        )
    )
    layout = _base_layout(settings.SCHEDULE_HEIGHT, curve.num_train_timesteps, "model timestep τ   (sampling runs left → right)", "score")
    layout["yaxis"]["range"] = y_range
    layout.update(
        shapes=shapes,
        annotations=annotations,
        meta=dict(
            role="mosaic-schedule", max_score=max_score, M=plan.M, M_min=settings.M_RANGE[0], M_max=settings.M_RANGE[1],
            M_step=settings.M_STEP, edges=[int(low_edge), int(high_edge)], edges_source=plan.edges_source,
            num_train_timesteps=int(curve.num_train_timesteps),
        ),
        legend=dict(orientation="h", yanchor="top", y=-0.16, xanchor="left", x=0, font=dict(size=11)),
        margin=dict(l=58, r=16, t=52, b=92),
    )
    figure.update_layout(**layout)
    return figure


def mark_flow_schedule(figure: go.Figure, plan: Plan) -> go.Figure:
    """For a flow-matching plan (docs/method.md §8): the x axis in scheduler t = σ·T (up to the
    first step at t = T), and each sampler step's σ in its hover text. Other plans pass unchanged."""
    from mosaic_core.divide.flow_schedule import is_flow_matching

    if not is_flow_matching(plan.scheduler_config):
        return figure
    num_train = plan.bounds.num_train_timesteps
    figure.update_xaxes(range=[num_train, 0], title_text="scheduler timestep t = σ·T   (sampling runs left → right, σ = 1 → 0)")
    for trace in figure.data:
        if trace.mode == "markers" and trace.x is not None:  # the sampler's steps
            trace.customdata = np.asarray(trace.x, dtype=np.float64)[:, None] / num_train
            trace.hovertemplate = "step at t=%{x:.1f}, σ=%{customdata[0]:.3f}<extra>" + trace.name.rsplit(" (", 1)[0] + "</extra>"
        elif trace.name and trace.name.startswith("Grad term"):
            trace.name = "Grad term (growth per sampler step, normalised)"
    return figure


def figure_json(figure: go.Figure, config: Optional[dict] = None) -> str:
    """The figure as plotly JSON with a `config` entry (gradio passes it to Plotly.react)."""
    payload = json.loads(figure.to_json())
    if config:
        payload["config"] = dict(config)
    return json.dumps(payload)


@dataclass(frozen=True)
class LossProgress:
    """Per noise-level bin, the share of its loss drop reached at a few training checkpoints.

    progress[j, b] = (L_base − L_k) / (L_base − L_final) for checkpoint k = picks[j]: 0 = no
    better than at the base step, 1 = as good as at the end. The base is the first logged
    step after step 0 when there is one: the first few steps collapse every level's loss from
    the untrained value at once, which would hide the differences in speed after that.
    """

    base: int  # index into dynamics.steps
    picks: list[int]  # indices into dynamics.steps
    progress: np.ndarray  # len(picks) × bins


def loss_progress(dynamics, count: int = 4) -> LossProgress:
    """`LossProgress` at up to `count` checkpoints, spaced geometrically (denser early in training)."""
    num_logged = len(dynamics.steps)
    base = 1 if num_logged >= 4 else 0
    last_pick = num_logged - 2 if num_logged - 2 > base else num_logged - 1  # the final step is 100 % everywhere
    if last_pick <= base:
        return LossProgress(base, [], np.zeros((0, dynamics.loss.shape[1])))
    picks = [int(i) for i in np.unique(np.round(np.geomspace(base + 1, last_pick, count)).astype(int))]
    start, end = dynamics.loss[base], dynamics.loss[-1]
    drop = start - end
    safe = np.where(np.abs(drop) > 1e-12, drop, np.nan)
    progress = np.stack([(start - dynamics.loss[k]) / safe for k in picks])
    return LossProgress(base, picks, progress)


def _stage_means(values: np.ndarray, positions: np.ndarray, plan: Plan) -> list[Optional[float]]:
    """Mean of `values` over the positions (timesteps) inside each stage; None for a stage with none."""
    stages = plan.stage_of(positions)
    means = []
    for index in range(len(STAGE_NAMES)):
        inside = values[(stages == index) & np.isfinite(values)]
        means.append(float(inside.mean()) if inside.size else None)
    return means


def _by_stage(shares: list[Optional[float]]) -> str:
    parts = [f"{name} {share:.0%}" for share, name in zip(shares, STAGE_NAMES) if share is not None]
    return " · ".join(parts)


def dynamics_summary(dynamics, plan: Plan) -> Optional[str]:
    """One sentence: how far each stage's noise levels had got at the first shown checkpoint."""
    if dynamics is None:
        return None
    result = loss_progress(dynamics)
    if not result.picks:
        return None
    k = result.picks[0]
    shares = _stage_means(result.progress[0], dynamics.bin_centres, plan)
    return (
        f"**Training record:** at step {int(dynamics.steps[k])}, each stage's noise levels had made this share "
        f"of their loss drop after step {int(dynamics.steps[result.base])}: {_by_stage(shares)}."
    )


def dynamics_figure(dynamics, plan: Plan) -> go.Figure:
    """Share of each noise level's loss drop reached at a few training checkpoints (`loss_progress`).

    A level whose curve rises first is learned fast; where the curves stay low, slowly.
    """
    if dynamics is None:
        return message_figure(
            "No training dynamics for this model.\ndynamics.json is written next to the weights by\n<i>python -m mosaic_core train</i> (built-in model).",
            settings.SMALL_CHART_HEIGHT,
        )
    result = loss_progress(dynamics)
    figure = go.Figure()
    shades = np.linspace(0.35, 1.0, max(len(result.picks), 1))
    for shade, k, progress in zip(shades, result.picks, result.progress):
        level = int(round(200 * (1 - shade)))
        step = str(int(dynamics.steps[k]))
        figure.add_trace(
            go.Scatter(
                x=dynamics.bin_centres, y=progress, mode="lines+markers", name=f"step {step}",
                line=dict(color=f"rgb({level},{level + 20},{min(255, level + 70)})", width=2), marker=dict(size=5),
                customdata=np.stack([dynamics.bins[:, 0], dynamics.bins[:, 1], dynamics.loss[k]], axis=1),
                hovertemplate="τ %{customdata[0]:.0f}–%{customdata[1]:.0f}<br>ε-MSE %{customdata[2]:.4f}"
                "<br>%{y:.0%} of its drop<extra>step " + step + "</extra>",
            )
        )
    shapes, annotations = _stage_regions(plan)
    base = int(dynamics.steps[result.base])
    y_title = f"share of loss drop after step {base}" if base else "share of loss drop"
    layout = _base_layout(settings.SMALL_CHART_HEIGHT, plan.bounds.num_train_timesteps, "model timestep τ", y_title)
    layout["yaxis"]["tickformat"] = ".0%"
    layout["yaxis"]["title"]["font"] = dict(size=11)
    layout.update(shapes=shapes, annotations=annotations, margin=dict(l=58, r=16, t=46, b=70))
    layout["legend"]["y"] = -0.28
    figure.update_layout(**layout)
    return figure


def trajectory_summary(trajectory, plan: Plan) -> Optional[str]:
    """One sentence: which share of x̂₀'s way to the final image each stage's steps cover."""
    if trajectory is None or len(trajectory.distance) < 2:
        return None
    drops = trajectory.distance[:-1] - trajectory.distance[1:]  # the change made by step k+1's call
    stages = plan.stage_of(np.asarray(trajectory.timesteps)[1:])
    total = float(drops.sum())
    if not total > 0:
        return None
    shares = [float(drops[stages == i].sum()) / total if np.any(stages == i) else None for i in range(len(STAGE_NAMES))]
    return f"**Trajectory:** each stage's steps moved x̂₀ this share of its way to the final image: {_by_stage(shares)}."


def trajectory_figure(trajectory, plan: Plan) -> go.Figure:
    """RMS distance of x̂₀(t) to the final x̂₀ at every sampler step, coloured by stage."""
    if trajectory is None:
        return message_figure(
            "Press “Trace the model's trajectory” to sample a few images\nand measure how fast x̂₀ settles at each step.",
            settings.SMALL_CHART_HEIGHT,
        )
    timesteps = np.asarray(trajectory.timesteps)
    stages = plan.stage_of(timesteps)
    figure = go.Figure(
        go.Scatter(
            x=timesteps, y=trajectory.distance, mode="lines", line=dict(color="#9aa5b1", width=1.5),
            showlegend=False, hoverinfo="skip",
        )
    )
    for index, name in enumerate(STAGE_NAMES):
        mask = stages == index
        figure.add_trace(
            go.Scatter(
                x=timesteps[mask], y=trajectory.distance[mask], mode="markers", name=name,
                marker=dict(color=settings.STAGE_COLORS[name], size=7),
                hovertemplate="τ=%{x:.0f}<br>‖x̂₀(t) − x̂₀(final)‖ = %{y:.3f}<extra>" + name + "</extra>",
            )
        )
    shapes, annotations = _stage_regions(plan)
    layout = _base_layout(settings.SMALL_CHART_HEIGHT, plan.bounds.num_train_timesteps, "model timestep τ", "‖x̂₀(t) − x̂₀(final)‖ (RMS)")
    layout["yaxis"]["title"]["font"] = dict(size=11)
    layout.update(shapes=shapes, annotations=annotations, margin=dict(l=58, r=16, t=46, b=70))
    layout["legend"]["y"] = -0.28
    figure.update_layout(**layout)
    return figure


def message_figure(text: str, height: int, title: Optional[str] = None) -> go.Figure:
    """An empty chart that says why it is empty."""
    figure = go.Figure()
    figure.update_layout(
        height=height,
        margin=dict(l=10, r=10, t=10, b=10),
        font=FONT,
        plot_bgcolor="white",
        paper_bgcolor="white",
        xaxis=dict(visible=False, fixedrange=True),
        yaxis=dict(visible=False, fixedrange=True),
        annotations=[
            dict(
                text=text.replace("\n", "<br>"), x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                font=dict(size=13, color="#52606d"), align="center",
            )
        ],
    )
    return figure


def sensitivity_figure(sensitivity, curve: ScoreCurve, plan: Plan) -> go.Figure:
    """Measured sensitivity e(τ) of the pruned model (markers by stage) over the importance score (line, right axis).

    Where the score says a stage matters and e(τ) is high too, the paper's ordering and the
    measurement agree; a stage with a low score but a high e(τ) is where they do not.
    """
    if sensitivity is None:
        return message_figure("No measured sensitivity for this model\n(it needs the model's own dataset).", settings.SMALL_CHART_HEIGHT)
    timesteps = np.asarray(sensitivity.timesteps)
    stages = plan.stage_of(timesteps)
    figure = go.Figure()
    for index, name in enumerate(STAGE_NAMES):
        mask = stages == index
        figure.add_trace(
            go.Scatter(
                x=timesteps[mask], y=sensitivity.relative_error[mask], mode="markers+lines", name=f"e(τ) {name}",
                marker=dict(color=settings.STAGE_COLORS[name], size=7), line=dict(color=settings.STAGE_COLORS[name], width=1),
                hovertemplate="τ=%{x:.0f}<br>relative output error %{y:.4f}<extra>" + name + "</extra>",
            )
        )
    score = np.asarray(curve.score, dtype=np.float64)
    span = float(score.max() - score.min()) or 1.0
    figure.add_trace(
        go.Scatter(
            x=np.asarray(curve.timesteps), y=(score - score.min()) / span, mode="lines", name="importance score (normalised)",
            line=dict(color=settings.TERM_COLORS["score"], width=2, dash="dot"), yaxis="y2",
            hovertemplate="τ=%{x}<br>score %{y:.3f}<extra></extra>",
        )
    )
    shapes, annotations = _stage_regions(plan)
    layout = _base_layout(settings.SMALL_CHART_HEIGHT, plan.bounds.num_train_timesteps, "model timestep τ", "relative output error e(τ)")
    layout["yaxis"]["title"]["font"] = dict(size=11)
    layout.update(
        shapes=shapes, annotations=annotations, margin=dict(l=58, r=58, t=46, b=70),
        yaxis2=dict(overlaying="y", side="right", range=[0, 1.05], showgrid=False, title=dict(text="score", font=dict(size=11))),
    )
    layout["legend"]["y"] = -0.28
    figure.update_layout(**layout)
    return figure


def tune_front_figure(result: dict) -> go.Figure:
    """The tuner's candidates: PSNR to dense over the MAC fraction (predicted ones open), the Pareto front joined, the chosen point ringed."""
    points = result["points"]
    figure = go.Figure()
    colors = {"dense": "#9aa5b1", "paper": settings.TERM_COLORS["snr"], "measured": settings.TERM_COLORS["score"]}
    for kind, color in colors.items():
        for predicted in (False, True):  # predicted points (from the recorded error, not sampled) drawn open
            chosen = [p for p in points if p["allocation"] == kind and bool(p.get("predicted")) == predicted]
            if predicted and not chosen:
                continue
            name = f"{kind}, predicted" if predicted else kind
            figure.add_trace(
                go.Scatter(
                    x=[p["macs_fraction"] for p in chosen], y=[p["psnr"] for p in chosen], mode="markers", name=name,
                    marker=dict(color=color, size=8, symbol="circle-open" if predicted else "circle"),
                    text=[f"{p['steps']} steps" for p in chosen],
                    hovertemplate="%{text}<br>MACs %{x:.3f} of dense<br>PSNR %{y:.2f} dB"
                    + (" (predicted)" if predicted else "") + "<extra>" + kind + "</extra>",
                )
            )
    front = [points[i] for i in result["front"]]
    figure.add_trace(
        go.Scatter(
            x=[p["macs_fraction"] for p in front], y=[p["psnr"] for p in front], mode="lines", name="Pareto front",
            line=dict(color="#333", width=1, dash="dot"), hoverinfo="skip",
        )
    )
    if result["chosen"] is not None:
        best = points[result["chosen"]]
        figure.add_trace(
            go.Scatter(
                x=[best["macs_fraction"]], y=[best["psnr"]], mode="markers", name="chosen",
                marker=dict(size=16, color="rgba(0,0,0,0)", line=dict(color="#E45756", width=2.5)), hoverinfo="skip",
            )
        )
    figure.add_vline(x=result["budget"], line=dict(color="#E45756", dash="dash", width=1.5))
    yaxis = dict(title=dict(text="PSNR to dense (dB)"), gridcolor="#eef1f4", fixedrange=True)
    # The dense run at the reference steps is the reference itself: its PSNR is the metric's cap
    # (identical images), far above every candidate, and would squash their 1-2 dB differences
    # into a flat line. The axis spans the candidates; the reference is named at the top edge.
    reference = [p for p in points if p["allocation"] == "dense" and p["steps"] == result.get("reference_steps")]
    others = [p["psnr"] for p in points if p not in reference and math.isfinite(p["psnr"])]
    if reference and others:
        low, high = min(others), max(others)
        pad = max(1.0, 0.08 * (high - low))
        yaxis["range"] = [low - pad, high + 2 * pad]
        figure.add_annotation(
            x=reference[0]["macs_fraction"], xref="x", y=1.0, yref="paper", xanchor="right", yanchor="top", showarrow=False,
            text=f"↑ dense at {reference[0]['steps']} steps: the reference", font=dict(size=11, color="#52606d"),
        )
    figure.update_layout(
        height=settings.SMALL_CHART_HEIGHT, font=FONT, plot_bgcolor="white", paper_bgcolor="white", dragmode=False,
        margin=dict(l=58, r=16, t=30, b=48),
        xaxis=dict(title=dict(text="MACs (fraction of dense)"), gridcolor="#eef1f4", fixedrange=True),
        yaxis=yaxis,
        legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0, font=dict(size=11)),
    )
    return figure
