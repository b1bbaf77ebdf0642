"""The studio's Divide section end to end: the API through gradio_client, the drag in real Chromium.

One server for the module (in-process, free port, closed in teardown), one headless
Chromium (Debian's /usr/bin/chromium; never `playwright install`). The built-in model is
planned without weights, so these tests need none. The browser test also writes the
README screenshot (assets/screenshot-divide.png) when MOSAIC_SCREENSHOT=1.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import httpx
import numpy as np
import pytest
from conftest import free_port
from gradio_client import Client
from gradio_client.exceptions import AppError
from playwright.sync_api import sync_playwright

from mosaic_core.divide.plan import build_plan
from ui.divide_tab import parse_dragged_M
from ui.engine import StudioEngine
from ui.studio import build_studio, launch_kwargs

ROOT = Path(__file__).resolve().parent.parent
# The README's screenshot is refreshed only on request (MOSAIC_SCREENSHOT=1): a test run
# must not rewrite tracked files.
SCREENSHOT_REQUESTED = os.environ.get("MOSAIC_SCREENSHOT") == "1"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync",
]
MODEL = "digits-dit"



@pytest.fixture(scope="module")
def studio_engine():
    engine = StudioEngine()
    engine.warm_up()
    yield engine
    engine.jobs.shutdown()


@pytest.fixture(scope="module")
def studio_url(studio_engine):
    demo = build_studio(studio_engine)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs())
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(studio_url):
    return Client(studio_url, verbose=False)


def _stages(plan_dict: dict) -> list[tuple]:
    return [
        (s["name"], s["t_min"], s["t_max"], s["num_steps"], round(s["sparsity"], 9), s["heads_kept"], s["units_kept"])
        for s in plan_dict["stages"]
    ]


# ----- gradio_client ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(M=0.55, lam=0.01, sparsity=0.3),
        dict(M=0.4, lam=0.02, sparsity=0.5, sampler="dpm", steps=20),
        dict(M=0.7, lam=0.0, stage_sparsity=[0.5, 0.1, 0.4]),
        dict(model="facebook/DiT-XL-2-256", M=0.55, lam=0.01, sparsity=0.33),  # no weights: plans anyway
    ],
)
def test_plan_endpoint_matches_build_plan(client, kwargs):
    kwargs = dict(model=MODEL) | kwargs
    expected = build_plan(
        kwargs["model"],
        num_inference_steps=kwargs.get("steps", 50),
        M=kwargs["M"],
        lam=kwargs["lam"],
        sparsity=None if "stage_sparsity" in kwargs else kwargs["sparsity"],
        stage_sparsity=kwargs.get("stage_sparsity"),
        scheduler=kwargs.get("sampler", "ddim"),
    ).to_dict()
    got = client.predict(api_name="/plan", **kwargs)
    assert got["model"] == kwargs["model"]
    assert _stages(got) == _stages(expected)
    assert got["timesteps"] == expected["timesteps"]
    assert got["macs_staged"] == expected["macs_staged"]
    assert math.isclose(got["overall_sparsity"], expected["overall_sparsity"])


@pytest.mark.parametrize("model, steps", [("sd3-medium", 28), ("flux-schnell", 4), ("pixart-sigma", 20), (MODEL, 50)])
def test_plan_endpoint_takes_the_models_own_step_count_when_none_is_named(client, model, steps):
    # the step counts of the pipelines' own defaults (StableDiffusion3Pipeline 28, FLUX.1-schnell 4, PixArt-Σ 20)
    got = client.predict(model=model, sparsity=0.3, api_name="/plan")
    assert got["num_inference_steps"] == steps and len(got["timesteps"]) == steps


@pytest.mark.parametrize(
    "model, sampler", [("sd3-medium", "flow-euler"), ("flux-schnell", "flow-euler-1/n"), ("pixart-sigma", "dpm"), ("sdxl-base", "euler"), (MODEL, "ddim")],
)
def test_plan_endpoint_takes_the_models_own_sampler_when_none_is_named(client, model, sampler):
    # SD3's FlowMatchEulerDiscreteScheduler, Flux's 1/n sigmas (FluxPipeline), DDIM for DiT
    got = client.predict(model=model, steps=4, sparsity=0.3, api_name="/plan")
    expected = build_plan(model, 4, 0.55, 0.01, sparsity=0.3, scheduler=sampler).to_dict()
    assert got["scheduler"] == sampler and got["timesteps"] == expected["timesteps"]


def test_plan_endpoint_reference_stages(client):
    """docs/method.md §1: linear schedule, M=0.55, λ=0.01 → middle τ∈[103, 568], DDIM-50 → 21/23/6 steps."""
    got = client.predict(model=MODEL, M=0.55, lam=0.01, sparsity=0.3, api_name="/plan")
    assert [(s["t_min"], s["t_max"], s["num_steps"]) for s in got["stages"]] == [(569, 999, 21), (103, 568, 23), (0, 102, 6)]


@pytest.mark.parametrize("per_stage", [False, True])
def test_divide_endpoint_returns_the_same_plan(client, per_stage):
    # model, folder, sampler, steps, M, lam, cx, sparsity, per_stage, early, middle, late
    outputs = client.predict(MODEL, "", "ddim", 50, 0.45, 0.01, 1.0, 0.3, per_stage, 0.6, 0.05, 0.3, api_name="/divide")
    plan_json = next(o for o in outputs if isinstance(o, dict) and "stages" in o)
    if per_stage:
        expected = build_plan(MODEL, 50, 0.45, 0.01, stage_sparsity=(0.6, 0.05, 0.3)).to_dict()
    else:
        expected = build_plan(MODEL, 50, 0.45, 0.01, sparsity=0.3).to_dict()
    assert plan_json["mode"] == ("manual" if per_stage else "auto")
    assert _stages(plan_json) == _stages(expected)
    stage_html = next(o for o in outputs if isinstance(o, str) and "mosaic-stage-table" in o)
    low, high = expected["stages"][1]["t_min"], expected["stages"][1]["t_max"]
    assert f'data-stage="middle" data-field="tau">{low}–{high}<' in stage_html


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(M=1.5), r"M must be in \(0, 1\), got 1\.5"),
        (dict(M=0.0), r"M must be in \(0, 1\), got 0\.0"),
        (dict(sparsity=0.95), r"sparsity must be in \[0, 0\.9\], got 0\.95"),
        (dict(stage_sparsity=[0.2, 0.95, 0.2]), r"middle sparsity must be in \[0, 0\.9\], got 0\.95"),
        (dict(model="no-such-model"), r"unknown model 'no-such-model'"),
        (dict(sampler="heun"), r"unknown scheduler 'heun'"),
    ],
)
def test_plan_endpoint_bad_values_raise_the_engine_message(client, kwargs, message):
    arguments = dict(model=MODEL, M=0.55, lam=0.01, sparsity=0.3) | kwargs
    with pytest.raises(AppError, match=message):
        client.predict(api_name="/plan", **arguments)


def test_dragged_value_parsing():
    # snapped to the slider's step (0.005), so a drag and the slider land on the same values
    assert parse_dragged_M("0.412|1712345678") == 0.41 and parse_dragged_M("0.4126|1") == 0.415
    assert parse_dragged_M("0.99|1") == 0.95 and parse_dragged_M("-3|1") == 0.05  # clamped to the slider
    with pytest.raises(ValueError, match=r"got 'abc'"):
        parse_dragged_M("abc|1")
    with pytest.raises(ValueError, match=r"got nan"):
        parse_dragged_M("nan|1")


def _raw_call(url: str, api_name: str, data: list) -> list[tuple[str, object]]:
    """POST /gradio_api/call/<api> with a body strict JSON can't hold (NaN); the (event, data) pairs back."""
    body = json.dumps({"data": data}, allow_nan=True)
    with httpx.Client(base_url=url, timeout=30) as http:
        answer = http.post(f"gradio_api/call/{api_name}", content=body, headers={"content-type": "application/json"})
        answer.raise_for_status()
        stream = http.get(f"gradio_api/call/{api_name}/{answer.json()['event_id']}").text
    events = re.findall(r"^event: (\w+)\ndata: (.*)$", stream, flags=re.MULTILINE)
    return [(name, json.loads(payload)) for name, payload in events]


@pytest.mark.parametrize("api_name", ["plan", "divide"])
def test_nan_lambda_is_an_error_naming_the_value(studio_url, api_name):
    if api_name == "plan":
        data = [MODEL, "ddim", 50, 0.55, float("nan"), 0.3, None, 1.0]
    else:
        data = [MODEL, "", "ddim", 50, 0.55, float("nan"), 1.0, 0.3, False, 0, 0, 0]
    events = _raw_call(studio_url, api_name, data)
    assert [name for name, _ in events] == ["error"]
    message = events[0][1]["error"]
    assert re.fullmatch(r"lam \(λ\) must be a finite number.*got nan", message), message


def _controls(model: str = MODEL, folder: str = "", sampler: str = "ddim", steps: int = 50) -> list:
    """The Divide controls in order: model, folder, sampler, steps, M, λ, c_x, sparsity, per stage, 3 stage values."""
    return [model, folder, sampler, steps, 0.55, 0.01, 1.0, 0.3, False, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "model, sampler, steps",
    [("pixart-sigma", "dpm", 20), ("sd3-medium", "flow-euler", 28), ("flux-schnell", "flow-euler-1/n", 4), (MODEL, "ddim", 50)],
)
def test_picking_a_model_takes_its_own_sampler_and_step_count(studio_engine, model, sampler, steps):
    """As the CFG box takes the model's scale: PixArtSigmaPipeline samples DPM-Solver at 20 steps,
    StableDiffusion3Pipeline flow Euler at 28, FLUX.1-schnell 4, whatever the boxes held before."""
    from ui.divide_tab import DivideHandlers

    got = DivideHandlers(studio_engine).select_model(*_controls(model=model, sampler="ddim", steps=250), [100, 200], 7)
    assert (got[3]["value"], got[4]["value"]) == (sampler, steps)
    assert got[5] is None  # hand-set edges go back to M's
    assert got[6]["value"] == 0  # and dropped steps to none: another sampler could not take them
    expected = build_plan(model, steps, 0.55, 0.01, sparsity=0.3, scheduler=sampler)
    assert got[10]["timesteps"] == expected.to_dict()["timesteps"]  # the plan shown is of those settings


def _array(value) -> list[float]:
    """A plotly JSON array: a plain list, or plotly 6+'s {"bdata": base64, "dtype": ...}."""
    if isinstance(value, dict):
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).tolist()
    return list(value)


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_trajectory_endpoint_samples_a_real_model(client, tiny_latent_folder, sampler):
    """A tiny real DiT in diffusers' layout, picked by folder: one distance per step, 0 at the end."""
    figure, note = client.predict(*_controls(folder=str(tiny_latent_folder), sampler=sampler, steps=8), api_name="/trajectory")
    shares = re.findall(r"(early|middle|late) (\d+)%", note.split("**Trajectory:**")[1])
    assert [name for name, _ in shares][:2] == ["early", "middle"]  # 8 DPM steps may end above the late stage
    assert sum(int(share) for _, share in shares) == pytest.approx(100, abs=2)
    traces = json.loads(figure["plot"])["data"]
    x, distance = _array(traces[0]["x"]), _array(traces[0]["y"])  # the line through every step
    timesteps = build_plan(str(tiny_latent_folder), 8, scheduler=sampler).timesteps
    assert x == pytest.approx(timesteps)
    assert distance[-1] == 0.0 and all(math.isfinite(d) and d >= 0 for d in distance)
    assert distance[0] > distance[-2]  # x̂₀ is furthest from the final image at the start
    assert sum(len(_array(trace["x"])) for trace in traces[1:]) == 8  # every step has its stage marker


def test_trajectory_without_weights_says_where_to_put_them(client):
    with pytest.raises(AppError, match=r"weights not present: put a diffusers copy of 'facebook/DiT-XL-2-256'"):
        client.predict(*_controls(model="facebook/DiT-XL-2-256"), api_name="/trajectory")


# ----- headless Chromium ------------------------------------------------------------------------

PLOT = "#mosaic-schedule-plot .js-plotly-plot"
READ_STATE = """() => {
  const gd = document.querySelector('%s');
  const line = gd.layout.shapes.find((s) => s.name === 'threshold');
  const cell = (stage) => document.querySelector(`#mosaic-stage-table td[data-stage=${stage}][data-field=tau]`).textContent;
  return {
    M: parseFloat(document.querySelector('#mosaic-M input[type=number]').value),
    tableM: parseFloat(document.querySelector('#mosaic-stage-table [data-field=M]').textContent),
    lineM: line.y0 / gd.layout.meta.max_score,
    lineFlat: line.y0 === line.y1 && line.x0 === 0 && line.x1 === 1,
    early: cell('early'), middle: cell('middle'), late: cell('late'),
  };
}""" % PLOT


def _middle(state: dict) -> tuple[int, int]:
    low, high = state["middle"].split("–")
    return int(low), int(high)


def _expected_middle(M: float) -> tuple[int, int]:
    return build_plan(MODEL, 50, M, 0.01, sparsity=0.3).bounds.middle


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(studio_url, browser):
    """A fresh page (its own session, the default controls) with the threshold listener bound."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(studio_url)
        page.wait_for_selector("#mosaic-stage-table", state="attached", timeout=60_000)
        page.wait_for_function(
            f"() => document.querySelector('{PLOT}')?.getAttribute('data-mosaic-drag') === 'bound'", timeout=30_000
        )
        yield page
    finally:
        page.close()


def _threshold_handle(page):
    """The invisible, draggable path plotly lays over an editable shape (a path: 'hidden' to playwright)."""
    handle = page.locator("#mosaic-schedule-plot .shapelayer g[data-index='0']:not(.shape-group) > path").first
    handle.wait_for(state="attached")
    return handle


def _wait_for_new_M(page, old: float) -> dict:
    page.wait_for_function(
        f"""() => {{
            const M = parseFloat(document.querySelector('#mosaic-M input[type=number]').value);
            const tableM = parseFloat(document.querySelector('#mosaic-stage-table [data-field=M]')?.textContent);
            return Math.abs(M - {old}) > 1e-9 && Math.abs(tableM - M) < 1e-9;
        }}""",
        timeout=30_000,
    )
    page.wait_for_function(
        f"""() => {{
            const gd = document.querySelector('{PLOT}');
            const line = gd.layout.shapes.find((s) => s.name === 'threshold');
            const M = parseFloat(document.querySelector('#mosaic-M input[type=number]').value);
            return Math.abs(line.y0 / gd.layout.meta.max_score - M) < 1e-6;
        }}""",
        timeout=30_000,
    )
    return page.evaluate(READ_STATE)


@pytest.mark.browser
def test_page_loads_with_the_reference_stages_and_screenshot(page, tmp_path):
    state = page.evaluate(READ_STATE)
    assert state["M"] == pytest.approx(0.55)
    assert state["lineM"] == pytest.approx(0.55)
    assert (state["early"], state["middle"], state["late"]) == ("569–999", "103–568", "0–102")
    assert "weights" in page.locator("#mosaic-status").inner_text()
    assert page.locator("#mosaic-cost [data-field=speedup]").inner_text().endswith("×")
    screenshot = ROOT / "assets" / "screenshot-divide.png" if SCREENSHOT_REQUESTED else tmp_path / "page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 50_000


def _drag_line(page, dy: float) -> dict:
    """Press on the threshold line, move it `dy` pixels (negative = up) in small steps, release."""
    box = _threshold_handle(page).bounding_box()
    x, y = box["x"] + 0.35 * box["width"], box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    for step in range(1, 9):
        page.mouse.move(x, y + dy * step / 8)
    page.mouse.up()
    return box


@pytest.mark.browser
def test_dragging_the_threshold_line_sets_M_and_the_stages(page):
    before = page.evaluate(READ_STATE)
    box = _drag_line(page, -64)  # upwards: a higher threshold, a narrower middle stage
    after = _wait_for_new_M(page, before["M"])
    assert after["M"] > before["M"] + 0.05
    assert after["tableM"] == pytest.approx(after["M"])
    assert after["lineM"] == pytest.approx(after["M"], abs=1e-6) and after["lineFlat"]
    assert _middle(after) == _expected_middle(after["M"])
    low, high = _middle(after)
    assert low > _middle(before)[0] and high < _middle(before)[1]
    assert after["early"] == f"{high + 1}–999" and after["late"] == f"0–{low - 1}"
    new_box = _threshold_handle(page).bounding_box()
    assert new_box["y"] < box["y"] - 30  # the line stays where it was dropped
    # The listener survives the re-render that the first drop caused: drag it back down.
    _drag_line(page, +96)
    again = _wait_for_new_M(page, after["M"])
    assert again["M"] < after["M"] - 0.1
    assert _middle(again) == _expected_middle(again["M"])


@pytest.mark.browser
def test_moving_the_M_slider_moves_the_line(page):
    before = page.evaluate(READ_STATE)
    line_y = _threshold_handle(page).bounding_box()["y"]
    slider = page.locator("#mosaic-M input[type=range]")
    box = slider.bounding_box()
    slider.click(position={"x": 0.15 * box["width"], "y": box["height"] / 2})  # pointerup = release
    after = _wait_for_new_M(page, before["M"])
    assert after["M"] < 0.35
    assert after["lineM"] == pytest.approx(after["M"], abs=1e-6)
    assert _middle(after) == _expected_middle(after["M"])
    assert _threshold_handle(page).bounding_box()["y"] > line_y + 30  # a lower threshold is lower on screen


@pytest.mark.browser
@pytest.mark.slow
def test_tracing_runs_as_a_job_with_a_bar_in_the_browser(page, tiny_latent_folder):
    """The trace button queues a job: its bar ends 'done' at 100 % and the chart gets one point per step."""
    folder = page.locator("#mosaic-folder textarea, #mosaic-folder input").first
    folder.fill(str(tiny_latent_folder))
    folder.press("Enter")
    page.wait_for_function("() => !document.querySelector('#mosaic-trajectory-start').disabled", timeout=30_000)
    page.click("#mosaic-trajectory-start")
    page.wait_for_function(
        "() => document.querySelector('#mosaic-trajectory-job')?.dataset.state === 'done'", timeout=120_000
    )
    bar = page.locator("#mosaic-trajectory-job")
    assert bar.get_attribute("data-fraction") == "1.0000"
    assert re.fullmatch(r"trajectory-[0-9a-f]{32}", bar.get_attribute("data-job"))
    page.wait_for_function(
        """() => {
            const gd = document.querySelector('#mosaic-trajectory-plot .js-plotly-plot');
            return gd && gd.data && gd.data.map((trace) => trace.name).slice(1).join() === 'early,middle,late';
        }""",
        timeout=30_000,
    )
    shares = re.findall(r"(early|middle|late) (\d+)%", page.locator("#mosaic-teaching-note").inner_text())
    assert [name for name, _ in shares] == ["early", "middle", "late"]
    assert sum(int(share) for _, share in shares) == pytest.approx(100, abs=2)


def test_a_running_trace_is_cancelled_and_caches_nothing(studio_engine, tiny_latent_folder):
    """Cancel reaches the sampler loop (should_stop between steps): the job ends 'cancelled', no trajectory cached."""
    from ui.divide_tab import DivideHandlers

    handlers = DivideHandlers(studio_engine)
    controls = _controls(folder=str(tiny_latent_folder), steps=1000)
    job_id = handlers.submit_trace("tester", *controls)
    deadline = time.monotonic() + 60
    while studio_engine.jobs.status(job_id, "tester").fraction <= 0 and time.monotonic() < deadline:
        time.sleep(0.005)  # wait until the sampler has reported a step
    assert studio_engine.jobs.cancel(job_id, "tester").state in ("running", "done")
    status = studio_engine.jobs.wait(job_id, timeout=60, owner="tester")
    assert status.state == "cancelled", status
    assert 0 < status.fraction < 1
    spec = studio_engine.resolve(str(tiny_latent_folder))
    assert studio_engine.cached_trajectory(spec, "ddim", 1000) is None


# ----- stage edges set by hand (docs/method.md §12.1) -----------------------------------------


def test_dragged_edge_parsing():
    from ui.divide_tab import dragged_edges

    # the low line sits at τ_lo − ½, the high line at τ_hi + ½ (ui/charts.py)
    assert dragged_edges("edge-low:149.5|1", (103, 568), 1000) == (150, 568)
    assert dragged_edges("edge-low:148.9|1", (103, 568), 1000) == (149, 568)
    assert dragged_edges("edge-high:600.5|1", (103, 568), 1000) == (103, 600)
    assert dragged_edges("edge-high:1200|1", (103, 568), 1000) == (103, 999)  # clipped to T − 1
    assert dragged_edges("edge-low:-40|1", (103, 568), 1000) == (0, 568)
    assert dragged_edges("edge-low:700.5|1", (103, 568), 1000) == (568, 701)  # dropped past the other: sorted
    with pytest.raises(ValueError, match=r"dragged edge must be one of edge-low, edge-high, got 'threshold'"):
        dragged_edges("threshold:3|1", (103, 568), 1000)
    with pytest.raises(ValueError, match=r"got 'abc'"):
        dragged_edges("edge-low:abc|1", (103, 568), 1000)
    with pytest.raises(ValueError, match=r"got nan"):
        dragged_edges("edge-high:nan|1", (103, 568), 1000)


def test_plan_edges_endpoint_takes_hand_set_edges(client):
    got = client.predict(model=MODEL, M=0.55, lam=0.01, sparsity=0.3, edges=[150, 600], api_name="/plan_edges")
    assert got["edges_source"] == "manual"
    # DDIM-50 visits 0, 20, …, 980: late 0…140 (8 steps), middle 160…600 (23), early 620…980 (19)
    assert [(s["t_min"], s["t_max"], s["num_steps"]) for s in got["stages"]] == [(601, 999, 19), (150, 600, 23), (0, 149, 8)]
    with pytest.raises(AppError, match=r"stage edges must be 2 whole numbers LO,HI .*got 600,150"):
        client.predict(model=MODEL, sparsity=0.3, edges=[600, 150], api_name="/plan_edges")
    # without edges it is the `plan` endpoint (whose argument list stays as it was for raw REST callers)
    assert client.predict(model=MODEL, sparsity=0.3, api_name="/plan_edges") == client.predict(model=MODEL, sparsity=0.3, api_name="/plan")


@pytest.mark.parametrize("api", ["/prune_start_edges", "/compare_start_edges"])
def test_job_endpoints_with_edges_check_them_before_any_job(client, api):
    with pytest.raises(AppError, match=r"stage edges must be 2 whole numbers LO,HI .*got 600,150"):
        client.predict(model=MODEL, sparsity=0.3, edges=[600, 150], api_name=api)
    with pytest.raises(AppError, match=r"stage edges must be 2 whole numbers LO,HI with 0 <= LO <= HI < 1000 .*got 150,1000"):
        client.predict(model=MODEL, sparsity=0.3, edges=[150, 1000], api_name=api)


READ_TABLE = """() => {
  const cell = (stage, field) => document.querySelector(`#mosaic-stage-table td[data-stage=${stage}][data-field=${field}]`).textContent;
  const gd = document.querySelector('%s');
  return {
    edges: document.querySelector('#mosaic-stage-table [data-field=edges]').textContent,
    chartEdges: gd.layout.meta.edges,
    pixelsPerTimestep: gd._fullLayout.xaxis._length / 999,
    rows: ['early', 'middle', 'late'].map((stage) => [cell(stage, 'tau'), cell(stage, 'steps'), cell(stage, 'sparsity')]),
  };
}""" % PLOT


def _edge_handle(page, index: int):
    """The draggable path of edge line `index` (1 low, 2 high): the shapes after the threshold."""
    handle = page.locator(f"#mosaic-schedule-plot .shapelayer g[data-index='{index}']:not(.shape-group) > path").first
    handle.wait_for(state="attached")
    return handle


def _drag_edge(page, index: int, dx: float) -> None:
    """Press on an edge line near its top (away from the threshold), move it `dx` pixels, release."""
    box = _edge_handle(page, index).bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + 0.1 * box["height"]
    page.mouse.move(x, y)
    page.mouse.down()
    for step in range(1, 9):
        page.mouse.move(x + dx * step / 8, y)
    page.mouse.up()


def _expected_rows(edges) -> list[list[str]]:
    """The stage table rows of the plan with these edges, from `build_plan` (the reference)."""
    plan = build_plan(MODEL, 50, 0.55, 0.01, sparsity=0.3, edges=edges)
    rows = []
    for index in range(3):
        bounds = plan.bounds.ranges[index]
        tau = "empty" if bounds is None else f"{bounds[0]}–{bounds[1]}"
        rows.append([tau, str(plan.step_counts[index]), f"{plan.allocation.achieved[index]:.3f}"])
    return rows


@pytest.mark.browser
def test_dragging_an_edge_sets_it_by_hand_and_M_resets_it(page):
    before = page.evaluate(READ_TABLE)
    assert before["edges"] == "from M" and before["chartEdges"] == [103, 568]
    # The axis is reversed (τ falls to the right): 80 px to the right lowers τ_hi by 80 / (px per τ).
    _drag_edge(page, 2, +80)
    page.wait_for_function(
        "() => document.querySelector('#mosaic-stage-table [data-field=edges]')?.textContent === 'set by hand'", timeout=30_000
    )
    after = page.evaluate(READ_TABLE)
    low, high = after["chartEdges"]
    assert low == 103  # the other edge stays
    assert high == pytest.approx(568 - 80 / after["pixelsPerTimestep"], abs=4)
    assert after["rows"] == _expected_rows((low, high))  # the stage table is the plan of these edges
    assert after["rows"][1][0] == f"103–{high}" and after["rows"][0][0] == f"{high + 1}–999"
    # Now the low edge, further along the trajectory: the high edge keeps its hand-set place.
    _drag_edge(page, 1, -40)
    page.wait_for_function(f"() => document.querySelector('{PLOT}').layout.meta.edges[0] > 110", timeout=30_000)
    both = page.evaluate(READ_TABLE)
    assert both["chartEdges"][1] == high and both["rows"] == _expected_rows(tuple(both["chartEdges"]))
    # Dragging the threshold puts both edges back on M's.
    _drag_line(page, -64)
    page.wait_for_function(
        "() => document.querySelector('#mosaic-stage-table [data-field=edges]')?.textContent === 'from M'", timeout=30_000
    )
    state = _wait_for_new_M(page, 0.55)
    assert _middle(state) == _expected_middle(state["M"])
