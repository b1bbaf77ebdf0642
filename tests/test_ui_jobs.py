"""The studio's JobRunner: FIFO order, one job at a time, cancel, failures, kept results."""

from __future__ import annotations

import threading

import pytest

from mosaic_core.jobs import Cancelled
from ui.jobs import CANCELLED, DONE, FAILED, QUEUED, RUNNING, Busy, JobRunner


@pytest.fixture
def runner():
    runner = JobRunner(max_per_owner=16)
    yield runner
    runner.shutdown()


def _blocking_job(started: threading.Event, release: threading.Event, log: list, name: str):
    """A job that says it started, then waits for `release` while honouring cancel."""

    def work(context):
        log.append(("start", name))
        started.set()
        while not release.wait(0.01):
            if context.should_stop():
                raise Cancelled("stopped")
        log.append(("end", name))
        return name

    return work


def test_jobs_run_one_at_a_time_in_submission_order(runner):
    log, active, peak = [], [0], [0]
    lock = threading.Lock()

    def work_for(name):
        def work(context):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            log.append(name)
            threading.Event().wait(0.02)
            with lock:
                active[0] -= 1
            return name.upper()

        return work

    ids = [runner.submit(work_for(name), label="t") for name in "abcde"]
    statuses = [runner.wait(job_id, timeout=10) for job_id in ids]
    assert log == list("abcde")
    assert peak[0] == 1
    assert [s.state for s in statuses] == [DONE] * 5
    assert [s.result for s in statuses] == list("ABCDE")
    assert all(s.fraction == 1.0 for s in statuses)
    assert len(set(ids)) == 5


def test_second_job_waits_with_its_queue_position(runner):
    started, release, log = threading.Event(), threading.Event(), []
    first = runner.submit(_blocking_job(started, release, log, "first"), label="prune")
    assert started.wait(5)
    second = runner.submit(lambda context: "second", label="prune")
    third = runner.submit(lambda context: "third", label="compare")
    assert runner.status(first).state == RUNNING and runner.running() == first
    assert runner.status(second).state == QUEUED and runner.status(second).position == 1
    assert runner.status(third).summary == "queued (position 2)"
    release.set()
    assert runner.wait(third, timeout=10).result == "third"
    assert runner.status(second).result == "second"
    assert runner.status(first).result == "first"


def test_cancel_a_running_job_stops_it_and_the_next_runs(runner):
    started, release, log = threading.Event(), threading.Event(), []
    first = runner.submit(_blocking_job(started, release, log, "first"))
    after = runner.submit(lambda context: 42)
    assert started.wait(5)
    assert runner.cancel(first).message == "stopping…"
    status = runner.wait(first, timeout=10)
    assert status.state == CANCELLED and status.summary == "cancelled"
    assert status.result is None and status.error is None
    assert log == [("start", "first")]  # it never reached its end
    assert runner.wait(after, timeout=10).result == 42


def test_cancel_a_queued_job_means_it_never_runs(runner):
    started, release, log = threading.Event(), threading.Event(), []
    first = runner.submit(_blocking_job(started, release, log, "first"))
    assert started.wait(5)
    queued = runner.submit(_blocking_job(threading.Event(), threading.Event(), log, "queued"))
    last = runner.submit(lambda context: "last")
    assert runner.status(last).position == 2
    status = runner.cancel(queued)
    assert status.state == CANCELLED and status.started is None
    assert runner.status(last).position == 1  # moved up
    release.set()
    assert runner.wait(last, timeout=10).result == "last"
    assert ("start", "queued") not in log
    assert runner.status(first).state == DONE


def test_failure_is_captured_with_its_message_and_the_worker_lives_on(runner):
    def bad(context):
        context.report(0.3, "calibrate")
        raise ValueError("calibration size must be a whole number in [16, 1024], got 5000")

    def crash(context):
        raise RuntimeError("CUDA out of memory")

    failed = runner.wait(runner.submit(bad), timeout=10)
    assert failed.state == FAILED
    assert failed.error == "calibration size must be a whole number in [16, 1024], got 5000"
    assert failed.summary.startswith("failed: calibration size")
    assert failed.fraction == pytest.approx(0.3)  # where it stopped
    crashed = runner.wait(runner.submit(crash), timeout=10)
    assert crashed.state == FAILED and crashed.error == "RuntimeError: CUDA out of memory"
    assert runner.wait(runner.submit(lambda context: "fine"), timeout=10).result == "fine"


def test_progress_reports_are_visible_and_never_go_back(runner):
    seen, step, done = [], threading.Event(), threading.Event()

    def work(context):
        for fraction, message in ((0.2, "hessian · early"), (0.1, "late report"), (0.6, "solve · middle")):
            context.report(fraction, message)
            step.set()
            assert done.wait(5)
            done.clear()
        return "ok"

    job_id = runner.submit(work)
    for _ in range(3):
        assert step.wait(5)
        step.clear()
        status = runner.status(job_id)
        seen.append((status.fraction, status.message))
        done.set()
    assert seen == [(0.2, "hessian · early"), (0.2, "late report"), (0.6, "solve · middle")]
    assert runner.wait(job_id, timeout=5).result == "ok"


def test_results_are_kept_until_many_newer_jobs_finish():
    runner = JobRunner(max_finished=3, max_per_owner=16)
    try:
        ids = [runner.submit(lambda context, i=i: i) for i in range(5)]
        runner.wait(ids[-1], timeout=10)
        assert [runner.status(job_id).result for job_id in ids[2:]] == [2, 3, 4]
        with pytest.raises(KeyError):
            runner.status(ids[0])
        with pytest.raises(KeyError):
            runner.status("no-such-job")
    finally:
        runner.shutdown()


def test_a_recorded_job_is_done_at_once_even_while_another_runs(runner):
    started, release, log = threading.Event(), threading.Event(), []
    busy = runner.submit(_blocking_job(started, release, log, "busy"))
    assert started.wait(5)
    cached = runner.record({"source": "memory"}, label="prune", message="loaded from cache")
    status = runner.status(cached)
    assert status.state == DONE and status.result == {"source": "memory"}
    assert status.summary == "done · loaded from cache" and status.fraction == 1.0
    assert runner.status(busy).state == RUNNING
    release.set()
    assert runner.wait(busy, timeout=10).state == DONE


def test_a_job_is_visible_to_its_owner_only():
    runner = JobRunner()
    try:
        mine = runner.record("result", label="prune", owner="alice")
        with pytest.raises(KeyError):
            runner.status(mine, owner="bob")
        with pytest.raises(KeyError):
            runner.cancel(mine, owner="bob")
        with pytest.raises(KeyError):
            runner.status(mine)  # no owner is not any owner
        assert runner.status(mine, owner="alice").result == "result"
        assert mine.startswith("prune-") and len(mine) == len("prune-") + 32
    finally:
        runner.shutdown()


def test_the_queue_and_each_owner_are_bounded(runner):
    limited = JobRunner(max_queue=3, max_per_owner=2)
    started, release, log = threading.Event(), threading.Event(), []
    try:
        limited.submit(_blocking_job(started, release, log, "running"), owner="a")
        assert started.wait(5)
        limited.submit(lambda context: 1, owner="a")
        with pytest.raises(Busy, match=r"this session already has 2 jobs queued or running \(at most 2\)"):
            limited.submit(lambda context: 2, owner="a")
        limited.submit(lambda context: 3, owner="b")
        last = limited.submit(lambda context: 4, owner="c")
        with pytest.raises(Busy, match=r"the studio is busy: 3 jobs are waiting \(at most 3\); try again"):
            limited.submit(lambda context: 5, owner="d")
        assert limited.record("hit", owner="d")  # a cache hit never waits, so it is never refused
        release.set()
        assert limited.wait(last, timeout=10, owner="c").result == 4
        assert limited.submit(lambda context: 6, owner="a")  # room again
    finally:
        release.set()
        limited.shutdown()


def test_one_owners_many_results_never_push_out_anothers():
    runner = JobRunner(max_finished=3, max_owners=10)
    try:
        kept = runner.record("alice's", owner="alice")
        flood = [runner.record(i, owner="mallory") for i in range(50)]
        assert runner.status(kept, owner="alice").result == "alice's"
        assert [runner.status(job_id, owner="mallory").result for job_id in flood[-3:]] == [47, 48, 49]
        with pytest.raises(KeyError):
            runner.status(flood[-4], owner="mallory")
        assert runner.counts()["finished"] == 4
    finally:
        runner.shutdown()
