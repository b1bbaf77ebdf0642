"""The studio served to several clients: every finding of the hardening review, reproduced, then fuzzed.

One in-process server for the module (free port, a temporary cache), with local model
folders allowed under one temporary root only. Raw JSON calls (`_raw_call`) send what
gradio_client would refuse to encode: NaN, ±Infinity, wrong types. Each test creates what it
needs (or takes it from a fixture), so any order works.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import httpx
import pytest
import torch
from conftest import free_port
from gradio_client import Client
from gradio_client.exceptions import AppError
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from mosaic_core.divide.plan import build_plan
from mosaic_core.models.registry import PROJECT_ROOT
from mosaic_core.requests import CompareRequest, PlanRequest, PruneRequest
from ui import settings
from ui.engine import StudioEngine
from ui.job_view import cache_usage
from ui.studio import build_studio, launch_kwargs

# Each module starts a real studio server and prunes through its API (10–15 s of setup on 2
# cores): part of the full suite, left out of the fast loop.
pytestmark = pytest.mark.slow

MODEL = "digits-dit"
NO_WEIGHTS = "facebook/DiT-XL-2-256"  # plans, never prunes: a start call with valid values stops at "weights not present"
STEPS = 10
SMALL = dict(model=MODEL, steps=STEPS, M=0.55, lam=0.01, sparsity=0.3, calibration="snr", calibration_size=16, scorer="obs")
GENERIC = "upstream Gradio app has raised an exception"


@pytest.fixture(scope="module")
def allowed_root(tmp_path_factory):
    return tmp_path_factory.mktemp("allowed-models")


@pytest.fixture(scope="module")
def studio(tmp_path_factory, allowed_root):
    cache_root = tmp_path_factory.mktemp("hardening-cache")
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    saved_memory, settings.PRUNED_IN_MEMORY = settings.PRUNED_IN_MEMORY, 16  # no test's pruned model pushes out another's
    engine = StudioEngine(cache_root=cache_root, local_model_roots=[allowed_root])
    settings.PRUNED_IN_MEMORY = saved_memory
    demo = build_studio(engine)
    port = free_port()
    demo.queue(default_concurrency_limit=8).launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs()
    )
    try:
        yield dict(url=f"http://127.0.0.1:{port}/", engine=engine, cache=cache_root)
    finally:
        demo.close()
        engine.jobs.shutdown()
        torch.set_num_threads(saved_threads)


@pytest.fixture(scope="module")
def client(studio):
    return Client(studio["url"], verbose=False)


@pytest.fixture(scope="module")
def small_pruned(studio):
    """The SMALL settings pruned once (by a session of its own): its final status."""
    own = Client(studio["url"], verbose=False)
    started = own.predict(**SMALL, api_name="/prune_start")
    status = _wait(own, "/prune_status", started["job_id"])
    assert status["state"] == "done", status
    return status


def _wait(client: Client, api: str, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.predict(job_id, api_name=api)
        if status["state"] in ("done", "cancelled", "failed"):
            return status
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {status}")


def _raw_call(url: str, api_name: str, data: list, session: str = "fuzz") -> tuple[str, object]:
    """POST /gradio_api/call/<api> with any JSON (NaN and ±Infinity included): ('complete'|'error', data)."""
    body = json.dumps({"data": data, "session_hash": session}, allow_nan=True)
    with httpx.Client(base_url=url, timeout=60) as http:
        answer = http.post(f"gradio_api/call/{api_name}", content=body, headers={"content-type": "application/json"})
        answer.raise_for_status()
        stream = http.get(f"gradio_api/call/{api_name}/{answer.json()['event_id']}").text
    events = [(name, json.loads(payload)) for name, payload in re.findall(r"^event: (\w+)\ndata: (.*)$", stream, flags=re.MULTILINE)]
    finals = [event for event in events if event[0] in ("complete", "error")]
    assert len(finals) == 1, events
    return finals[0]


def _error(outcome: tuple[str, object]) -> str:
    name, payload = outcome
    assert name == "error", outcome
    message = payload["error"] if isinstance(payload, dict) else payload
    assert isinstance(message, str) and message and GENERIC not in message, outcome  # never the generic answer
    return message


def _no_server_paths(value, cache: Path) -> None:
    text = json.dumps(value, default=str)
    for path in (str(PROJECT_ROOT), str(cache), str(Path.home()) + "/"):
        assert path not in text, (path, text[:300])


# ----- the findings, one regression each ---------------------------------------------------------


def test_a_huge_label_list_is_refused_before_it_is_built():
    """'0-9999,0-9999,…' used to build 30 M ids before the 4096-image cap: now refused while parsing."""
    plan = PlanRequest.from_values(NO_WEIGHTS, steps=STEPS)
    prune = PruneRequest.from_values(plan)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"class labels name more than 4096 images"):
            CompareRequest.from_values(prune, 1000, labels=",".join(["0-999"] * 600))  # 3.6 KB, 600 000 ids
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000  # 600 000 Python ints would take ~20 MB
    with pytest.raises(ValueError, match=r"class labels is 20000 characters long: at most 4096 allowed"):
        CompareRequest.from_values(prune, 1000, labels=("0-9999," * 3000)[:20000])


def test_a_huge_label_list_through_the_api_names_the_labels(studio):
    data = [MODEL, "ddim", STEPS, 0.55, 0.01, 0.3, None, 1.0, "snr", 16, "obs", "0-9999," * 3000, 0, 4, 1.5, 1, "all stages", None]
    assert re.match(r"class labels is 21000 characters long: at most 4096 allowed", _error(_raw_call(studio["url"], "compare_start", data)))


@pytest.mark.parametrize(
    "api, data, message",
    [
        ("plan", ["x" * 100_000, "ddim", 50, 0.55, 0.01, 0.3, None, 1.0], r"model is 100000 characters long: at most 512 allowed"),
        ("plan", [7, "ddim", 50, 0.55, 0.01, 0.3, None, 1.0], r"model must be a string, got int"),
        ("plan", [["digits-dit"], "ddim", 50, 0.55, 0.01, 0.3, None, 1.0], r"model must be a string, got list"),
        ("plan", [MODEL, "ddim", 50, 0.55, "abc", 0.3, None, 1.0], r"lam \(λ\) must be a number .*got str 'abc'"),
        ("plan", [MODEL, "ddim", float("inf"), 0.55, 0.01, 0.3, None, 1.0], r"steps must be a whole number in \[1, 1000\], got inf"),
        ("plan", [MODEL, "ddim", 10**400, 0.55, 0.01, 0.3, None, 1.0], r"steps must be in \[1, 1000\], got 1000000"),
        ("plan", [MODEL, "ddim", 50, 0.55, 0.01, 0.3, [0.1, "x", 0.1], 1.0], r"middle sparsity must be a number"),
        ("plan", [MODEL, "ddim", 50, 0.55, 0.01, 0.3, 0.5, 1.0], r"stage_sparsity must be 3 numbers"),
        ("plan", [MODEL, 3, 50, 0.55, 0.01, 0.3, None, 1.0], r"sampler must be one of ddim"),
        ("divide", [MODEL, "", "ddim", 50, "abc", 0.01, 1.0, 0.3, False, 0, 0, 0], r"M must be a number in \(0, 1\), got str 'abc'"),
        ("divide", [MODEL, "", "ddim", {"a": 1}, 0.55, 0.01, 1.0, 0.3, False, 0, 0, 0], r"steps must be a whole number"),
        ("divide", [MODEL, "", 7, 50, 0.55, 0.01, 1.0, 0.3, False, 0, 0, 0], r"sampler must be one of ddim"),
        ("divide", [MODEL, 5, "ddim", 50, 0.55, 0.01, 1.0, 0.3, False, 0, 0, 0], r"folder must be a string, got int"),
        ("trajectory", [MODEL, "", "ddim", float("nan"), 0.55, 0.01, 1.0, 0.3, False, 0, 0, 0], r"steps must be a whole number .*got nan"),
        ("prune_start", [MODEL, "ddim", 50, 0.55, 0.01, 0.3, None, 1.0, "snr", 1e308, "obs", None], r"calibration_size \(images per stage\) must be"),
        ("compare_start", [MODEL, "ddim", STEPS, 0.55, 0.01, 0.3, None, 1.0, "snr", 16, "obs", "0-3", float("inf"), 4, 1.5, 1, "all stages", None],
         r"seed must be a whole number in \[0, 2147483647\], got inf"),
        ("compare_start", [MODEL, "ddim", STEPS, 0.55, 0.01, 0.3, None, 1.0, "snr", 16, "obs", "0-3", 0, 4, float("-inf"), 1, "all stages", None],
         r"cfg \(guidance scale\) must be a finite number in \[0, 20\], got -inf"),
        ("compare_status", [12], r"job_id must be a string"),
    ],
)
def test_bad_api_values_get_an_error_naming_the_parameter(studio, api, data, message):
    assert re.match(message, _error(_raw_call(studio["url"], api, data))), message


def test_a_prune_job_id_given_to_compare_status_is_an_unknown_id(studio, client):
    job_id = studio["engine"].jobs.record({"summary": {}, "html": ""}, label="prune", owner=client.session_hash)
    assert client.predict(job_id, api_name="/prune_status")["state"] == "done"
    for api in ("/compare_status", "/compare_cancel"):
        with pytest.raises(AppError, match=rf"^unknown job id '{job_id}': start a job first \(compare_start\)"):
            client.predict(job_id, api_name=api)


def test_a_path_refusal_says_nothing_about_the_path(studio, tmp_path):
    """'/root' (exists) and '/root/.ssh' (may not): the same answer; a file's content is never echoed."""
    secret = tmp_path / "secret.json"
    secret.write_text('{"password": "hunter2"}')
    names = ["/root", "/root/.ssh", "/proc/1/root", "/no/such/folder", str(tmp_path), str(secret), "~/.ssh", "../.."]
    for engine in (studio["engine"], StudioEngine(cache_root=tmp_path / "c", local_model_roots=["/"])):
        messages = set()
        for name in names:
            with pytest.raises(ValueError) as error:
                engine.resolve(name)
            messages.add(str(error.value))
        assert len(messages) == 1, messages
        assert "hunter2" not in messages.pop()
    answers = {_error(_raw_call(studio["url"], "plan", [name, "ddim", 50, 0.55, 0.01, 0.3, None, 1.0])) for name in names}
    assert len(answers) == 1 and answers.pop().startswith("unknown model: choose one of digits-dit")


def test_local_folders_are_allowed_under_the_allowed_roots_only(studio, allowed_root, tiny_latent_folder):
    engine = studio["engine"]
    with pytest.raises(ValueError, match=r"^unknown model: choose one of"):
        engine.resolve(str(tiny_latent_folder))  # a real diffusers folder, outside the allowed root
    inside, link = allowed_root / "tiny", allowed_root / "link"
    if not inside.exists():
        shutil.copytree(tiny_latent_folder, inside)
        link.symlink_to(tiny_latent_folder, target_is_directory=True)
    assert engine.resolve(str(inside)).source == "folder"
    with pytest.raises(ValueError, match=r"^unknown model: choose one of"):
        engine.resolve(str(link))  # a link inside the root that leads out of it
    closed = StudioEngine(cache_root=allowed_root / "cache", local_model_roots=())
    with pytest.raises(ValueError, match=r"local model folders are off on this server"):
        closed.resolve(str(tiny_latent_folder))
    assert closed.resolve(MODEL).name == MODEL and closed.resolve(NO_WEIGHTS).name == NO_WEIGHTS  # the registry always works


def test_local_model_roots_default_to_loopback_only(monkeypatch, tmp_path):
    monkeypatch.delenv(settings.LOCAL_MODEL_ROOTS_ENV, raising=False)
    assert settings.local_model_roots("127.0.0.1") == (Path("/"),)
    assert settings.local_model_roots("localhost") == (Path("/"),)
    assert settings.local_model_roots("0.0.0.0") == ()
    monkeypatch.setenv(settings.LOCAL_MODEL_ROOTS_ENV, f"{tmp_path}{os.pathsep}/srv/models")
    assert settings.local_model_roots("0.0.0.0") == (tmp_path, Path("/srv/models"))
    monkeypatch.setenv(settings.LOCAL_MODEL_ROOTS_ENV, "")
    assert settings.local_model_roots("127.0.0.1") == ()


def test_job_ids_are_random_and_bound_to_their_session(studio):
    engine = studio["engine"]
    a, b = Client(studio["url"], verbose=False), Client(studio["url"], verbose=False)
    ids = [engine.jobs.record({"summary": {"n": i}, "html": ""}, label="prune", owner=a.session_hash) for i in range(3)]
    assert all(re.fullmatch(r"prune-[0-9a-f]{32}", job_id) for job_id in ids) and len(set(ids)) == 3
    assert a.predict(ids[0], api_name="/prune_status")["result"] == {"n": 0}
    unknown = "prune-" + "0" * 32
    for api in ("/prune_status", "/prune_cancel"):
        with pytest.raises(AppError) as foreign:
            b.predict(ids[0], api_name=api)
        with pytest.raises(AppError) as missing:
            b.predict(unknown, api_name=api)
        assert str(foreign.value).replace(ids[0], "ID") == str(missing.value).replace(unknown, "ID")  # the same answer


def test_another_session_cannot_cancel_a_running_job(studio):
    engine = studio["engine"]
    owner, other = Client(studio["url"], verbose=False), Client(studio["url"], verbose=False)
    release = threading.Event()

    def work(context):
        while not release.wait(0.01):
            if context.should_stop():
                from mosaic_core.jobs import Cancelled

                raise Cancelled("stopped")
        return {"summary": {"finished": True}, "html": ""}

    job_id = engine.jobs.submit(work, label="prune", owner=owner.session_hash)
    try:
        with pytest.raises(AppError, match=r"unknown job id"):
            other.predict(job_id, api_name="/prune_cancel")
        assert owner.predict(job_id, api_name="/prune_status")["state"] in ("queued", "running")
    finally:
        release.set()
    assert _wait(owner, "/prune_status", job_id)["result"] == {"finished": True}


def test_finished_results_survive_another_sessions_flood(studio, small_pruned):
    """Cache hits used to be recorded into one global list of 64: a flood evicted everyone's results."""
    victim, flooder = Client(studio["url"], verbose=False), Client(studio["url"], verbose=False)
    kept = victim.predict(**SMALL, api_name="/prune_start")
    assert kept["state"] == "done" and kept["result"]["source"] == "memory"
    flood = [flooder.predict(**SMALL, api_name="/prune_start") for _ in range(settings.JOB_RESULTS_PER_SESSION + 4)]
    assert all(status["state"] == "done" for status in flood)
    assert victim.predict(kept["job_id"], api_name="/prune_status")["result"] == kept["result"]
    with pytest.raises(AppError, match=r"unknown job id"):  # the flooder's own oldest results went first
        flooder.predict(flood[0]["job_id"], api_name="/prune_status")
    assert flooder.predict(flood[-1]["job_id"], api_name="/prune_status")["state"] == "done"
    assert studio["engine"].jobs.counts()["finished"] <= settings.JOB_RESULTS_PER_SESSION * studio["engine"].jobs.counts()["owners"]


def test_finished_jobs_keep_no_model_and_no_server_path(studio, small_pruned):
    _no_server_paths(small_pruned, studio["cache"])
    assert small_pruned["result"]["folder"] == f"pruned/{small_pruned['result']['key']}"
    engine = studio["engine"]
    job = engine.jobs._jobs[small_pruned["job_id"]]  # what the runner holds for this finished job
    seen = []

    def walk(value):
        seen.append(type(value))
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(job.status.result)
    assert not any(issubclass(kind, (torch.nn.Module, torch.Tensor)) for kind in seen)
    assert set(seen) <= {dict, list, tuple, str, int, float, bool, type(None)}


def test_a_full_queue_and_a_busy_session_are_told_to_try_again(studio):
    engine = studio["engine"]
    release = threading.Event()
    blocker = engine.jobs.submit(lambda context: release.wait(60), label="block", owner="blocker")
    busy, waiting = Client(studio["url"], verbose=False), []
    try:
        for sparsity in (0.11, 0.12, 0.13, 0.14):  # queued behind the blocker: real prune jobs that never start
            waiting.append(busy.predict(**(SMALL | dict(sparsity=sparsity)), api_name="/prune_start")["job_id"])
        with pytest.raises(AppError, match=rf"this session already has 4 jobs queued or running \(at most {settings.JOBS_PER_SESSION}\)"):
            busy.predict(**(SMALL | dict(sparsity=0.15)), api_name="/prune_start")
        saved, engine.jobs.max_queue = engine.jobs.max_queue, engine.jobs.counts()["queued"]
        try:
            with pytest.raises(AppError, match=r"the studio is busy: \d+ jobs are waiting .*try again in a minute"):
                Client(studio["url"], verbose=False).predict(**(SMALL | dict(sparsity=0.16)), api_name="/prune_start")
        finally:
            engine.jobs.max_queue = saved
    finally:
        for job_id in waiting:
            busy.predict(job_id, api_name="/prune_cancel")
        release.set()
    assert [busy.predict(job_id, api_name="/prune_status")["state"] for job_id in waiting] == ["cancelled"] * 4
    assert engine.jobs.wait(blocker, timeout=10, owner="blocker").state == "done"


def test_model_status_names_no_server_path(studio):
    engine = studio["engine"]
    for name in (MODEL, NO_WEIGHTS):
        message = engine.status(engine.resolve(name)).message
        assert name in message
        _no_server_paths(message, studio["cache"])


def test_cache_usage_counts_every_file(tmp_path):
    sizes = {"pruned/a/network_0.safetensors": 1000, "pruned/a/manifest.json": 17, "analyses/k/traces.json": 5}
    for name, size in sizes.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * size)
    assert cache_usage(tmp_path) == (sum(sizes.values()), len(sizes))
    assert cache_usage(tmp_path / "missing") == (0, 0)


# ----- five sessions at once ---------------------------------------------------------------------


@pytest.mark.slow
def test_five_sessions_at_once_get_their_own_results(studio, small_pruned):
    """Five clients, five sparsities (the Hessians are shared, the pruned models are not): no cross-talk."""
    sparsities = (0.1, 0.2, 0.35, 0.5, 0.6)
    clients = [Client(studio["url"], verbose=False) for _ in sparsities]
    job_ids, results, errors = [None] * 5, [None] * 5, []
    started = threading.Barrier(5)

    def session(index: int) -> None:
        try:
            own = clients[index]
            plan = own.predict(**(dict(model=MODEL, steps=STEPS, M=0.55, lam=0.01, sparsity=sparsities[index])), api_name="/plan")
            started.wait(30)
            job_ids[index] = own.predict(  # the paper's rule: the plan's per-block heads and units
                **(SMALL | dict(sparsity=sparsities[index], allocation="paper")), api_name="/prune_start"
            )["job_id"]
            status = _wait(own, "/prune_status", job_ids[index], timeout=300)
            results[index] = (plan, status)
        except Exception as error:  # noqa: BLE001 - reported below with the session's index
            errors.append((index, repr(error)))

    threads = [threading.Thread(target=session, args=(index,)) for index in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(400)
    assert not errors, errors
    for index, (plan, status) in enumerate(results):
        expected = build_plan(MODEL, STEPS, 0.55, 0.01, sparsity=sparsities[index])
        assert plan["overall_sparsity"] == pytest.approx(expected.overall_sparsity)
        assert status["state"] == "done", status
        stages = status["result"]["stages"]
        assert [s["heads_kept"] for s in stages] == list(expected.allocation.heads_kept)
        assert [s["units_kept"] for s in stages] == list(expected.allocation.units_kept)
        neighbour = clients[(index + 1) % 5]
        for api in ("/prune_status", "/prune_cancel"):
            with pytest.raises(AppError, match=r"unknown job id"):
                neighbour.predict(job_ids[index], api_name=api)


# ----- property-based fuzzing of every endpoint --------------------------------------------------

PLAN_PARAMS = ["model", "sampler", "steps", "M", "lam", "sparsity", "stage_sparsity", "cx"]
PLAN_VALUES = [NO_WEIGHTS, "ddim", STEPS, 0.55, 0.01, 0.3, None, 1.0]
CONTROL_PARAMS = ["model", "folder", "sampler", "steps", "M", "lam", "cx", "sparsity", "per_stage", "early", "middle", "late"]
CONTROL_VALUES = [NO_WEIGHTS, "", "ddim", STEPS, 0.55, 0.01, 1.0, 0.3, True, 0.2, 0.1, 0.2]
PRUNE_PARAMS = PLAN_PARAMS + ["calibration", "calibration_size", "scorer"]
PRUNE_VALUES = PLAN_VALUES + ["snr", 16, "obs"]
COMPARE_PARAMS = PRUNE_PARAMS + ["labels", "seed", "count", "cfg", "repeats", "only_stage"]
COMPARE_VALUES = PRUNE_VALUES + ["0-3", 0, 4, 1.5, 1, "all stages"]
ENDPOINTS = {
    "plan": (PLAN_PARAMS, PLAN_VALUES),
    "divide": (CONTROL_PARAMS, CONTROL_VALUES),
    "trajectory": (CONTROL_PARAMS, CONTROL_VALUES),
    "prune_start": (PRUNE_PARAMS + ["allocation"], PRUNE_VALUES + [None]),  # allocation: the last, optional parameter
    "compare_start": (COMPARE_PARAMS + ["prompts", "negative_prompt", "allocation"], COMPARE_VALUES + [None, "", None]),
    "prune_status": (["job_id"], ["prune-x"]),
    "prune_cancel": (["job_id"], ["prune-x"]),
    "compare_status": (["job_id"], ["compare-x"]),
    "compare_cancel": (["job_id"], ["compare-x"]),
}
NAMES = {  # how an error names each parameter
    "model": r"model", "folder": r"folder|model", "sampler": r"sampler|scheduler", "steps": r"steps", "M": r"\bM\b",
    "lam": r"lam", "sparsity": r"sparsity", "stage_sparsity": r"sparsity", "cx": r"\bcx\b", "per_stage": r"per_stage",
    "early": r"early", "middle": r"middle", "late": r"late", "calibration": r"calibration", "calibration_size": r"calibration_size",
    "scorer": r"scorer", "labels": r"labels|class", "seed": r"seed", "count": r"count", "cfg": r"cfg", "repeats": r"repeats",
    "only_stage": r"only_stage", "job_id": r"job[ _]id", "allocation": r"allocation", "prompts": r"prompt",
    "negative_prompt": r"negative[ _]prompt",
}
# Valid values of a no-weights model end here (nothing is ever queued by the fuzzer).
ACCEPTED = r"weights not present"

BAD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 10**20, 0, -1]),
    st.text(max_size=40),
    st.builds(lambda char, n: char * n, st.characters(), st.integers(min_value=500, max_value=150_000)),
    st.lists(st.one_of(st.integers(), st.floats(allow_nan=True), st.text(max_size=5)), max_size=5),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


@pytest.mark.slow
@pytest.mark.parametrize("api", list(ENDPOINTS))
def test_fuzzed_values_get_a_result_or_an_error_naming_them(studio, api):
    params, defaults = ENDPOINTS[api]

    @hypothesis_settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(index=st.integers(min_value=0, max_value=len(params) - 1), value=BAD_VALUES)
    def check(index, value):
        data = list(defaults)
        data[index] = value
        name, payload = _raw_call(studio["url"], api, data)
        if name == "complete":
            assert api in ("plan", "divide"), (api, params[index], value)  # results only where no job is needed
            return
        message = _error((name, payload))
        assert re.search(NAMES[params[index]], message, flags=re.IGNORECASE) or re.search(ACCEPTED, message), (
            params[index], repr(value)[:80], message,
        )
        _no_server_paths(message, studio["cache"])

    check()
    assert studio["engine"].jobs.counts()["queued"] == 0  # the fuzzer never queued a job
