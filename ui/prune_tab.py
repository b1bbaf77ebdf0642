"""The Prune section: one background job per press of Start, with a live progress bar and Cancel.

`build_prune_section(engine, divide)` lays out the calibration controls, Start/Cancel, the
progress bar and the result panel, and returns a `PruneSection` that the Compare section
reads (its calibration controls say which pruned model to compare).

How it stays responsive: Start only *submits* a job to `engine.jobs` (one worker thread,
FIFO) and returns at once with the job id in a `gr.State`, switching a `gr.Timer` on. Every
`JOB_POLL_SECONDS` the timer's tick reads the job's status and redraws the bar; when the job
has finished it draws the result (or a warning) and switches itself off. Cancel sets the
job's stop flag, which the engine's loops poll between batches and layers.

Caching (see `StudioEngine.prune`): the same model + plan + prune settings come back from
memory at once (no job is queued), or from the checkpoint in the disk cache after a
restart; moving only the sparsity reuses the cached Hessians and removal orders.

Start, the progress bar, its timer and Cancel are one `JobView` (ui/job_view.py), shared
with Compare and the trajectory trace; it also registers the API trio:

| trigger        | handler                          | api_name (gr.api, plain arguments) |
|----------------|----------------------------------|------------------------------------|
| Start          | `PruneHandlers.start`            | `prune_start` (`start_api`)        |
| timer tick     | `JobView` poll → `render`        | `prune_status`                     |
| Cancel         | `JobView` cancel                 | `prune_cancel`                     |
| Best at budget | `TuneHandlers.start`             | `tune_start` (`start_api`), `tune_status`, `tune_cancel` |
"""

from __future__ import annotations

import html
import math
import threading
from dataclasses import dataclass, replace
from typing import Optional

import gradio as gr
from gradio.components.plot import PlotData

from ui import charts, settings
from mosaic_core.conquer.tune import methods_for_sampler
from mosaic_core.prune.service import PrunedModel
from mosaic_core.requests import PlanRequest, PruneRequest
from ui.divide_tab import PLAN_CONTROL_COUNT
from ui.engine import StudioEngine
from ui.job_view import JobView, cache_usage_text, owner_of, status_dict, user_errors
from ui.jobs import JobStatus
from ui.panels import _chip, format_count

PRUNE_TEXT = """
## 4 · Prune: one sub-network per stage
Calibration images are noised at each stage's own noise levels (**snr**, MosaicDiff; *random*
and *clean* are the ablations), the Hessian of every attention-output and MLP-output layer is
gathered, and structured OBS removes the heads and MLP units the plan asks for, re-solving the
kept weights. The job runs in the background: the page stays usable, and the result is cached
(same settings → at once; only the sparsity moved → the Hessians are reused).
"""

IDLE_PRUNE = "No pruning job yet: press Start to prune the plan above."


def describe_prune_event(event) -> str:
    """'hessian · middle', 'solve · middle · transformer_blocks.3.ff.net.2', 'calibrate · preparing 16 …'."""
    return " · ".join(part for part in (event.phase, event.stage, event.layer or event.message) if part)


def _seconds_line(seconds: dict) -> str:
    parts = [f"{name} {value:.1f} s" for name, value in seconds.items()]
    return " · ".join(parts) + f" (total {sum(seconds.values()):.1f} s)"


def _mib(value: int) -> str:
    return f"{value / 2**20:.1f} MiB"


def checkpoint_folder(pruned: PrunedModel) -> str:
    """The checkpoint's folder as the cache names it ('pruned/<key>'), never an absolute server path."""
    return f"pruned/{pruned.key}"


def prune_summary(pruned: PrunedModel) -> dict:
    """What the API returns about a pruned model (JSON-ready)."""
    ledger = pruned.ledger
    return {
        "key": pruned.key,
        "folder": checkpoint_folder(pruned),  # relative to the cache root: no server path
        "source": pruned.source,
        "from_cache": pruned.from_cache,
        "load_seconds": round(pruned.load_seconds, 3),
        "model": pruned.plan.model,
        "overall_sparsity": pruned.plan.overall_sparsity,
        "prune": pruned.config.to_dict(),
        "stages": [
            {
                "name": s.name, "num_steps": s.num_steps, "sparsity": s.sparsity,
                "heads_kept": s.heads_kept, "heads_total": s.heads_total,
                "units_kept": s.units_kept, "units_total": s.units_total, "shared_with": s.shared_with,
            }
            for s in pruned.stages
        ],
        "seconds": {k: round(float(v), 3) for k, v in pruned.seconds.items()},
        "cx": pruned.cx,
        "memory": {
            "dense_bytes": ledger.dense_bytes,
            "staged_bytes": ledger.staged_bytes,
            "naive_bytes": ledger.naive_bytes,
            "stage_params": list(ledger.stage_params),
        },
    }


ALLOCATION_WORDS = {"per-stage": "paper", "per-block": "per-block", "measured": "measured"}


def prune_result_html(pruned: PrunedModel) -> str:
    """Kept heads/units per stage, prune seconds by phase, measured c_x and the memory ledger."""
    plan, config, ledger = pruned.plan, pruned.config, pruned.ledger
    calibration = config.calibration
    if pruned.source == "pruned":
        headline = f"Pruned in {pruned.load_seconds:.1f} s and saved to the cache."
    else:
        where = "memory" if pruned.source == "memory" else "the disk cache"
        headline = f"Loaded from cache ({where}) in {pruned.load_seconds:.2f} s: these settings were pruned before."
    rows = []
    for s in pruned.stages:
        network = "dense (not pruned)" if s.shared_with == "dense" else (f"same as {s.shared_with}" if s.shared_with else "own")
        rows.append(
            f'<tr data-stage="{s.name}"><td>{_chip(s.name)}</td>'
            f'<td data-stage="{s.name}" data-field="steps">{s.num_steps}</td>'
            f'<td data-stage="{s.name}" data-field="sparsity">{s.sparsity:.3f}</td>'
            f'<td data-stage="{s.name}" data-field="heads">{s.heads_kept}/{s.heads_total}</td>'
            f'<td data-stage="{s.name}" data-field="units">{s.units_kept}/{s.units_total}</td>'
            f'<td data-stage="{s.name}" data-field="network">{html.escape(network)}</td></tr>'
        )
    cx_note = ""
    if math.isfinite(pruned.cx) and abs(pruned.cx - plan.cx) > 1e-3:
        cx_note = (
            f' <span class="mosaic-muted">(the plan divides with c<sub>x</sub> = {plan.cx:g}: enter the measured value '
            "in section 2 to divide with it)</span>"
        )
    rule_row = ""
    if config.allocation == "measured":  # where the recorded errors disagree with the score's split
        paper = " · ".join(f"{s.name} {a:.3f}" for s, a in zip(pruned.stages, plan.allocation.achieved))
        measured = " · ".join(f"{s.name} {s.sparsity:.3f}" for s in pruned.stages)
        rule_row = (
            "<tr><th>stage sparsity by rule</th>"
            f'<td>measured (built): <b data-field="measured-sparsity">{measured}</b><br>'
            f'paper (importance score): <span data-field="paper-sparsity">{paper}</span></td></tr>'
        )
    cx_text = f"{pruned.cx:.4f}" if math.isfinite(pruned.cx) else "— (no stage needed calibration)"
    seconds = _seconds_line(pruned.seconds) if pruned.seconds else "—"
    caption = (
        f"{html.escape(plan.model)} · {plan.scheduler} {plan.num_inference_steps} steps · overall sparsity "
        f"{plan.overall_sparsity:.3f} ({plan.mode}) · {calibration.mode} calibration, {calibration.size} images "
        f"per stage ({calibration.source}) · {config.scorer} · {ALLOCATION_WORDS.get(config.allocation, config.allocation)} allocation"
    )
    return (
        f'<div class="mosaic-panel" id="mosaic-prune-result" data-key="{pruned.key}" data-source="{pruned.source}">'
        f'<p class="mosaic-headline">{html.escape(headline)}</p>'
        f'<table class="mosaic-table"><caption>{caption}</caption>'
        "<thead><tr><th>stage</th><th>steps</th><th>sparsity</th><th>heads kept</th><th>MLP units kept</th>"
        f"<th>network</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        '<table class="mosaic-table mosaic-summary"><tbody>'
        + rule_row
        + f'<tr><th>prune seconds by phase{" (when it was pruned)" if pruned.from_cache else ""}</th>'
        f'<td data-field="seconds">{html.escape(seconds)}</td></tr>'
        f'<tr><th>measured c<sub>x</sub> = E‖x₀‖²/d</th><td><b data-field="cx">{cx_text}</b>{cx_note}</td></tr>'
        "<tr><th>parameter memory</th>"
        f'<td>dense <b data-field="mem-dense">{_mib(ledger.dense_bytes)}</b> · staged, shared modules once '
        f'<b data-field="mem-staged">{_mib(ledger.staged_bytes)}</b> ({ledger.staged_over_dense:.2f}×) · naive three copies '
        f'<b data-field="mem-naive">{_mib(ledger.naive_bytes)}</b> ({ledger.naive_over_dense:.2f}×)</td></tr>'
        "<tr><th>parameters per stage network</th><td>"
        + " · ".join(f"{name} {format_count(count)}" for name, count in zip(("early", "middle", "late"), ledger.stage_params))
        + "</td></tr>"
        f'<tr><th>checkpoint</th><td><code>cache/{html.escape(checkpoint_folder(pruned))}</code></td></tr>'
        "</tbody></table></div>"
    )


# ----- the section -------------------------------------------------------------------------------


@dataclass
class PruneSection:
    """The Prune section's components and handlers (the Compare section reads the controls)."""

    calibration: gr.Radio
    size: gr.Slider
    scorer: gr.Radio
    allocation: gr.Radio
    view: JobView
    result: gr.HTML
    cache_note: gr.Markdown
    handlers: "PruneHandlers"
    tune_reference: gr.Textbox  # hidden: "<job> <steps>", the dense steps the tuner's chosen point was scored against

    @property
    def controls(self) -> list:
        """calibration mode, calibration size, scorer, allocation: the arguments of `prune_request`."""
        return [self.calibration, self.size, self.scorer, self.allocation]


def prune_request(plan: PlanRequest, calibration, size, scorer, allocation=None) -> PruneRequest:
    """The studio's `PruneRequest`: the engine's checks with the studio's calibration-size range."""
    return PruneRequest.from_values(
        plan, calibration, size, scorer, size_range=settings.CALIBRATION_SIZE_RANGE, allocation=allocation
    )


class PruneHandlers:
    """Submits prune jobs (one `JobView`), renders their results."""

    def __init__(self, engine: StudioEngine, view: JobView) -> None:
        self.engine = engine
        self.view = view
        self._pending: dict[str, str] = {}  # checkpoint key -> id of the job that prunes it
        self._pending_lock = threading.Lock()  # handlers of several sessions run in parallel

    # ----- engine-facing ------------------------------------------------------------------------
    def submit(self, owner: Optional[str], request: PruneRequest) -> str:
        """A job id (of `owner`) whose result is {summary, html}: finished at once on a memory hit, else queued.

        A finished job keeps only that small summary, never the pruned model itself: the
        engine's LRU alone decides which pruned models stay in memory.
        """
        spec = self.engine.resolve(request.plan.model)
        self.engine.require_weights(spec)
        plan, config = request.build(spec)
        hit = self.engine.cached_pruned(spec, plan, config)
        if hit is not None:
            return self.engine.jobs.record(self.outcome(hit), label="prune", message="loaded from cache", owner=owner)
        key = self.engine.pruned_key(spec, plan, config)

        def work(context):
            context.report(0.0, "loading the model" if not self.engine.pruned_on_disk(spec, plan, config) else "loading from cache")
            pruned = self.engine.prune(
                spec, plan, config, should_stop=context.should_stop,
                on_event=lambda event: context.report(event.fraction, describe_prune_event(event)),
            )
            context.report(0.99, "measuring the sensitivity e(τ)")
            self.engine.sensitivity(pruned)
            context.report(1.0, "loaded from cache" if pruned.from_cache else f"pruned in {pruned.load_seconds:.1f} s")
            return self.outcome(pruned)

        job_id = self.engine.jobs.submit(work, label="prune", owner=owner)
        with self._pending_lock:
            self._pending = {k: v for k, v in self._pending.items() if self.engine.jobs.unfinished(v)}  # forget finished ones
            if key is not None:
                self._pending[key] = job_id
        return job_id

    def outcome(self, pruned: PrunedModel) -> dict:
        """What a finished prune job keeps: the API summary, the result panel, the sensitivity chart."""
        return {"summary": prune_summary(pruned), "html": prune_result_html(pruned), "sensitivity": self.sensitivity_plot(pruned)}

    def sensitivity_plot(self, pruned: PrunedModel) -> str:
        """The measured e(τ) over the importance score as plotly JSON (a note when not measured yet)."""
        plan = pruned.plan
        sensitivity = self.engine.sensitivity(pruned, compute=False)
        if sensitivity is None:
            figure = charts.message_figure("The sensitivity e(τ) is measured when a prune job runs.", settings.SMALL_CHART_HEIGHT)
        else:
            figure = charts.sensitivity_figure(sensitivity, self.engine.curve(pruned.spec, plan.lam, plan.cx), plan)
        return charts.figure_json(figure)

    def pending_job(self, key: Optional[str]) -> Optional[str]:
        """The id of a queued or running prune job (of any session) for this checkpoint key, if any."""
        with self._pending_lock:
            job_id = self._pending.get(key or "")
        return job_id if self.engine.jobs.unfinished(job_id) else None

    # ----- UI events ----------------------------------------------------------------------------
    def start(self, owner, *values):
        """Start: the Divide controls and the calibration controls → a queued (or already done) job."""
        plan = PlanRequest.from_controls(*values[:PLAN_CONTROL_COUNT])
        return self.submit(owner, prune_request(plan, *values[PLAN_CONTROL_COUNT:]))

    def render(self, status: JobStatus) -> tuple:
        """A finished job: its result panel, the disk cache's size and the sensitivity chart."""
        plot = status.result.get("sensitivity")
        return status.result["html"], cache_usage_text(self.engine.cache_root), (
            gr.skip() if plot is None else PlotData(type="plotly", plot=plot)
        )

    # ----- API (plain arguments) -------------------------------------------------------------------
    def start_api(
        self,
        model: str = settings.MODEL_DEFAULT,
        sampler: Optional[str] = None,
        steps: Optional[int] = None,
        M: float = settings.M_DEFAULT,
        lam: float = settings.LAM_DEFAULT,
        sparsity: Optional[float] = settings.SPARSITY_DEFAULT,
        stage_sparsity: Optional[list[float]] = None,
        cx: float = settings.CX_DEFAULT,
        calibration: str = settings.CALIBRATION_MODE_DEFAULT,
        calibration_size: int = settings.CALIBRATION_SIZE_DEFAULT,
        scorer: str = settings.SCORER_DEFAULT,
        request: gr.Request = None,
        allocation: Optional[str] = None,
        drop_steps: int = 0,
    ) -> dict:
        """Start pruning the plan of these arguments (as the `plan` endpoint); returns the job's status.

        Poll `prune_status` with the returned `job_id`. The same settings as an earlier job
        come back at once, already `done`, with `result.source` = "memory" or "disk".
        `drop_steps` k (DDIM only) prunes for N − k of the `steps` reference steps (`prune --drop-steps`).
        """
        return self.start_edges_api(
            model, sampler, steps, M, lam, sparsity, stage_sparsity, cx, calibration, calibration_size, scorer, None, request,
            allocation, drop_steps,
        )

    def start_edges_api(
        self,
        model: str = settings.MODEL_DEFAULT,
        sampler: Optional[str] = None,
        steps: Optional[int] = None,
        M: float = settings.M_DEFAULT,
        lam: float = settings.LAM_DEFAULT,
        sparsity: Optional[float] = settings.SPARSITY_DEFAULT,
        stage_sparsity: Optional[list[float]] = None,
        cx: float = settings.CX_DEFAULT,
        calibration: str = settings.CALIBRATION_MODE_DEFAULT,
        calibration_size: int = settings.CALIBRATION_SIZE_DEFAULT,
        scorer: str = settings.SCORER_DEFAULT,
        edges: Optional[list[int]] = None,
        request: gr.Request = None,
        allocation: Optional[str] = None,
        drop_steps: int = 0,
    ) -> dict:
        """`prune_start` with the stage edges set by hand: `edges` [LO, HI], the middle stage in
        training timesteps (None: from M). Poll `prune_status` with the returned `job_id`.
        """
        plan = PlanRequest.from_values(model, sampler, steps, M, lam, sparsity, stage_sparsity, cx, edges=edges, drop_steps=drop_steps)
        owner = owner_of(request)
        job_id = self.submit(owner, prune_request(plan, calibration, calibration_size, scorer, allocation))
        return status_dict(self.engine.jobs.status(job_id, owner), summary_of)


def tuner_reference_steps(memory: Optional[dict], model: str, sampler: str, steps: int) -> int:
    """The dense step count a tuning's budget is a fraction of.

    A tuning fills the plan's steps with the steps it chose (say 40 of a 50-step reference).
    Pressing "Best at this budget" again must not take those 40 as the new reference: the
    budget would silently mean 0.5 × 40 = 20 dense steps' worth of MACs, and every candidate
    would be sampled again instead of re-tuned. So while the plan still holds the steps the
    last tuning chose, for the same model and sampler (`memory`, as `TuneHandlers.render`
    keeps it), the reference stays that tuning's; once the user sets the steps (or the model
    or sampler) themselves, their steps are the reference.
    """
    if (
        isinstance(memory, dict) and memory.get("model") == model and memory.get("sampler") == sampler
        and memory.get("steps") == steps and isinstance(memory.get("reference_steps"), int)
    ):
        return memory["reference_steps"]
    return steps


class TuneHandlers:
    """The "best at this budget" control: a tuner job, its front, and the chosen point into the controls."""

    def __init__(self, engine: StudioEngine, view: JobView) -> None:
        self.engine = engine
        self.view = view

    def start(self, owner, *values):
        """Divide controls, calibration controls (no allocation: the tuner tries both), budget, the last
        tuning's memory (`render`), the ticked methods → a queued job. With a sampler other than DDIM the
        ticked drop methods are left out (the box says they are DDIM's), as the CLI leaves out its defaults."""
        n = PLAN_CONTROL_COUNT
        plan_request = PlanRequest.from_controls(*values[:n])
        return self.submit(owner, plan_request, values[n : n + 3], values[n + 3], methods=values[n + 5], memory=values[n + 4],
                           strict=False)

    def submit(self, owner, plan_request: PlanRequest, calibration_values, budget, methods=None, check=None, memory=None,
               strict=True):
        """Check everything, then queue the tuner job; returns its id. `memory`: the last tuning's
        (`tuner_reference_steps` decides whether its reference steps still hold). `strict`: named drop
        methods with a sampler other than DDIM are an error (the API), else left out (the page's boxes)."""
        from mosaic_core.conquer.tune import DEFAULT_CHECK, check_budget, check_count, check_methods

        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise ValueError(f"budget must be a fraction of the dense MACs in (0, 1], got {type(budget).__name__}")
        budget = check_budget(float(budget))
        named = methods is not None and strict
        methods = check_methods(settings.TUNE_METHODS if methods is None else methods)
        check = check_count(DEFAULT_CHECK if check is None else check)
        plan_request = replace(plan_request, drop_steps=0)  # the reference is every step; the tuner picks what to drop
        # measured: the config's kept-width rounding is the measured allocation's (a GPU's tiles); the
        # tuner sets each candidate's own allocation
        request = prune_request(plan_request, *calibration_values, "measured" if calibration_values[2] == "obs" else "paper")
        spec = self.engine.resolve(plan_request.model)
        self.engine.require_weights(spec)
        plan, config = request.build(spec)
        reference = tuner_reference_steps(memory, spec.name, plan.scheduler, plan.num_inference_steps)
        if reference != plan.num_inference_steps:
            plan, config = replace(request, plan=replace(request.plan, steps=reference)).build(spec)
        methods = methods_for_sampler(methods, plan.scheduler, named)

        def work(context):
            messages = iter(range(1, 10**6))
            result = self.engine.tune(
                spec, budget, plan, config, should_stop=context.should_stop, methods=methods, check=check,
                on_progress=lambda message: context.report(min(0.95, 0.05 * next(messages)), message),
            )
            return {**result.to_dict(), "model": spec.name, "sampler": plan.scheduler}

        return self.engine.jobs.submit(work, label="tune", owner=owner)

    def start_api(
        self,
        budget: float = settings.TUNE_BUDGET_DEFAULT,
        model: str = settings.MODEL_DEFAULT,
        sampler: Optional[str] = None,
        steps: Optional[int] = None,
        M: float = settings.M_DEFAULT,
        lam: float = settings.LAM_DEFAULT,
        cx: float = settings.CX_DEFAULT,
        calibration: str = settings.CALIBRATION_MODE_DEFAULT,
        calibration_size: int = settings.CALIBRATION_SIZE_DEFAULT,
        scorer: str = settings.SCORER_DEFAULT,
        methods: Optional[list[str]] = None,
        check: Optional[int] = None,
        request: gr.Request = None,
    ) -> dict:
        """Start the budget tuner: the best steps × method at `budget` (a fraction of the dense MACs at
        `steps`); returns the job's status. Poll `tune_status` with the returned `job_id`; when done,
        `result` holds every candidate (`points`), the Pareto `front` and the `chosen` index.

        `sampler` None is the model's own. `methods`: some of dense, cache, paper, measured,
        measured+cache, measured+cache-dit, drop, measured+drop (default dense, paper, measured,
        drop, measured+drop: what the studio's controls can run; the two drop methods only with
        DDIM, and a chosen drop point has `drop_steps` > 0: `steps` of `steps + drop_steps` run).
        `check`: once this server has sampled enough points for the model and settings, pruned
        candidates are predicted from their recorded error and at most `check` of them sampled
        (default 4; 0 samples every candidate); predicted points have `predicted: true`.
        """
        plan_request = PlanRequest.from_values(model, sampler, steps, M, lam, None, None, cx)
        job_id = self.submit(owner_of(request), plan_request, (calibration, calibration_size, scorer), budget, methods, check)
        return status_dict(self.engine.jobs.status(job_id, owner_of(request)), lambda result: result)

    @staticmethod
    def render(status: JobStatus) -> tuple:
        """The front chart, a one-line note, the chosen steps / stage sparsities / allocation, a
        re-plan request (the Divide section's hidden box) so the plan view follows the new controls,
        the reference steps the point was scored against (Compare's dense reference follows them),
        and the memory the next tuning reads (`tuner_reference_steps`)."""
        result = status.result
        figure = PlotData(type="plotly", plot=charts.figure_json(charts.tune_front_figure(result)))
        if result["chosen"] is None:
            note = f"No candidate fits {result['budget']:.2f} of the dense MACs (tuned in {result['seconds']:.1f} s)."
            return (figure, note, *(gr.skip() for _ in range(10)))
        best = result["points"][result["chosen"]]
        drop = int(best.get("drop_steps") or 0)
        steps = best["steps"] + drop  # the Steps box: the reference steps the kept ones are a subset of
        shown = f"{best['steps']} of {steps} steps ({drop} dropped evenly)" if drop else f"{best['steps']} steps"
        note = (
            f"Chosen: **{shown}, {best['allocation']}**, MACs {best['macs_fraction']:.3f} of dense, "
            f"PSNR {best['psnr']:.2f} dB to dense (tuned in {result['seconds']:.1f} s)."
        )
        predicted = sum(1 for p in result["points"] if p.get("predicted"))
        if predicted:
            note += f" {predicted} of {len(result['points'])} candidates predicted from their recorded error, not sampled (open markers)."
        if result.get("unchecked"):
            note += (f" {result['unchecked']} more could still win but were left predicted by "
                     f"the time bound of {settings.TUNE_CHECK_SECONDS} s.")
        if best.get("cache"):
            note += " Block reuse: full step every {}, first {}/last {} blocks always run (Compare runs without it).".format(*best["cache"])
        if best.get("cache_dit"):
            note += " cache-dit: DBCache threshold {:.3g}, F{}B{}, first {} steps full (Compare runs without it).".format(*best["cache_dit"])
        allocation = "measured" if best["allocation"].startswith("measured") else "paper"
        sliders = [gr.update(value=round(min(float(x), settings.SPARSITY_RANGE[1]), 3)) for x in best["stage_sparsity"]]
        replan = gr.update(value=f"{status.job_id} {steps} {drop} {best['stage_sparsity']}")  # redraws the plan view
        reference = gr.update(value=f"{status.job_id} {result['reference_steps']}")  # Compare's dense reference steps
        if steps != result["reference_steps"]:
            note += (f" Compare samples dense at the tuner's {result['reference_steps']} steps against it, and the next"
                     f" tuning keeps {result['reference_steps']} as its reference until you change the steps.")
        memory = {"model": result.get("model"), "sampler": result.get("sampler"), "steps": steps,
                  "reference_steps": result["reference_steps"]}
        return (
            figure, note, gr.update(value=steps), gr.update(value=drop), gr.update(value=True), *sliders,
            gr.update(value=allocation), replan, reference, memory,
        )


def summary_of(outcome: dict) -> dict:
    """The API's `result` of a finished prune job."""
    return outcome["summary"]


def build_prune_section(engine: StudioEngine, divide) -> PruneSection:
    """Lay out and wire the Prune section; returns its components for the Compare section."""
    view = JobView(engine, "prune", IDLE_PRUNE, done_title="Pruning", nothing_running="No pruning job is running.")
    handlers = PruneHandlers(engine, view)
    gr.Markdown(PRUNE_TEXT)
    with gr.Row():
        with gr.Column(scale=2, min_width=340):
            calibration = gr.Radio(
                list(settings.CALIBRATION_MODES), value=settings.CALIBRATION_MODE_DEFAULT, label="Calibration noise levels",
                info="snr: τ inside each stage (MosaicDiff) · random: τ over all T · clean: τ = 0", elem_id="mosaic-calibration",
            )
            size = gr.Slider(
                *settings.CALIBRATION_SIZE_RANGE, value=settings.CALIBRATION_SIZE_DEFAULT, step=settings.CALIBRATION_SIZE_STEP,
                label="Calibration images per stage", elem_id="mosaic-calibration-size",
            )
            scorer = gr.Radio(
                list(settings.SCORERS), value=settings.SCORER_DEFAULT, label="Scorer",
                info="obs: Hessian-based, re-solves the kept weights · magnitude: ablation", elem_id="mosaic-scorer",
            )
            allocation = gr.Radio(
                list(settings.ALLOCATIONS), value=settings.ALLOCATION_DEFAULT, label="Allocation",
                info="measured: the plan's MACs go where the recorded OBS errors (× steps) are smallest · "
                "paper: each stage's sparsity from the importance score, every block alike · per-block: the paper's "
                "stage sparsities, spread over blocks by error", elem_id="mosaic-allocation",
            )
            view.layout("Start pruning")
            cache_note = gr.Markdown(elem_id="mosaic-cache-usage")
        with gr.Column(scale=3, min_width=420):
            result = gr.HTML(
                '<div class="mosaic-panel mosaic-empty" id="mosaic-prune-result">The pruned stage networks, their '
                "cost in seconds and memory will show here.</div>",
                elem_id="mosaic-prune-result-box",
            )
            sensitivity = gr.Plot(
                label="Measured sensitivity e(τ) of the pruned model over the importance score", elem_id="mosaic-sensitivity",
            )
    with gr.Accordion("Best at this budget (tuner: steps × allocation)", open=False):
        gr.Markdown(
            "Spend a fraction of the dense MACs at the plan's steps as well as possible: every step count meets it "
            "dense (fewer steps) or pruned (paper or measured allocation), with DDIM also as a subset of the plan's "
            "own steps (dropped steps), each scored by PSNR to dense on 4 seeded images. The chosen point fills the "
            "steps, dropped steps and stage sparsities above; tuning again keeps the first tuning's dense steps as the "
            "reference until you change the steps yourself."
        )
        with gr.Row():
            with gr.Column(scale=2, min_width=340):
                budget = gr.Slider(
                    *settings.TUNE_BUDGET_RANGE, value=settings.TUNE_BUDGET_DEFAULT, step=0.05,
                    label="MAC budget (fraction of dense)", elem_id="mosaic-tune-budget",
                )
                tune_methods = gr.CheckboxGroup(
                    list(settings.TUNE_METHODS), value=list(settings.TUNE_METHODS), label="Methods", elem_id="mosaic-tune-methods",
                    info="dense: fewer steps · paper, measured: pruned · drop, measured+drop: a subset of the plan's steps, "
                    "dense or pruned (DDIM only)",
                )
                tune_view = JobView(engine, "tune", "No tuning yet.", done_title="Tuning", nothing_running="No tuning job is running.")
                tune_view.layout("Best at this budget", start_variant="secondary")
                tune_note = gr.Markdown(elem_id="mosaic-tune-note")
                tune_reference = gr.Textbox(visible="hidden", elem_id="mosaic-tune-reference", label="tuner reference steps")
                tune_memory = gr.State(None)  # the last tuning's model, sampler, chosen and reference steps
            with gr.Column(scale=3, min_width=420):
                front_plot = gr.Plot(label="Tuner: PSNR to dense over MACs", elem_id="mosaic-tune-front")
    section = PruneSection(calibration, size, scorer, allocation, view, result, cache_note, handlers, tune_reference)
    tune_handlers = TuneHandlers(engine, tune_view)
    tune_view.wire(
        tune_handlers.start, [*divide.controls, calibration, size, scorer, budget, tune_memory, tune_methods], tune_handlers.render,
        render_outputs=[
            front_plot, tune_note, divide.steps, divide.drop_steps, divide.per_stage, *divide.stage_sparsity, allocation, divide.replan_box,
            tune_reference, tune_memory,
        ],
    )
    tune_view.register_api(user_errors(tune_handlers.start_api), lambda result: result)
    view.wire(
        handlers.start, [*divide.controls, *section.controls], handlers.render, render_outputs=[result, cache_note, sensitivity]
    )
    view.register_api(user_errors(handlers.start_api), summary_of)
    gr.api(user_errors(handlers.start_edges_api), api_name="prune_start_edges")
    divide.demo.load(
        lambda: cache_usage_text(engine.cache_root), outputs=[cache_note], api_visibility="private", show_progress="hidden"
    )
    return section


PRUNE_CSS = """
.mosaic-job { margin: 0.3rem 0 0.2rem; }
.mosaic-bar { height: 0.7rem; border-radius: 0.35rem; background: var(--neutral-200, #e5e7eb); overflow: hidden; }
.mosaic-bar-fill { height: 100%; background: var(--color-accent, #f97316); transition: width 0.4s linear; }
.mosaic-job[data-state=done] .mosaic-bar-fill { background: #54A24B; }
.mosaic-job[data-state=cancelled] .mosaic-bar-fill { background: #9aa5b1; }
.mosaic-job[data-state=failed] .mosaic-bar-fill { background: #E45756; }
.mosaic-job[data-state=queued] .mosaic-bar-fill { background: #9aa5b1; }
.mosaic-job-text { font-size: 0.85rem; margin-top: 0.3rem; color: var(--body-text-color); overflow-wrap: anywhere; }
.mosaic-headline { margin: 0 0 0.4rem; font-weight: 600; }
.mosaic-empty { color: var(--body-text-color-subdued); font-size: 0.9rem; padding: 1.2rem 0.2rem; }
"""
