"""Background jobs for the studio: one worker thread, a bounded FIFO queue, private status you can poll.

Heavy work (pruning, sampling) must not run inside a gradio event handler: the page would
wait on it and nothing else could happen. So a Start handler only `submit`s a job and
returns; a `gr.Timer` polls `status` about twice a second to draw a progress bar; Cancel
calls `cancel`. Nothing here imports gradio.

    runner = JobRunner()
    job_id = runner.submit(work, label="prune", owner=session)   # work(context) -> result
    runner.status(job_id, owner=session)  # JobStatus: queued (position k) | running | done | cancelled | failed
    runner.cancel(job_id, owner=session)  # queued: never runs; running: context.should_stop() turns True

One compute job at a time (torch already uses every core: two jobs would halve each other,
docs/method.md §6), in submission order, and all of them on one thread: each thread that
runs a parallel torch op gets an OpenMP team of its own, and with two teams on a 2-core
machine every sampling call ran 1.7× slower (docs/method.md §9, `benchmarks/threads.py`).
Event handlers therefore never call torch themselves. A job reports progress with `context.report(fraction,
message)` and stops cooperatively: engine loops poll `context.should_stop` and raise
`mosaic_core.jobs.Cancelled`, which ends the job as *cancelled*. Any other exception ends
it as *failed*, with the message kept for the UI (the traceback goes to the server log
only).

Jobs are private and bounded, because the studio may be served to several clients:

- a job id is `<label>-<32 random hex digits>` (`secrets`), not a counter to guess;
- a job belongs to the `owner` that submitted it (the studio passes the Gradio session
  hash): `status` and `cancel` with another owner raise the same `KeyError` as an unknown id;
- `submit` raises `Busy` when `max_queue` jobs are already waiting, or when the owner
  already has `max_per_owner` jobs queued or running;
- finished jobs are kept per owner (the newest `max_finished` of each owner, for the
  `max_owners` owners seen most recently), so one owner's many jobs never push out
  another owner's results.
"""

from __future__ import annotations

import logging
import secrets
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


class Busy(RuntimeError):
    """The queue is full, or the owner has as many unfinished jobs as allowed: try again later."""


@dataclass
class _Job:
    status: JobStatus
    work: Callable[[JobContext], Any]
    context: JobContext
    owner: Optional[str] = None


class JobRunner:
    """A bounded FIFO queue of private jobs run one at a time by a single daemon worker thread."""

    def __init__(self, max_finished: int = 16, max_queue: int = 32, max_per_owner: int = 4, max_owners: int = 512) -> None:
        self.max_finished = max_finished  # finished jobs kept per owner
        self.max_queue = max_queue  # jobs waiting (not counting the running one)
        self.max_per_owner = max_per_owner  # queued + running jobs of one owner
        self.max_owners = max_owners  # owners whose finished jobs are kept
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._jobs: dict[str, _Job] = {}
        self._finished: OrderedDict[Optional[str], OrderedDict[str, None]] = OrderedDict()  # owner -> ids, oldest first
        self._queue: deque[str] = deque()
        self._current: Optional[str] = None
        self._closed = False
        self._thread: Optional[threading.Thread] = None

    # ----- submitting and controlling ---------------------------------------------------------
    def submit(self, work: Callable[[JobContext], Any], label: str = "job", owner: Optional[str] = None) -> str:
        """Queue `work(context)` for `owner`; returns the job id at once. `Busy` when the limits are reached."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the job runner is shut down")
            if len(self._queue) >= self.max_queue:
                raise Busy(
                    f"the studio is busy: {len(self._queue)} jobs are waiting (at most {self.max_queue}); try again in a minute"
                )
            mine = sum(1 for job in self._jobs.values() if job.owner == owner and not job.status.is_finished)
            if mine >= self.max_per_owner:
                raise Busy(
                    f"this session already has {mine} jobs queued or running (at most {self.max_per_owner}): "
                    "wait for one to finish or cancel it, then try again"
                )
            job_id = self._new_id(label)
            status = JobStatus(job_id=job_id, label=label, state=QUEUED, submitted=time.monotonic())
            self._jobs[job_id] = _Job(status, work, JobContext(self, job_id), owner)
            self._queue.append(job_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work_loop, name="studio-jobs", daemon=True)
                self._thread.start()
            self._wake.notify_all()
        return job_id

    def record(self, result: Any, label: str = "job", message: str = "", owner: Optional[str] = None) -> str:
        """A job that is already done (a cache hit): same id and status API, never queued, no limit."""
        with self._lock:
            job_id = self._new_id(label)
            now = time.monotonic()
            status = JobStatus(
                job_id=job_id, label=label, state=DONE, fraction=1.0, message=message, result=result,
                submitted=now, started=now, finished=now,
            )
            self._jobs[job_id] = _Job(status, lambda context: result, JobContext(self, job_id), owner)
            self._keep_finished(job_id)
            self._wake.notify_all()
        return job_id

    def status(self, job_id: str, owner: Optional[str] = None) -> JobStatus:
        """The job's current snapshot; KeyError for an id this runner never had, forgot, or that is another owner's."""
        with self._lock:
            return self._snapshot(self._owned(job_id, owner))

    def cancel(self, job_id: str, owner: Optional[str] = None) -> JobStatus:
        """Cancel a job: a queued one is dropped, a running one is asked to stop; finished ones stay."""
        with self._lock:
            job = self._owned(job_id, owner)
            if job.status.state == QUEUED:
                self._queue.remove(job_id)
                now = time.monotonic()
                job.status = replace(job.status, state=CANCELLED, message="cancelled before it started", finished=now)
                self._keep_finished(job_id)
                self._wake.notify_all()
            elif job.status.state == RUNNING:
                job.context._stop.set()
                job.status = replace(job.status, message="stopping…")
            return self._snapshot(job)

    def unfinished(self, job_id: Optional[str]) -> bool:
        """Whether a job (of any owner) is queued or running: for the studio's own bookkeeping, never shown."""
        with self._lock:
            job = self._jobs.get(job_id or "")
            return job is not None and not job.status.is_finished

    def wait(self, job_id: str, timeout: Optional[float] = None, owner: Optional[str] = None) -> JobStatus:
        """Block until the job has finished (or `timeout` seconds passed); returns its status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            job = self._owned(job_id, owner)
            while job.status.state not in FINISHED_STATES:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._wake.wait(remaining)
            return self._snapshot(job)

    def running(self) -> Optional[str]:
        """The id of the running job, if any."""
        with self._lock:
            return self._current

    def counts(self) -> dict:
        """How many jobs are queued, running and kept finished (for limits and tests)."""
        with self._lock:
            return {
                "queued": len(self._queue),
                "running": int(self._current is not None),
                "finished": sum(len(ids) for ids in self._finished.values()),
                "owners": len(self._finished),
            }

    def shutdown(self, cancel: bool = True, timeout: float = 10.0) -> None:
        """Stop taking jobs; cancel what is queued or running (by default) and join the worker."""
        with self._lock:
            self._closed = True
            ids = list(self._queue) + ([self._current] if self._current else [])
            owners = {job_id: self._jobs[job_id].owner for job_id in ids}
            thread = self._thread
            self._wake.notify_all()
        if cancel:
            for job_id in ids:
                try:
                    self.cancel(job_id, owners[job_id])
                except KeyError:
                    pass  # finished in the meantime
        if thread is not None:
            thread.join(timeout)

    # ----- bookkeeping (caller holds the lock) -------------------------------------------------
    def _new_id(self, label: str) -> str:
        while True:
            job_id = f"{label}-{secrets.token_hex(16)}"
            if job_id not in self._jobs:
                return job_id

    def _owned(self, job_id: Any, owner: Optional[str]) -> _Job:
        """The job, or KeyError when it is unknown or another owner's (the same error: ids reveal nothing)."""
        job = self._jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None or job.owner != owner:
            raise KeyError(job_id)
        if owner in self._finished:
            self._finished.move_to_end(owner)  # an active owner keeps its results longest
        return job

    def _snapshot(self, job: _Job) -> JobStatus:
        if job.status.state == QUEUED:
            return replace(job.status, position=self._queue.index(job.status.job_id) + 1)
        return job.status

    def _keep_finished(self, job_id: str) -> None:
        """File a finished job under its owner; forget the owner's oldest beyond `max_finished`
        and the least recently active owners beyond `max_owners`."""
        owner = self._jobs[job_id].owner
        kept = self._finished.setdefault(owner, OrderedDict())
        kept[job_id] = None
        self._finished.move_to_end(owner)
        while len(kept) > self.max_finished:
            old, _ = kept.popitem(last=False)
            self._jobs.pop(old, None)
        while len(self._finished) > self.max_owners:
            _, ids = self._finished.popitem(last=False)
            for old in ids:
                self._jobs.pop(old, None)

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
                self._keep_finished(job_id)
                self._wake.notify_all()


def _describe(error: BaseException) -> str:
    """A user-facing message: the engine's ValueError text as is, anything else with its type."""
    text = str(error).strip()
    if isinstance(error, (ValueError, FileNotFoundError)) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
