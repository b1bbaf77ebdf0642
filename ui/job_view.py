"""One reusable view of a background job: Start, Cancel, a progress bar, a poll timer — and its API.

Prune, Compare and the trajectory trace are all long jobs on `engine.jobs` (one worker
thread, FIFO, bounded, private per session: ui/jobs.py). Each section makes one `JobView`:

    view = JobView(engine, "prune", idle="No pruning job yet…", done_title="Pruning")
    view.layout("Start pruning", "mosaic-prune-start", "mosaic-prune-cancel")   # inside a column
    view.wire(submit, start_inputs, render, render_inputs, render_outputs)
    view.register_api(start_api, summarise)    # <label>_start, <label>_status, <label>_cancel

- `submit(owner, *start_inputs) -> job id` validates and queues (or records a cache hit);
- the timer's tick redraws the bar and, once the job is done, calls
  `render(status, *render_inputs) -> updates of render_outputs`;
- Cancel asks the job to stop; the next tick shows "cancelled".

Sessions: every handler takes `gr.Request` and uses its `session_hash` as the job owner, so
a browser tab or a gradio_client `Client` sees, polls and cancels only its own jobs; an id
of another session (or of another kind of job) is answered exactly like an unknown one.
Errors (`ValueError`, `Busy`) reach the user as `gr.Error` with the engine's message, and no
message or result carries an absolute server path (`public_text`).
"""

from __future__ import annotations

import functools
import html
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import gradio as gr

from mosaic_core.models.registry import PROJECT_ROOT
from mosaic_core.requests import shorten

from ui import settings
from ui.jobs import CANCELLED, DONE, FAILED, RUNNING, Busy, JobStatus

MAX_JOB_ID_LENGTH = 100


# ----- errors and paths ---------------------------------------------------------------------------


def public_text(text: str, cache_root: Optional[Path] = None) -> str:
    """`text` with the server's own folders replaced: the project root by '', the cache by 'cache/', home by '~'."""
    text = str(text)
    replacements = []
    if cache_root is not None:
        replacements.append((str(Path(cache_root).resolve()), "cache"))
        replacements.append((str(cache_root), "cache"))
    replacements += [(str(PROJECT_ROOT) + "/", ""), (str(PROJECT_ROOT), "."), (str(Path.home()) + "/", "~/")]
    for prefix, short in replacements:
        if prefix and prefix not in ("/", "."):
            text = text.replace(prefix, short)
    return text


def user_errors(fn):
    """Engine ValueErrors, a full queue and bad argument types sent to the user as a gr.Error
    with the engine's message (no traceback, no server path); every section's handlers use it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, FileNotFoundError, Busy) as error:
            raise gr.Error(public_text(str(error)), print_exception=False) from None

    return wrapper


def owner_of(request: Optional[gr.Request]) -> Optional[str]:
    """The job owner of a request: its Gradio session hash (None outside a server, in direct calls)."""
    return None if request is None else getattr(request, "session_hash", None)


# ----- rendering ----------------------------------------------------------------------------------


def progress_html(status: Optional[JobStatus], idle: str, elem_id: str) -> str:
    """The progress bar of a job: a filled bar, its state and the latest message.

    The outer div carries `data-job`, `data-state` and `data-fraction`: tests read values, not pixels.
    """
    if status is None:
        state, fraction, text, job_id = "idle", 0.0, html.escape(idle), ""
    else:
        state, fraction, job_id = status.state, status.fraction, status.job_id
        text = f"<b>{html.escape(public_text(status.summary))}</b>"
        if status.state in (RUNNING, DONE, CANCELLED, FAILED) and status.started is not None:
            text += f' <span class="mosaic-muted">· {status.elapsed:.1f} s</span>'
    percent = 100.0 * min(max(fraction, 0.0), 1.0)
    return (
        f'<div class="mosaic-job" id="{elem_id}" data-job="{html.escape(job_id)}" data-state="{state}" data-fraction="{fraction:.4f}">'
        f'<div class="mosaic-bar"><div class="mosaic-bar-fill" style="width:{percent:.1f}%"></div></div>'
        f'<div class="mosaic-job-text">{text}</div></div>'
    )


def status_dict(status: JobStatus, result: Optional[Callable[[Any], dict]] = None) -> dict:
    """A job status as the API returns it; `result` turns a finished job's result into JSON."""
    done = status.state == DONE and result is not None and status.result is not None
    return {
        "job_id": status.job_id,
        "state": status.state,
        "fraction": round(status.fraction, 4),
        "message": public_text(status.message),
        "summary": public_text(status.summary),
        "position": status.position,
        "error": None if status.error is None else public_text(status.error),
        "seconds": round(status.elapsed, 3),
        "result": result(status.result) if done else None,
    }


# ----- the view -----------------------------------------------------------------------------------


class JobView:
    """Start/Cancel buttons, a progress bar, a gr.Timer and a gr.State for one kind of job (`label`)."""

    def __init__(self, engine, label: str, idle: str, done_title: str, nothing_running: str) -> None:
        self.engine = engine
        self.label = label  # the job runner's label, and the API names' prefix
        self.idle = idle
        self.done_title = done_title  # "Pruning" -> "Pruning cancelled: …"
        self.nothing_running = nothing_running
        self.elem_id = f"mosaic-{label}-job"
        self.start_button: Optional[gr.Button] = None
        self.cancel_button: Optional[gr.Button] = None
        self.progress: Optional[gr.HTML] = None
        self.job: Optional[gr.State] = None
        self.timer: Optional[gr.Timer] = None

    # ----- job access (the owner check is the runner's; the label check is ours) ------------------
    def status(self, job_id: Any, owner: Optional[str]) -> Optional[JobStatus]:
        """The owner's job of this view's kind, or None (unknown, forgotten, another session's or kind's)."""
        if not isinstance(job_id, str) or not job_id.startswith(f"{self.label}-"):
            return None
        try:
            return self.engine.jobs.status(job_id, owner)
        except KeyError:
            return None

    def api_status(self, job_id: Any, owner: Optional[str]) -> JobStatus:
        """`status`, or ValueError naming the id (one message for unknown, foreign and malformed ids)."""
        if not isinstance(job_id, str) or len(job_id) > MAX_JOB_ID_LENGTH:
            raise ValueError(
                f"job_id must be a string of at most {MAX_JOB_ID_LENGTH} characters from {self.label}_start, "
                f"got {type(job_id).__name__} {shorten(job_id)}"
            )
        status = self.status(job_id, owner)
        if status is None:
            raise ValueError(
                f"unknown job id {shorten(job_id)}: start a job first ({self.label}_start); "
                "a job is visible to the session that started it only"
            )
        return status

    def bar(self, status: Optional[JobStatus]) -> str:
        """The progress bar HTML of `status` (idle text when None)."""
        return progress_html(status, self.idle, self.elem_id)

    # ----- layout and events ---------------------------------------------------------------------
    def layout(self, start_text: str, start_variant: str = "primary", size: str = "lg", interactive: bool = True) -> None:
        """Start and Cancel in a row, the progress bar under them (inside the current column)."""
        with gr.Row():
            self.start_button = gr.Button(
                start_text, variant=start_variant, size=size, interactive=interactive, elem_id=f"mosaic-{self.label}-start"
            )
            self.cancel_button = gr.Button(  # a small (secondary) job gets a quiet Cancel
                "Cancel", variant="stop" if size != "sm" else "secondary", size=size, elem_id=f"mosaic-{self.label}-cancel"
            )
        self.progress = gr.HTML(self.bar(None), elem_id=f"mosaic-{self.label}-progress")
        self.job = gr.State(None)
        self.timer = gr.Timer(settings.JOB_POLL_SECONDS, active=False)

    def wire(
        self,
        submit: Callable[..., str],
        start_inputs: Sequence,
        render: Callable[..., tuple],
        render_inputs: Sequence = (),
        render_outputs: Sequence = (),
    ) -> None:
        """Start → `submit`, timer tick → bar (+ `render` once done), Cancel → stop."""
        outputs = list(render_outputs)

        @user_errors
        def start(request: gr.Request, *values):
            job_id = submit(owner_of(request), *values)
            return job_id, self.bar(self.engine.jobs.status(job_id, owner_of(request))), gr.Timer(active=True)

        def poll(request: gr.Request, job_id, *values):
            status = self.status(job_id, owner_of(request))
            unchanged = tuple(gr.update() for _ in outputs)
            if status is None or not status.is_finished:
                return (self.bar(status), *unchanged, gr.Timer(active=status is not None))
            if status.state == DONE:
                return (self.bar(status), *render(status, *values), gr.Timer(active=False))
            if status.state == CANCELLED:
                gr.Warning(f"{self.done_title} cancelled: the last result is unchanged.")
            else:
                gr.Warning(f"{self.done_title} failed: {public_text(status.error or '')}")
            return (self.bar(status), *unchanged, gr.Timer(active=False))

        def cancel(request: gr.Request, job_id):
            owner = owner_of(request)
            status = self.status(job_id, owner)
            if status is None or status.is_finished:
                gr.Info(self.nothing_running)
                return self.bar(status)
            return self.bar(self.engine.jobs.cancel(job_id, owner))

        quick = dict(show_progress="hidden", api_visibility="private")
        self.start_button.click(start, inputs=list(start_inputs), outputs=[self.job, self.progress, self.timer], **quick)
        self.timer.tick(poll, inputs=[self.job, *render_inputs], outputs=[self.progress, *outputs, self.timer], **quick)
        self.cancel_button.click(cancel, inputs=[self.job], outputs=[self.progress], **quick)

    def register_api(self, start_api: Callable[..., dict], summarise: Callable[[Any], dict]) -> None:
        """`<label>_start` (the section's typed function), `<label>_status` and `<label>_cancel` (job_id → dict)."""
        label = self.label

        def status_api(job_id: str, request: gr.Request) -> dict:
            return status_dict(self.api_status(job_id, owner_of(request)), summarise)

        def cancel_api(job_id: str, request: gr.Request) -> dict:
            owner = owner_of(request)
            self.api_status(job_id, owner)
            return status_dict(self.engine.jobs.cancel(job_id, owner), summarise)

        status_api.__doc__ = f"The state (queued|running|done|cancelled|failed), progress and, when done, the result of a {label} job."
        cancel_api.__doc__ = f"Cancel a {label} job (queued: dropped; running: stops at the next step)."
        gr.api(start_api, api_name=f"{label}_start")
        gr.api(user_errors(status_api), api_name=f"{label}_status")
        gr.api(user_errors(cancel_api), api_name=f"{label}_cancel")


def cache_usage(root: Path) -> tuple[int, int]:
    """(bytes, files) under the studio's cache folder (0, 0 when it does not exist yet)."""
    total, count = 0, 0
    for path in Path(root).rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size
                count += 1
        except OSError:
            continue  # removed while we walked
    return total, count


def cache_usage_text(root: Path) -> str:
    """'Disk cache: 12.3 MiB in 9 files (3 pruned models)', with no server path."""
    size, files = cache_usage(root)
    pruned = Path(root) / "pruned"
    models = sum(1 for p in pruned.iterdir() if p.is_dir()) if pruned.is_dir() else 0
    return f"Disk cache: **{size / 2**20:.1f} MiB** in {files} files ({models} pruned model{'s' if models != 1 else ''})."

