"""Background jobs for the studio: one worker thread, a FIFO queue, status you can poll.

Heavy work (pruning, sampling) must not run inside a gradio event handler: the page would
wait on it and nothing else could happen. So a Start handler only `submit`s a job and
returns; a `gr.Timer` polls `status` about twice a second to draw a progress bar; Cancel
calls `cancel`. Nothing here imports gradio.

    runner = JobRunner()
    job_id = runner.submit(work, label="prune")     # work(context) -> result
    runner.status(job_id)   # JobStatus: queued (position k) | running | done | cancelled | failed
    runner.cancel(job_id)   # queued: never runs; running: context.should_stop() turns True

One compute job at a time (torch already uses every core: two jobs would halve each other,
METHOD §6), in submission order. A job reports progress with `context.report(fraction,
message)` and stops cooperatively: engine loops poll `context.should_stop` and raise
`mosaic_core.jobs.Cancelled`, which ends the job as *cancelled*. Any other exception ends
it as *failed*, with the message kept for the UI (the traceback goes to the server log
only). Finished jobs keep their result until `max_finished` newer jobs have finished.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from mosaic_core.jobs import Cancelled

LOG = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, CANCELLED, FAILED = "queued", "running", "done", "cancelled", "failed"
FINISHED_STATES = (DONE, CANCELLED, FAILED)


@dataclass(frozen=True)
class JobStatus:
    """A snapshot of one job. `position` is 1 for the next queued job (0 once it has started)."""

    job_id: str
    label: str
    state: str
    fraction: float = 0.0
    message: str = ""
    position: int = 0
    result: Any = None
    error: Optional[str] = None
    submitted: float = 0.0
    started: Optional[float] = None
    finished: Optional[float] = None

    @property
    def finished_ok(self) -> bool:
        return self.state == DONE

    @property
    def is_finished(self) -> bool:
        return self.state in FINISHED_STATES

    @property
    def elapsed(self) -> float:
        """Seconds spent running (so far, or in all)."""
        if self.started is None:
            return 0.0
        return (self.finished if self.finished is not None else time.monotonic()) - self.started

    @property
    def summary(self) -> str:
        """One line for a status bar: 'queued (position 2)', 'running · 42 % · hessian · middle', 'done'."""
        if self.state == QUEUED:
            return f"queued (position {self.position})"
        if self.state == RUNNING:
            text = f"running · {self.fraction:.0%}"
            return f"{text} · {self.message}" if self.message else text
        if self.state == FAILED:
            return f"failed: {self.error}"
        if self.state == CANCELLED:
            return "cancelled"
        return f"done · {self.message}" if self.message else "done"


class JobContext:
    """What a running job sees: its id, a stop flag to poll, a way to report progress."""

    def __init__(self, runner: "JobRunner", job_id: str) -> None:
        self._runner = runner
        self.job_id = job_id
        self._stop = threading.Event()

    def should_stop(self) -> bool:
        """True once the job was cancelled: engine loops then raise `Cancelled`."""
        return self._stop.is_set()

    def report(self, fraction: float, message: str = "") -> None:
        """Progress in [0, 1] (clipped, never going back) and a short message."""
        self._runner._report(self.job_id, fraction, message)


@dataclass
class _Job:
    status: JobStatus
    work: Callable[[JobContext], Any]
    context: JobContext


class JobRunner:
    """A FIFO queue of jobs run one at a time by a single daemon worker thread."""

    def __init__(self, max_finished: int = 64) -> None:
        self.max_finished = max_finished
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._jobs: OrderedDict[str, _Job] = OrderedDict()
        self._queue: deque[str] = deque()
        self._current: Optional[str] = None
        self._ids = itertools.count(1)
        self._closed = False
        self._thread: Optional[threading.Thread] = None

    # ----- submitting and controlling ---------------------------------------------------------
    def submit(self, work: Callable[[JobContext], Any], label: str = "job") -> str:
        """Queue `work(context)`; returns the job id at once (the worker starts on first use)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the job runner is shut down")
            job_id = f"{label}-{next(self._ids)}"
            status = JobStatus(job_id=job_id, label=label, state=QUEUED, submitted=time.monotonic())
            self._jobs[job_id] = _Job(status, work, JobContext(self, job_id))
            self._queue.append(job_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work_loop, name="studio-jobs", daemon=True)
                self._thread.start()
            self._wake.notify_all()
        return job_id

    def record(self, result: Any, label: str = "job", message: str = "") -> str:
        """A job that is already done (a cache hit): same id and status API, never queued."""
        with self._lock:
            job_id = f"{label}-{next(self._ids)}"
            now = time.monotonic()
            status = JobStatus(
                job_id=job_id, label=label, state=DONE, fraction=1.0, message=message, result=result,
                submitted=now, started=now, finished=now,
            )
            self._jobs[job_id] = _Job(status, lambda context: result, JobContext(self, job_id))
            self._forget_old()
            self._wake.notify_all()
        return job_id

    def status(self, job_id: str) -> JobStatus:
        """The job's current snapshot; KeyError for an id this runner never had (or forgot)."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise KeyError(job_id)
            if job.status.state == QUEUED:
                return replace(job.status, position=self._queue.index(job_id) + 1)
            return job.status

    def cancel(self, job_id: str) -> JobStatus:
        """Cancel a job: a queued one is dropped, a running one is asked to stop; finished ones stay."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise KeyError(job_id)
            if job.status.state == QUEUED:
                self._queue.remove(job_id)
                now = time.monotonic()
                job.status = replace(job.status, state=CANCELLED, message="cancelled before it started", finished=now)
                self._forget_old()
            elif job.status.state == RUNNING:
                job.context._stop.set()
                job.status = replace(job.status, message="stopping…")
        return self.status(job_id) if job_id in self._jobs else job.status

    def wait(self, job_id: str, timeout: Optional[float] = None) -> JobStatus:
        """Block until the job has finished (or `timeout` seconds passed); returns its status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._jobs[job_id].status.state not in FINISHED_STATES:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._wake.wait(remaining)
        return self.status(job_id)

    def running(self) -> Optional[str]:
        """The id of the running job, if any."""
        with self._lock:
            return self._current

    def shutdown(self, cancel: bool = True, timeout: float = 10.0) -> None:
        """Stop taking jobs; cancel what is queued or running (by default) and join the worker."""
        with self._lock:
            self._closed = True
            ids = list(self._queue) + ([self._current] if self._current else [])
            thread = self._thread
            self._wake.notify_all()
        if cancel:
            for job_id in ids:
                self.cancel(job_id)
        if thread is not None:
            thread.join(timeout)

    # ----- the worker -------------------------------------------------------------------------
    def _report(self, job_id: str, fraction: float, message: str) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.status.state != RUNNING or job.context.should_stop():
                return  # a cancelled job keeps saying "stopping…"
            fraction = min(max(float(fraction), job.status.fraction), 1.0)
            job.status = replace(job.status, fraction=fraction, message=str(message))

    def _work_loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if not self._queue:
                    return  # closed and drained
                job_id = self._queue.popleft()
                job = self._jobs[job_id]
                self._current = job_id
                job.status = replace(job.status, state=RUNNING, started=time.monotonic())
                self._wake.notify_all()
            state, result, error, message = DONE, None, None, ""
            try:
                result = job.work(job.context)
                message = job.status.message if job.status.message not in ("", "stopping…") else ""
            except Cancelled:
                state, message = CANCELLED, "cancelled"
            except Exception as exc:  # noqa: BLE001 - any failure of a job is reported, the worker lives on
                state, error = FAILED, _describe(exc)
                LOG.exception("job %s failed", job_id)
            with self._lock:
                job.status = replace(
                    job.status, state=state, result=result, error=error, message=message,
                    fraction=1.0 if state == DONE else job.status.fraction, finished=time.monotonic(),
                )
                self._current = None
                self._forget_old()
                self._wake.notify_all()

    def _forget_old(self) -> None:
        """Drop the oldest finished jobs beyond `max_finished` (caller holds the lock)."""
        finished = [job_id for job_id, job in self._jobs.items() if job.status.state in FINISHED_STATES]
        for job_id in finished[: max(0, len(finished) - self.max_finished)]:
            del self._jobs[job_id]


def _describe(error: BaseException) -> str:
    """A user-facing message: the engine's ValueError text as is, anything else with its type."""
    text = str(error).strip()
    if isinstance(error, (ValueError, FileNotFoundError)) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
