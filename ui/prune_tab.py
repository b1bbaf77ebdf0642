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

| trigger        | handler           | api_name (gr.api, plain arguments) |
|----------------|-------------------|------------------------------------|
| Start          | `PruneHandlers.start`  | `prune_start`                 |
| timer tick     | `PruneHandlers.poll`   | `prune_status`                |
| Cancel         | `PruneHandlers.cancel` | `prune_cancel`                |
"""

from __future__ import annotations

import html
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

import gradio as gr

from mosaic_core.divide.plan import Plan

from ui import settings
from ui.divide_tab import user_errors
from mosaic_core.prune.service import PrunedModel
from ui.engine import StudioEngine
from ui.jobs import CANCELLED, DONE, FAILED, RUNNING, JobStatus
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


# ----- shared by the Prune and Compare sections --------------------------------------------------


def cancel_job(engine: StudioEngine, job_id, idle: str, elem_id: str, nothing_running: str) -> str:
    """Ask a job to stop and redraw its bar (the next timer tick shows 'cancelled')."""
    status = job_status(engine, job_id)
    if status is None or status.is_finished:
        gr.Info(nothing_running)
        return progress_html(status, idle, elem_id)
    return progress_html(engine.jobs.cancel(job_id), idle, elem_id)


def plan_from_state(engine: StudioEngine, plan_state: Optional[dict], model: str, folder: str):
    """(spec, plan) of the plan the Divide section shows; ValueError when it is missing or stale."""
    if not plan_state:
        raise ValueError("there is no plan yet: wait for section 2 to draw the stages, then press Start again")
    spec = engine.resolve(model, folder)
    plan = Plan.from_dict(plan_state)
    if plan.model != spec.name:
        raise ValueError(f"the plan is for '{plan.model}' but '{spec.name}' is selected: move a control in section 2 to re-plan")
    return spec, plan


def plan_from_arguments(engine: StudioEngine, model, sampler, steps, M, lam, sparsity, stage_sparsity, cx):
    """(spec, plan) from plain API arguments, through the same engine call as the `plan` endpoint."""
    spec = engine.resolve(model)
    if stage_sparsity is not None:
        plan = engine.plan(spec, sampler, steps, M, lam, cx, stage_sparsity=stage_sparsity)
    else:
        plan = engine.plan(spec, sampler, steps, M, lam, cx, sparsity=sparsity)
    return spec, plan


def job_status(engine: StudioEngine, job_id: Optional[str]) -> Optional[JobStatus]:
    """The status of a job id from a gr.State (None for no job or one the runner forgot)."""
    if not job_id:
        return None
    try:
        return engine.jobs.status(job_id)
    except KeyError:
        return None


def api_job_status(engine: StudioEngine, job_id: str) -> JobStatus:
    """The status of a job id given through the API; ValueError naming it when unknown."""
    status = job_status(engine, str(job_id or ""))
    if status is None:
        raise ValueError(f"unknown job id {job_id!r}: start a job first (prune_start / compare_start)")
    return status


def describe_prune_event(event) -> str:
    """'hessian · middle', 'solve · middle · transformer_blocks.3.ff.net.2', 'calibrate · preparing 16 …'."""
    return " · ".join(part for part in (event.phase, event.stage, event.layer or event.message) if part)


def progress_html(status: Optional[JobStatus], idle: str, elem_id: str) -> str:
    """The progress bar of a job: a filled bar, its state and the latest message.

    The outer div carries `data-job`, `data-state` and `data-fraction`: tests read values, not pixels.
    """
    if status is None:
        state, fraction, text, job_id = "idle", 0.0, html.escape(idle), ""
    else:
        state, fraction, job_id = status.state, status.fraction, status.job_id
        text = f"<b>{html.escape(status.summary)}</b>"
        if status.state in (RUNNING, DONE, CANCELLED, FAILED) and status.started is not None:
            text += f' <span class="mosaic-muted">· {status.elapsed:.1f} s</span>'
    percent = 100.0 * min(max(fraction, 0.0), 1.0)
    return (
        f'<div class="mosaic-job" id="{elem_id}" data-job="{html.escape(job_id)}" data-state="{state}" data-fraction="{fraction:.4f}">'
        f'<div class="mosaic-bar"><div class="mosaic-bar-fill" style="width:{percent:.1f}%"></div></div>'
        f'<div class="mosaic-job-text">{text}</div></div>'
    )


def _seconds_line(seconds: dict) -> str:
    parts = [f"{name} {value:.1f} s" for name, value in seconds.items()]
    return " · ".join(parts) + f" (total {sum(seconds.values()):.1f} s)"


def _mib(value: int) -> str:
    return f"{value / 2**20:.1f} MiB"


def prune_summary(pruned: PrunedModel) -> dict:
    """What the API returns about a pruned model (JSON-ready)."""
    ledger = pruned.ledger
    return {
        "key": pruned.key,
        "folder": str(pruned.folder),
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
    cx_text = f"{pruned.cx:.4f}" if math.isfinite(pruned.cx) else "— (no stage needed calibration)"
    seconds = _seconds_line(pruned.seconds) if pruned.seconds else "—"
    caption = (
        f"{html.escape(plan.model)} · {plan.scheduler} {plan.num_inference_steps} steps · overall sparsity "
        f"{plan.overall_sparsity:.3f} ({plan.mode}) · {calibration.mode} calibration, {calibration.size} images "
        f"per stage ({calibration.source}) · {config.scorer}"
    )
    return (
        f'<div class="mosaic-panel" id="mosaic-prune-result" data-key="{pruned.key}" data-source="{pruned.source}">'
        f'<p class="mosaic-headline">{html.escape(headline)}</p>'
        f'<table class="mosaic-table"><caption>{caption}</caption>'
        "<thead><tr><th>stage</th><th>steps</th><th>sparsity</th><th>heads kept</th><th>MLP units kept</th>"
        f"<th>network</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        '<table class="mosaic-table mosaic-summary"><tbody>'
        f'<tr><th>prune seconds by phase{" (when it was pruned)" if pruned.from_cache else ""}</th>'
        f'<td data-field="seconds">{html.escape(seconds)}</td></tr>'
        f'<tr><th>measured c<sub>x</sub> = E‖x₀‖²/d</th><td><b data-field="cx">{cx_text}</b>{cx_note}</td></tr>'
        "<tr><th>parameter memory</th>"
        f'<td>dense <b data-field="mem-dense">{_mib(ledger.dense_bytes)}</b> · staged, shared modules once '
        f'<b data-field="mem-staged">{_mib(ledger.staged_bytes)}</b> ({ledger.staged_over_dense:.2f}×) · naive three copies '
        f'<b data-field="mem-naive">{_mib(ledger.naive_bytes)}</b> ({ledger.naive_over_dense:.2f}×)</td></tr>'
        "<tr><th>parameters per stage network</th><td>"
        + " · ".join(f"{name} {format_count(count)}" for name, count in zip(("early", "middle", "late"), ledger.stage_params))
        + "</td></tr>"
        f'<tr><th>checkpoint</th><td><code>{html.escape(str(pruned.folder))}</code></td></tr>'
        "</tbody></table></div>"
    )


def status_dict(status: JobStatus, result: Optional[Callable[[Any], dict]] = None) -> dict:
    """A job status as the API returns it; `result` turns a finished job's result into JSON."""
    return {
        "job_id": status.job_id,
        "state": status.state,
        "fraction": round(status.fraction, 4),
        "message": status.message,
        "summary": status.summary,
        "position": status.position,
        "error": status.error,
        "seconds": round(status.elapsed, 3),
        "result": result(status.result) if status.state == DONE and result is not None and status.result is not None else None,
    }


# ----- the section -------------------------------------------------------------------------------


@dataclass
class PruneSection:
    """The Prune section's components and handlers (the Compare section reads the controls)."""

    calibration: gr.Radio
    size: gr.Slider
    scorer: gr.Radio
    start: gr.Button
    cancel: gr.Button
    progress: gr.HTML
    result: gr.HTML
    job: gr.State
    timer: gr.Timer
    handlers: "PruneHandlers"

    @property
    def controls(self) -> list:
        """calibration mode, calibration size, scorer: the arguments of `StudioEngine.prune_config`."""
        return [self.calibration, self.size, self.scorer]


class PruneHandlers:
    """Submits prune jobs, reports their progress, cancels them."""

    ELEM_ID = "mosaic-prune-job"

    def __init__(self, engine: StudioEngine) -> None:
        self.engine = engine
        self._pending: dict[str, str] = {}  # checkpoint key -> id of the job that prunes it
        self._pending_lock = threading.Lock()  # handlers of several sessions run in parallel

    # ----- engine-facing ------------------------------------------------------------------------
    def submit(self, spec, plan: Plan, config) -> str:
        """A job id whose result is the `PrunedModel`: finished at once on a memory hit, else queued."""
        hit = self.engine.cached_pruned(spec, plan, config)
        if hit is not None:
            return self.engine.jobs.record(hit, label="prune", message="loaded from cache")
        key = self.engine.pruned_key(spec, plan, config)

        def work(context):
            context.report(0.0, "loading the model" if not self.engine.pruned_on_disk(spec, plan, config) else "loading from cache")
            pruned = self.engine.prune(
                spec, plan, config, should_stop=context.should_stop,
                on_event=lambda event: context.report(event.fraction, describe_prune_event(event)),
            )
            context.report(1.0, "loaded from cache" if pruned.from_cache else f"pruned in {pruned.load_seconds:.1f} s")
            return pruned

        job_id = self.engine.jobs.submit(work, label="prune")
        with self._pending_lock:
            self._pending = {k: v for k, v in self._pending.items() if self._unfinished(v)}  # forget finished ones
            if key is not None:
                self._pending[key] = job_id
        return job_id

    def _unfinished(self, job_id: Optional[str]) -> bool:
        status = job_status(self.engine, job_id)
        return status is not None and not status.is_finished

    def pending_job(self, key: Optional[str]) -> Optional[str]:
        """The id of a queued or running prune job for this checkpoint key, if any."""
        with self._pending_lock:
            job_id = self._pending.get(key or "")
        return job_id if self._unfinished(job_id) else None

    # ----- UI events ----------------------------------------------------------------------------
    @user_errors
    def start(self, plan_state, model, folder, calibration, size, scorer):
        """Start: submit the job and return at once (job id, bar, result unchanged, timer on)."""
        spec, plan = plan_from_state(self.engine, plan_state, model, folder)
        self.engine.require_weights(spec)
        config = self.engine.prune_config(spec, calibration, size, scorer)
        job_id = self.submit(spec, plan, config)
        status = self.engine.jobs.status(job_id)
        if status.state == DONE:  # a memory hit: show it now, no polling needed
            return job_id, progress_html(status, IDLE_PRUNE, self.ELEM_ID), prune_result_html(status.result), gr.Timer(active=False)
        return job_id, progress_html(status, IDLE_PRUNE, self.ELEM_ID), gr.update(), gr.Timer(active=True)

    def poll(self, job_id):
        """Timer tick: redraw the bar; when the job has finished, its result (or a warning), timer off."""
        status = job_status(self.engine, job_id)
        bar = progress_html(status, IDLE_PRUNE, self.ELEM_ID)
        if status is None:
            return bar, gr.update(), gr.Timer(active=False)
        if not status.is_finished:
            return bar, gr.update(), gr.Timer(active=True)
        if status.state == DONE:
            return bar, prune_result_html(status.result), gr.Timer(active=False)
        if status.state == CANCELLED:
            gr.Warning("Pruning cancelled: the cache and the last result are unchanged.")
        else:
            gr.Warning(f"Pruning failed: {status.error}")
        return bar, gr.update(), gr.Timer(active=False)

    def cancel(self, job_id):
        """Cancel: ask the job to stop (the next tick shows 'cancelled')."""
        return cancel_job(self.engine, job_id, IDLE_PRUNE, self.ELEM_ID, "No pruning job is running.")

    # ----- API (plain arguments) -------------------------------------------------------------------
    @user_errors
    def start_api(
        self,
        model: str = settings.MODEL_DEFAULT,
        sampler: str = settings.SAMPLER_DEFAULT,
        steps: int = settings.STEPS_DEFAULT,
        M: float = settings.M_DEFAULT,
        lam: float = settings.LAM_DEFAULT,
        sparsity: Optional[float] = settings.SPARSITY_DEFAULT,
        stage_sparsity: Optional[list[float]] = None,
        cx: float = settings.CX_DEFAULT,
        calibration: str = settings.CALIBRATION_MODE_DEFAULT,
        calibration_size: int = settings.CALIBRATION_SIZE_DEFAULT,
        scorer: str = settings.SCORER_DEFAULT,
    ) -> dict:
        """Start pruning the plan of these arguments (as the `plan` endpoint); returns the job's status.

        Poll `prune_status` with the returned `job_id`. The same settings as an earlier job
        come back at once, already `done`, with `result.source` = "memory" or "disk".
        """
        spec, plan = plan_from_arguments(self.engine, model, sampler, steps, M, lam, sparsity, stage_sparsity, cx)
        self.engine.require_weights(spec)
        config = self.engine.prune_config(spec, calibration, calibration_size, scorer)
        return status_dict(self.engine.jobs.status(self.submit(spec, plan, config)), prune_summary)

    @user_errors
    def status_api(self, job_id: str) -> dict:
        """The state (queued|running|done|cancelled|failed), progress and, when done, the result of a prune job."""
        return status_dict(api_job_status(self.engine, job_id), prune_summary)

    @user_errors
    def cancel_api(self, job_id: str) -> dict:
        """Cancel a prune job (queued: dropped; running: stops at the next batch or layer)."""
        api_job_status(self.engine, job_id)
        return status_dict(self.engine.jobs.cancel(job_id), prune_summary)


def build_prune_section(engine: StudioEngine, divide) -> PruneSection:
    """Lay out and wire the Prune section; returns its components for the Compare section."""
    handlers = PruneHandlers(engine)
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
            with gr.Row():
                start = gr.Button("Start pruning", variant="primary", elem_id="mosaic-prune-start")
                cancel = gr.Button("Cancel", variant="stop", elem_id="mosaic-prune-cancel")
            progress = gr.HTML(progress_html(None, IDLE_PRUNE, PruneHandlers.ELEM_ID), elem_id="mosaic-prune-progress")
        with gr.Column(scale=3, min_width=420):
            result = gr.HTML(
                '<div class="mosaic-panel mosaic-empty" id="mosaic-prune-result">The pruned stage networks, their '
                "cost in seconds and memory will show here.</div>",
                elem_id="mosaic-prune-result-box",
            )
    job = gr.State(None)
    timer = gr.Timer(settings.JOB_POLL_SECONDS, active=False)
    section = PruneSection(calibration, size, scorer, start, cancel, progress, result, job, timer, handlers)

    quick = dict(show_progress="hidden", api_visibility="private")
    start.click(
        handlers.start, inputs=[divide.plan_state, divide.model, divide.folder, *section.controls],
        outputs=[job, progress, result, timer], **quick,
    )
    timer.tick(handlers.poll, inputs=[job], outputs=[progress, result, timer], **quick)
    cancel.click(handlers.cancel, inputs=[job], outputs=[progress], **quick)
    gr.api(handlers.start_api, api_name="prune_start")
    gr.api(handlers.status_api, api_name="prune_status")
    gr.api(handlers.cancel_api, api_name="prune_cancel")
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
