"""The Divide section of the studio: model, schedule & stages, teaching panel, sparsity & cost.

`build_divide_section(demo, engine)` lays the components out inside the current
`gr.Blocks`, wires their events to a `DivideHandlers`, and returns a `DivideSection` whose
`plan_state` (a `gr.State` holding `Plan.to_dict()`) and `controls` later sections read.

Events (all of them go through `DivideHandlers`, which turns ValueError into gr.Error):

| trigger                                   | handler          | api_name     |
|-------------------------------------------|------------------|--------------|
| slider release, sampler, c_x, checkbox    | `divide`         | private      |
| M slider released                         | `set_M`          | private      |
| (API only) the 12 controls               | `divide`         | `divide`     |
| threshold dragged (hidden textbox change) | `drag`           | private      |
| stage edge dragged (hidden textbox change)| `drag_edges`     | private      |
| model picked / folder entered, page load  | `select_model`   | private      |
| "Trace the model's trajectory" (a job)    | `submit_trace`   | private      |
| (API only) the trace, blocking            | `trace`          | `trajectory` |
| (API only) plain arguments → plan dict    | `plan_api`       | `plan`       |
| (API only) the same, with hand-set edges  | `plan_edges_api` | `plan_edges` |

The endpoints keep their argument lists: gradio's REST route (unlike gradio_client) does
not fill defaults, so a new argument would break raw callers. Hand-set edges therefore come
through endpoints of their own (`plan_edges`, `prune_start_edges`, `compare_start_edges`).

Hand-set stage edges live in `edges_state` (None: edges from M; else [τ_lo, τ_hi]), the 13th
of the `controls`. Dragging an edge line sets them; dragging the threshold line, moving the
M slider or picking another model resets them to M's. Every other control keeps them: they
are training timesteps, so they hold for any sampler and step count (docs/method.md §12.1).

Sliders update on *release* (pointer up, or leaving the number box), so typing "0.4" does
not plan for "0." on the way.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass
from typing import Optional

import gradio as gr
from gradio.components.plot import PlotData

from mosaic_core.divide.flow_schedule import is_flow_matching
from mosaic_core.divide.plan import Plan
from mosaic_core.models.samplers import model_default_sampler
from mosaic_core.divide.stages import STAGE_NAMES

from ui import charts, settings
from ui.engine import StudioEngine
from mosaic_core.divide.stages import snap_M
from ui.frontend import DRAG_ELEM_ID, EDGE_DRAG_ELEM_ID, PLOT_ELEM_ID
from ui.job_view import JobView, user_errors
from ui.panels import cost_panel_html, stage_table_html
from mosaic_core.requests import PlanRequest

TEACHING_TEXT = """
**Why the middle stage is pruned lightly.** Pretraining does not learn every noise level at
the same speed (above: this model's own record), and MosaicDiff's premise is that the
fast-learning middle levels, located by the Grad term on the left, are the fragile ones.
Early on, x̂₀ is still far from the final image (below) and later steps correct much of what
a pruned network gets wrong, while in the middle stage the content is being committed and
errors stay. On digits-dit, pruning one stage alone to sparsity 0.6 cost 0.4 dB of PSNR in
the early stage but 12.6 dB in the middle one (docs/method.md §7). The slow–fast–slow premise
was reported for DDPM-trained DiTs; it has **not** been measured for flow-matching models
(SD3, Flux, docs/method.md §8.6).
"""

FLOW_NOTE = (
    "**Flow-matching model: an untested premise.** No one has measured slow–fast–slow learning for "
    "flow-matching models. Here the Grad term's hump comes from the sampler's σ shift alone (how fast "
    "x_σ leaves x₀ per step), not from this model's training (docs/method.md §8.6). Treat the stages as "
    "a hypothesis: prune one stage at a time and compare before trusting them."
)

CX_INFO = "1.0 is the fallback"
CONTROL_NAMES = ("model", "folder", "sampler", "steps", "M", "lam", "cx", "sparsity", "per_stage", "early", "middle", "late")
PLAN_CONTROL_COUNT = len(CONTROL_NAMES) + 2  # `DivideSection.controls`: the 12 above, the hand-set edges, dropped steps
DROP_INFO = "DDIM only: skip this many of the steps, evenly (the first and last always run)"


def parse_dragged_M(text: str) -> float:
    """'0.412|1712345678' (M|nonce, written by the browser) -> M clamped to M_RANGE and snapped to M_STEP."""
    head = str(text or "").split("|", 1)[0].strip()
    try:
        value = float(head)
    except ValueError:
        raise ValueError(f"dragged threshold must be a number M in (0, 1), got {head!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"dragged threshold must be a finite M in (0, 1), got {value}")
    return snap_M(value)


def dragged_edges(text: str, current: tuple[int, int], num_train_timesteps: int) -> tuple[int, int]:
    """'edge-low:412.7|nonce' (which line, dropped x, written by the browser) -> new (τ_lo, τ_hi).

    The low line is drawn at τ_lo − ½ and the high line at τ_hi + ½ (ui/charts.py), so the
    dropped x gives τ_lo = ⌊x + 1⌋ or τ_hi = ⌊x⌋, clipped to [0, T−1]; the other edge stays
    at `current`. A line dropped past the other one swaps their roles (the pair is sorted).
    """
    head = str(text or "").split("|", 1)[0].strip()
    name, _, number = head.partition(":")
    if name not in charts.EDGE_SHAPE_NAMES:
        raise ValueError(f"dragged edge must be one of {', '.join(charts.EDGE_SHAPE_NAMES)}, got {name!r}")
    try:
        x = float(number)
    except ValueError:
        raise ValueError(f"dragged edge position must be a number (a model timestep), got {number!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"dragged edge position must be a finite model timestep, got {x}")
    low, high = (int(v) for v in current)
    last = num_train_timesteps - 1
    if name == charts.EDGE_SHAPE_NAMES[0]:
        low = int(min(max(math.floor(x + 1.0), 0), last))
    else:
        high = int(min(max(math.floor(x), 0), last))
    return (low, high) if low <= high else (high, low)


@dataclass
class DivideSection:
    """The components of the Divide section that other sections read or listen to."""

    model: gr.Dropdown
    folder: gr.Textbox
    sampler: gr.Dropdown
    steps: gr.Slider
    drop_steps: gr.Number  # reference steps dropped evenly (DDIM only, docs/method.md §4.6)
    M: gr.Slider
    lam: gr.Slider
    cx: gr.Number
    sparsity: gr.Slider
    per_stage: gr.Checkbox
    stage_sparsity: tuple[gr.Slider, gr.Slider, gr.Slider]
    plan_state: gr.State
    plan_json: gr.JSON
    status: gr.Markdown
    schedule_plot: gr.Plot
    stage_table: gr.HTML
    cost_panel: gr.HTML
    dynamics_plot: gr.Plot
    trajectory_plot: gr.Plot
    trace_button: gr.Button
    teaching_note: gr.Markdown
    drag_box: gr.Textbox
    edge_drag_box: gr.Textbox
    edges_state: gr.State  # None (edges from M) or [τ_lo, τ_hi] set by dragging an edge line
    replan_box: gr.Textbox  # hidden: a section that sets the controls itself writes a new value here to re-plan
    demo: gr.Blocks  # the page: later sections add their own load events to it

    @property
    def controls(self) -> list:
        """The inputs of a plan, in `DivideHandlers.divide`'s argument order (`PLAN_CONTROL_COUNT` of them)."""
        return [
            self.model, self.folder, self.sampler, self.steps, self.M, self.lam, self.cx,
            self.sparsity, self.per_stage, *self.stage_sparsity, self.edges_state, self.drop_steps,
        ]

    @property
    def plan_outputs(self) -> list:
        """What `DivideHandlers.divide` returns, in order."""
        return [
            self.schedule_plot, self.stage_table, self.cost_panel, self.plan_state, self.plan_json,
            self.dynamics_plot, self.trajectory_plot, self.teaching_note, *self.stage_sparsity,
        ]


class DivideHandlers:
    """Event handlers of the Divide section; each takes component values and returns updates."""

    def __init__(self, engine: StudioEngine) -> None:
        self.engine = engine
        self._revision = itertools.count(1)

    # ----- plans ------------------------------------------------------------------------------
    def _plan(self, *controls):
        """(spec, plan) of the Divide controls, through the one `PlanRequest` the API and CLI use too."""
        request = PlanRequest.from_controls(*controls)
        spec = self.engine.resolve(request.model)
        return spec, request.build(spec)

    def _render(self, spec, plan: Plan) -> tuple:
        curve = self.engine.curve(spec, plan.lam, plan.cx, plan.image_seq_len)
        figure = charts.mark_flow_schedule(charts.schedule_figure(curve, plan), plan)
        # A fresh revision makes every answer a new figure, so the browser redraws even when
        # a drag lands on the M it already had (and puts the dropped line back in place).
        figure.layout.meta["revision"] = next(self._revision)
        schedule = PlotData(type="plotly", plot=charts.figure_json(figure, charts.SCHEDULE_CONFIG))
        data = plan.to_dict()
        dynamics = self.engine.dynamics(spec)
        trajectory = self.engine.cached_trajectory(spec, plan.scheduler, plan.num_inference_steps)
        # While the allocation is automatic, the (disabled) per-stage sliders mirror it, so
        # ticking "Set per stage" starts from the current plan; manual values are left alone.
        mirrored = [
            gr.update() if plan.mode == "manual" else gr.update(value=round(value, 2))
            for value in plan.allocation.requested
        ]
        return (
            schedule,
            stage_table_html(plan),
            cost_panel_html(plan, self.engine.parameter_split(spec)),
            data,
            data,
            charts.dynamics_figure(dynamics, plan),
            charts.trajectory_figure(trajectory, plan),
            self._teaching_note(dynamics, trajectory, plan),
            *mirrored,
        )

    @staticmethod
    def _teaching_note(dynamics, trajectory, plan: Plan) -> str:
        """The data-driven lines under the teaching charts (empty when there is no data)."""
        lines = [charts.dynamics_summary(dynamics, plan), charts.trajectory_summary(trajectory, plan)]
        if is_flow_matching(plan.scheduler_config):
            lines.insert(0, FLOW_NOTE)
        return "\n\n".join(line for line in lines if line)

    @user_errors
    def divide(self, *controls):
        """Plan from the controls; returns the schedule chart, tables, plan dict and teaching charts."""
        spec, plan = self._plan(*controls)
        return self._render(spec, plan)

    @user_errors
    def set_M(self, model, folder, sampler, steps, M, lam, cx, sparsity, per_stage, early, middle, late, edges=None, drop=0):
        """The M slider was released: edges back to M's, and re-plan."""
        spec, plan = self._plan(model, folder, sampler, steps, M, lam, cx, sparsity, per_stage, early, middle, late, None, drop)
        return (None, *self._render(spec, plan))

    @user_errors
    def drag(self, dragged, model, folder, sampler, steps, M, lam, cx, sparsity, per_stage, early, middle, late, edges=None,
             drop=0):
        """The threshold line was dropped: set the M slider to it, edges back to M's, and re-plan."""
        new_M = parse_dragged_M(dragged)
        spec, plan = self._plan(model, folder, sampler, steps, new_M, lam, cx, sparsity, per_stage, early, middle, late, None, drop)
        return (new_M, None, *self._render(spec, plan))

    @user_errors
    def drag_edges(self, dragged, model, folder, sampler, steps, M, lam, cx, sparsity, per_stage, early, middle, late, edges=None,
                   drop=0):
        """A stage-edge line was dropped: move that edge (the other stays), keep the edges by hand, re-plan."""
        controls = (model, folder, sampler, steps, M, lam, cx, sparsity, per_stage, early, middle, late)
        spec, current = self._plan(*controls, edges, drop)
        new_edges = dragged_edges(dragged, current.bounds.middle, current.bounds.num_train_timesteps)
        spec, plan = self._plan(*controls, list(new_edges), drop)
        return (list(new_edges), *self._render(spec, plan))

    @user_errors
    def select_model(self, *controls):
        """A model was picked (or the page loaded): its status, c_x hint, trajectory button, the sampler
        and step count (the model's own, as its pipeline samples: PixArt-Σ DPM-Solver at 20, SD3 flow
        Euler at 28; as the CFG box takes the model's scale), edges back to M's, no dropped steps, and the plan."""
        request = PlanRequest.from_controls(*controls[: len(CONTROL_NAMES)])
        spec = self.engine.resolve(request.model)
        request = dataclasses.replace(request, sampler=model_default_sampler(spec), steps=spec.default_steps)
        plan = request.build(spec)
        status = self.engine.status(spec)
        measured = self.engine.measured_cx(spec)
        cx_info = CX_INFO if measured is None else f"{CX_INFO}; measured on its training images: {measured:.3f}"
        return (
            status.message,
            gr.update(info=cx_info),
            gr.update(interactive=status.weights_present),
            gr.update(value=plan.scheduler),
            gr.update(value=plan.num_inference_steps),
            None,
            gr.update(value=0),
            *self._render(spec, plan),
        )

    @staticmethod
    def toggle_per_stage(per_stage: bool):
        """Per-stage sliders on (they already hold the automatic allocation) or the target slider on."""
        return (gr.update(interactive=not per_stage), *(gr.update(interactive=bool(per_stage)) for _ in STAGE_NAMES))

    def submit_trace(self, owner, *controls) -> str:
        """Queue the trajectory trace of the controls' model, sampler and steps as a job (cached: done at once)."""
        spec, plan = self._plan(*controls)
        self.engine.require_weights(spec)
        cached = self.engine.cached_trajectory(spec, plan.scheduler, plan.num_inference_steps)
        if cached is not None:
            return self.engine.jobs.record(self._trace_result(spec, plan, cached), label="trajectory", owner=owner)

        def work(context):
            context.report(0.0, "loading the model")
            trajectory = self.engine.trajectory(
                spec, plan.scheduler, plan.num_inference_steps, should_stop=context.should_stop,
                on_step=lambda done, total: context.report(
                    done / total, f"sampling {settings.TRAJECTORY_IMAGES} images · step {done}/{total}"
                ),
            )
            return self._trace_result(spec, plan, trajectory)

        return self.engine.jobs.submit(work, label="trajectory", owner=owner)

    def _trace_result(self, spec, plan: Plan, trajectory) -> tuple:
        """(figure, note) of a trajectory: all a finished trace job keeps (no model, no arrays beyond the chart)."""
        note = self._teaching_note(self.engine.dynamics(spec), trajectory, plan)
        return charts.trajectory_figure(trajectory, plan), note

    @user_errors
    def trace(self, request: gr.Request, model, folder, sampler, steps, M, lam, cx, sparsity, per_stage, early, middle, late,
              progress=gr.Progress()):
        """The blocking `trajectory` endpoint: submit the trace job, follow its progress, return (figure, note)."""
        owner = None if request is None else request.session_hash
        job_id = self.submit_trace(owner, model, folder, sampler, steps, M, lam, cx, sparsity, per_stage, early, middle, late)
        deadline = time.monotonic() + settings.TRAJECTORY_WAIT_SECONDS
        status = self.engine.jobs.wait(job_id, timeout=0, owner=owner)
        while not status.is_finished:
            if time.monotonic() > deadline:
                self.engine.jobs.cancel(job_id, owner)
                raise ValueError(
                    f"the trajectory trace did not finish within {settings.TRAJECTORY_WAIT_SECONDS} s ({status.summary}): "
                    "it was cancelled; try again when the studio is less busy"
                )
            progress(status.fraction, desc=status.message or status.summary)
            status = self.engine.jobs.wait(job_id, timeout=settings.JOB_POLL_SECONDS, owner=owner)
        if status.state != "done":
            raise ValueError(f"trajectory {status.summary}")
        return status.result

    @user_errors
    def plan_api(
        self,
        model: str = settings.MODEL_DEFAULT,
        sampler: Optional[str] = None,
        steps: Optional[int] = None,
        M: float = settings.M_DEFAULT,
        lam: float = settings.LAM_DEFAULT,
        sparsity: Optional[float] = settings.SPARSITY_DEFAULT,
        stage_sparsity: Optional[list[float]] = None,
        cx: float = settings.CX_DEFAULT,
        drop_steps: int = 0,
    ) -> dict:
        """The MosaicDiff plan (Plan.to_dict()) for a model name or local folder.

        Give `stage_sparsity` [early, middle, late] for a manual allocation (then `sparsity`
        is ignored), else `sparsity` is the overall target of the automatic allocation.
        `sampler` None (the default) is the model's own (DDIM for DiT, flow-euler for SD3), and
        `steps` None its own step count (50 for DiT, 28 for SD3, 4 for FLUX.1-schnell).
        `drop_steps` k (DDIM only) plans for N − k of the `steps` reference steps, kept evenly:
        stage step counts, allocation and MACs are the kept steps' (`sample --drop-steps`).
        Values go to the engine unchanged; a bad one comes back as an error naming it.
        """
        return self._plan_dict(model, sampler, steps, M, lam, sparsity, stage_sparsity, cx, None, drop_steps)

    @user_errors
    def plan_edges_api(
        self,
        model: str = settings.MODEL_DEFAULT,
        sampler: Optional[str] = None,
        steps: Optional[int] = None,
        M: float = settings.M_DEFAULT,
        lam: float = settings.LAM_DEFAULT,
        sparsity: Optional[float] = settings.SPARSITY_DEFAULT,
        stage_sparsity: Optional[list[float]] = None,
        cx: float = settings.CX_DEFAULT,
        edges: Optional[list[int]] = None,
        drop_steps: int = 0,
    ) -> dict:
        """The plan of `plan`, with the stage edges set by hand: `edges` [LO, HI] is the middle
        stage in training timesteps, 0 <= LO <= HI < T (M is then recorded but unused; None: from M).
        """
        return self._plan_dict(model, sampler, steps, M, lam, sparsity, stage_sparsity, cx, edges, drop_steps)

    def _plan_dict(self, model, sampler, steps, M, lam, sparsity, stage_sparsity, cx, edges, drop_steps=0) -> dict:
        """`Plan.to_dict()` of raw API values (ValueError naming a bad one)."""
        request = PlanRequest.from_values(
            model, sampler, steps, M, lam, sparsity, stage_sparsity, cx, edges=edges, drop_steps=drop_steps
        )
        return request.build(self.engine.resolve(request.model)).to_dict()


def _model_row(engine: StudioEngine):
    with gr.Row(equal_height=True):
        model = gr.Dropdown(
            engine.model_choices(), value=settings.MODEL_DEFAULT, label="Model", scale=3,
            info="built-in digits-dit works offline; hub ids need local weights to sample, not to plan",
        )
        folder = gr.Textbox(
            label="…or a local diffusers folder", placeholder="/path/to/model (press Enter)", scale=3, elem_id="mosaic-folder",
            info="overrides the picker when filled",
        )
        sampler = gr.Dropdown(list(settings.SAMPLERS), value=settings.SAMPLER_DEFAULT, label="Sampler", scale=1)
        steps = gr.Slider(*settings.STEPS_RANGE, value=settings.STEPS_DEFAULT, step=1, label="Steps", scale=2)
        drop_steps = gr.Number(
            value=0, precision=0, minimum=0, label="Dropped steps", scale=1, elem_id="mosaic-drop-steps", info=DROP_INFO,
        )
    status = gr.Markdown(elem_id="mosaic-status")
    return model, folder, sampler, steps, drop_steps, status


def build_divide_section(demo: gr.Blocks, engine: StudioEngine) -> DivideSection:
    """Lay out and wire the Divide section inside `demo`; returns its components."""
    handlers = DivideHandlers(engine)
    gr.Markdown("## 1 · Model")
    model, folder, sampler, steps, drop_steps, status = _model_row(engine)

    gr.Markdown(
        "## 2 · Divide: schedule and stages\n"
        "Drag the dashed threshold line (or move **M**): the middle stage is the run of timesteps "
        "whose importance score stays above M × max score. Or drag either purple edge line to set that "
        "boundary by hand (moving M again puts both edges back on M's)."
    )
    with gr.Row():
        with gr.Column(scale=3, min_width=520):
            schedule_plot = gr.Plot(label="Importance score over the noise levels", elem_id=PLOT_ELEM_ID, show_label=True)
            with gr.Row():
                M = gr.Slider(
                    *settings.M_RANGE, value=settings.M_DEFAULT, step=settings.M_STEP, label="M (threshold)",
                    elem_id="mosaic-M", scale=3,
                )
                lam = gr.Slider(
                    *settings.LAM_RANGE, value=settings.LAM_DEFAULT, step=settings.LAM_STEP, label="λ (ln SNR weight)",
                    elem_id="mosaic-lam", scale=3,
                )
                cx = gr.Number(value=settings.CX_DEFAULT, label="c_x = E‖x₀‖²/d", elem_id="mosaic-cx", scale=2, info=CX_INFO)
            stage_table = gr.HTML(elem_id="mosaic-stages")
        with gr.Column(scale=2, min_width=360):
            dynamics_plot = gr.Plot(label="Training dynamics: how fast each noise level was learned", elem_id="mosaic-dynamics-plot")
            trajectory_plot = gr.Plot(label="The model's trajectory: x̂₀ settling, step by step", elem_id="mosaic-trajectory-plot")
            trace = JobView(
                engine, "trajectory", idle="Sample a few images densely to see x̂₀ settle (needs the weights).",
                done_title="Tracing", nothing_running="No trajectory trace is running.",
            )
            trace.layout("Trace the model's trajectory", start_variant="secondary", size="sm", interactive=False)
            trace_button = trace.start_button
            teaching_note = gr.Markdown(elem_id="mosaic-teaching-note")
            gr.Markdown(TEACHING_TEXT, elem_classes="mosaic-teaching")

    gr.Markdown("## 3 · Sparsity and cost")
    with gr.Row():
        with gr.Column(scale=2, min_width=320):
            sparsity = gr.Slider(
                *settings.SPARSITY_RANGE, value=settings.SPARSITY_DEFAULT, step=settings.SPARSITY_STEP,
                label="Target sparsity (step-weighted, automatic allocation)", elem_id="mosaic-sparsity",
            )
            per_stage = gr.Checkbox(value=False, label="Set per stage", elem_id="mosaic-per-stage")
            stage_sliders = tuple(
                gr.Slider(
                    *settings.SPARSITY_RANGE, value=0.0, step=settings.SPARSITY_STEP, label=f"{name} sparsity",
                    interactive=False, elem_id=f"mosaic-sparsity-{name}",
                )
                for name in STAGE_NAMES
            )
        with gr.Column(scale=3, min_width=420):
            cost_panel = gr.HTML(elem_id="mosaic-cost")
    with gr.Accordion("Plan as JSON (what the Prune step reads)", open=False):
        plan_json = gr.JSON(label="plan", elem_id="mosaic-plan-json")
    plan_state = gr.State(None)
    drag_box = gr.Textbox(visible="hidden", elem_id=DRAG_ELEM_ID, label="dragged M")
    edge_drag_box = gr.Textbox(visible="hidden", elem_id=EDGE_DRAG_ELEM_ID, label="dragged edge")
    edges_state = gr.State(None)
    replan_box = gr.Textbox(visible="hidden", elem_id="mosaic-replan", label="re-plan request")

    section = DivideSection(
        model=model, folder=folder, sampler=sampler, steps=steps, drop_steps=drop_steps, M=M, lam=lam, cx=cx, sparsity=sparsity,
        per_stage=per_stage, stage_sparsity=stage_sliders, plan_state=plan_state, plan_json=plan_json,
        status=status, schedule_plot=schedule_plot, stage_table=stage_table, cost_panel=cost_panel,
        dynamics_plot=dynamics_plot, trajectory_plot=trajectory_plot, trace_button=trace_button,
        teaching_note=teaching_note, drag_box=drag_box, edge_drag_box=edge_drag_box, edges_state=edges_state, replan_box=replan_box, demo=demo,
    )
    controls, outputs = section.controls, section.plan_outputs
    quiet = dict(show_progress="minimal", trigger_mode="always_last")

    M.release(
        handlers.set_M, inputs=controls, outputs=[edges_state, *outputs], api_visibility="private", **quiet,
    )
    gr.on(
        [lam.release, steps.release, sparsity.release, *(s.release for s in stage_sliders),
         sampler.input, cx.submit, cx.blur, drop_steps.submit, drop_steps.blur],
        handlers.divide, inputs=controls, outputs=outputs, api_name="divide_controls", api_visibility="private", **quiet,
    )
    # The API endpoints `divide` and `trajectory` take the same 12 values, but through hidden
    # pass-through inputs: a slider or dropdown would refuse a bad value (a string, a dict, an
    # unknown sampler) in gradio's own preprocessing, with a message that names no parameter.
    # Here every value reaches `PlanRequest.from_controls`, whose error names it.
    api_inputs = [gr.JSON(visible=False, label=name) for name in CONTROL_NAMES]
    api_button = gr.Button(visible=False)
    api_button.click(handlers.divide, inputs=api_inputs, outputs=outputs, api_name="divide", **quiet)
    # Controls set by another section's result (the tuner's chosen point) fire no release or
    # input event, so that section also writes a new value into this hidden box: the plan
    # view is redrawn from the controls as they are now.
    replan_box.change(handlers.divide, inputs=controls, outputs=outputs, api_visibility="private", **quiet)
    drag_box.change(handlers.drag, inputs=[drag_box, *controls], outputs=[M, edges_state, *outputs], api_visibility="private", **quiet)
    edge_drag_box.change(
        handlers.drag_edges, inputs=[edge_drag_box, *controls], outputs=[edges_state, *outputs], api_visibility="private", **quiet
    )
    model_outputs = [status, cx, trace_button, sampler, steps, edges_state, drop_steps, *outputs]
    gr.on(
        [model.input, folder.submit], handlers.select_model, inputs=controls, outputs=model_outputs,
        api_visibility="private", **quiet,
    )
    demo.load(handlers.select_model, inputs=controls, outputs=model_outputs, api_visibility="private")
    per_stage.input(
        handlers.toggle_per_stage, inputs=[per_stage], outputs=[sparsity, *stage_sliders],
        api_visibility="private", show_progress="hidden",
    ).then(handlers.divide, inputs=controls, outputs=outputs, api_visibility="private", **quiet)
    trace.wire(
        handlers.submit_trace, start_inputs=controls, render=lambda status: status.result,
        render_outputs=[trajectory_plot, teaching_note],
    )
    api_button.click(handlers.trace, inputs=api_inputs, outputs=[trajectory_plot, teaching_note], api_name="trajectory")
    gr.api(handlers.plan_api, api_name="plan")
    gr.api(handlers.plan_edges_api, api_name="plan_edges")
    return section
