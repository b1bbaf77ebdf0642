"""The studio with text-to-image models: a tiny real SDXL in the models directory, end to end.

One in-process server for the module. `$MOSAIC_MODELS_DIR` points at a temporary folder
holding a tiny SDXL pipeline (`tiny-sdxl`, conftest.tiny_sdxl_parts) and a tiny 5-class
pixel DiT (`tiny-dit`), and typed local paths are switched off (`local_model_roots=()`): the
picker's entries from the models directory must work on their own. Driven through
gradio_client (prompts and negative prompts on `compare_start`, the old positional call
still working, `sdxl-base` saying where its weights go) and in headless Chromium (pick the
SDXL, type a prompt, Compare shows dense and staged images). Workloads are tiny: 4 steps,
16 calibration images per stage, 2–3 images, one timed run, one torch thread.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
import torch
from conftest import free_port
from gradio_client import Client
from gradio_client.exceptions import AppError

from mosaic_core import limits
from mosaic_core.divide.plan import build_plan
from mosaic_core.models.registry import MODELS_DIR_ENV, resolve_model
from ui import settings
from ui.engine import StudioEngine
from ui.studio import build_studio, launch_kwargs

pytestmark = pytest.mark.slow  # one studio server and a tiny SDXL for the module (tens of seconds on 2 cores)

STEPS = 4
PROMPTS = ["a red fox at sunrise", "a koi pond in winter"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A models directory with a tiny SDXL pipeline and a tiny 5-class pixel DiT."""
    import json

    from conftest import LINEAR_SCHEDULER, tiny_pixel_dit, tiny_sdxl_parts
    from diffusers import StableDiffusionXLPipeline

    root = tmp_path_factory.mktemp("models")
    StableDiffusionXLPipeline(**tiny_sdxl_parts(tmp_path_factory.mktemp("tokenizers"))).save_pretrained(root / "tiny-sdxl")
    dit = root / "tiny-dit"
    tiny_pixel_dit(classes=5).save_pretrained(dit, safe_serialization=True)
    (dit / "scheduler_config.json").write_text(json.dumps(LINEAR_SCHEDULER))
    return root


@pytest.fixture(scope="module")
def studio(models_dir, tmp_path_factory):
    saved = {name: os.environ.get(name) for name in (MODELS_DIR_ENV, settings.CACHE_DIR_ENV)}
    os.environ[MODELS_DIR_ENV] = str(models_dir)
    os.environ[settings.CACHE_DIR_ENV] = str(tmp_path_factory.mktemp("mosaic-cache"))
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = StudioEngine(local_model_roots=())  # typed paths off: the models directory alone
    demo = build_studio(engine)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs())
    try:
        yield dict(url=f"http://127.0.0.1:{port}/", engine=engine, sdxl=str(models_dir / "tiny-sdxl"), dit=str(models_dir / "tiny-dit"))
    finally:
        demo.close()
        engine.jobs.shutdown()
        torch.set_num_threads(saved_threads)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def client(studio):
    return Client(studio["url"], verbose=False)


def _settings(model: str) -> dict:
    return dict(model=model, sampler="ddim", steps=STEPS, M=0.55, lam=0.01, sparsity=0.3, calibration="snr",
                calibration_size=16, scorer="obs")


def _wait(client: Client, api: str, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.predict(job_id, api_name=api)
        if status["state"] in ("done", "cancelled", "failed"):
            return status
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {status}")


def _pruned(client, model: str) -> dict:
    status = _wait(client, "/prune_status", client.predict(**_settings(model), api_name="/prune_start")["job_id"])
    assert status["state"] == "done", status
    return status


@pytest.fixture(scope="module")
def sdxl_pruned(client, studio):
    return _pruned(client, studio["sdxl"])


def test_the_picker_lists_the_models_directory_and_they_resolve(studio):
    choices = StudioEngine.model_choices()
    assert ("tiny-sdxl (local)", studio["sdxl"]) in choices and ("tiny-dit (local)", studio["dit"]) in choices
    assert "sdxl-base" in choices
    engine = studio["engine"]
    assert engine.resolve(studio["sdxl"]).conditioning == "text" and engine.resolve(studio["dit"]).conditioning == "class"
    with pytest.raises(ValueError, match="local model folders are off"):  # a typed path outside the directory
        engine.resolve(str(Path(studio["sdxl"]).parent.parent))


def test_compare_endpoint_takes_prompts_and_a_negative_prompt(client, studio, sdxl_pruned):
    started = client.predict(
        **_settings(studio["sdxl"]), seed=0, count=3, cfg=5.0, repeats=1,
        prompts="\n".join(PROMPTS) + "\n", negative_prompt="blurry", api_name="/compare_start",
    )
    status = _wait(client, "/compare_status", started["job_id"])
    assert status["state"] == "done", status
    result = status["result"]
    assert result["prompts"] == [PROMPTS[0], PROMPTS[1], PROMPTS[0]] and result["labels"] == []
    assert result["negative_prompt"] == "blurry"
    size = resolve_model(studio["sdxl"]).sample_size * 2  # the config's latent size through the 2-level VAE
    assert result["num_images"] == 3 and result["image_shape"] == [size, size, 3]
    dense, staged = result["rows"]
    plan = build_plan(resolve_model(studio["sdxl"]), STEPS, 0.55, 0.01, sparsity=0.3)
    assert staged["ideal_speedup"] == pytest.approx(plan.ideal_speedup, rel=1e-3)
    assert dense["psnr"] == 100.0 and 0 < staged["psnr"] < 100  # staged differs from dense, same seeds
    assert dense["accuracy"] is None and dense["fd"] is None  # no classes to score


def test_the_old_positional_compare_call_still_works(client, studio):
    _pruned(client, studio["dit"])
    started = client.predict(  # the 17 positional values of the original endpoint, nothing more
        studio["dit"], "ddim", STEPS, 0.55, 0.01, 0.3, None, 1.0, "snr", 16, "obs", "0-3", 0, 4, 1.5, 1, "all stages",
        api_name="/compare_start",
    )
    status = _wait(client, "/compare_status", started["job_id"])
    assert status["state"] == "done", status
    assert status["result"]["labels"] == [0, 1, 2, 3] and status["result"]["prompts"] == []
    assert status["result"]["image_shape"] == [8, 8, 1]
    # A plain HTTP caller sends a bare list of the old length (no client fills the new defaults).
    import json
    import re

    import httpx

    old = [studio["dit"], "ddim", STEPS, 0.55, 0.01, 0.3, None, 1.0, "snr", 16, "obs", "1,2", 0, 2, 1.5, 1, "all stages"]
    with httpx.Client(base_url=studio["url"], timeout=60) as http:
        answer = http.post("gradio_api/call/compare_start", json={"data": old, "session_hash": client.session_hash})
        answer.raise_for_status()
        stream = http.get(f"gradio_api/call/compare_start/{answer.json()['event_id']}").text
    name, payload = re.findall(r"^event: (\w+)\ndata: (.*)$", stream, flags=re.MULTILINE)[-1]
    assert name == "complete", stream
    status = _wait(client, "/compare_status", json.loads(payload)[0]["job_id"])
    assert status["state"] == "done" and status["result"]["labels"] == [1, 2], status


@pytest.mark.parametrize(
    "model, kwargs, message",
    [
        ("sdxl", dict(labels="0-3"), r"this model is text-to-image: give prompts"),
        ("sdxl", dict(prompts="a cat\n" * (limits.MAX_PROMPTS + 1)), rf"prompts has {limits.MAX_PROMPTS + 1} lines: at most {limits.MAX_PROMPTS}"),
        ("sdxl", dict(prompts=["a cat", "x" * 1001]), r"prompt 2 is 1001 characters long: at most 1000 allowed"),
        ("sdxl", dict(prompts="a cat", negative_prompt="y" * 1001), r"negative_prompt is 1001 characters long"),
        ("dit", dict(prompts="a cat"), r"prompts are for text-to-image models; this model is class-conditional"),
        ("dit", dict(negative_prompt="blurry"), r"negative_prompt is for text-to-image models"),
        ("sdxl-base", dict(prompts="a cat"), r"weights not present: put a diffusers copy of 'stabilityai/stable-diffusion-xl-base-1\.0'"),
    ],
)
def test_bad_prompt_values_are_errors_naming_them(client, studio, model, kwargs, message):
    name = studio.get(model, model)
    with pytest.raises(AppError, match=message):
        client.predict(**_settings(name), count=2, **kwargs, api_name="/compare_start")


def test_sdxl_base_plans_without_weights_and_says_where_they_go_to_prune(client):
    plan = client.predict(model="sdxl-base", sampler="ddim", steps=50, M=0.55, lam=0.01, sparsity=0.3, api_name="/plan")
    assert [plan["stages"][i]["num_steps"] for i in range(3)] == [7, 37, 6]  # scaled_linear, DDIM-50 (method §1.7)
    with pytest.raises(AppError, match=r"cache/models/stabilityai--stable-diffusion-xl-base-1\.0"):
        client.predict(**_settings("sdxl-base"), api_name="/prune_start")


def test_the_trajectory_trace_of_a_text_model(client, studio):
    controls = [studio["sdxl"], "", "ddim", STEPS, 0.55, 0.01, 1.0, 0.3, False, 0.0, 0.0, 0.0]
    figure, note = client.predict(*controls, api_name="/trajectory")
    import base64
    import json

    import numpy as np

    line = json.loads(figure["plot"])["data"][0]  # the distance of x̂₀ to the final one, per step
    distance = np.frombuffer(base64.b64decode(line["y"]["bdata"]), dtype="<f8")
    assert len(distance) == STEPS and distance[-1] == 0 and distance[0] > 0
    assert note.startswith("**Trajectory:**")  # prompts from assets/prompts.txt: no class labels needed


# ----- headless Chromium ------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
COMPARE_JOB = "#mosaic-compare-job"


def _set_number(page, label: str, value) -> None:
    box = page.get_by_label(f"number input for {label}")
    box.fill(str(value))
    box.press("Tab")


@pytest.mark.browser
def test_pick_the_sdxl_type_a_prompt_and_compare_in_the_browser(studio, sdxl_pruned):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(studio["url"])
            page.wait_for_selector("#mosaic-stage-table", state="attached", timeout=60_000)
            assert page.locator("#mosaic-compare-labels").is_visible() and not page.locator("#mosaic-compare-prompts").is_visible()
            picker = page.get_by_label("Model", exact=True)
            picker.click()
            page.get_by_role("option", name="tiny-sdxl (local)").click()
            page.wait_for_selector("#mosaic-compare-prompts", state="visible", timeout=30_000)
            assert not page.locator("#mosaic-compare-labels").is_visible()
            assert page.locator("#mosaic-compare-negative").is_visible()
            page.wait_for_function("() => document.querySelector('#mosaic-status')?.textContent.includes('weights present')")
            # picking the model took its own sampler (its scheduler config: EulerDiscreteScheduler), as its pipeline
            page.wait_for_function(
                "() => document.querySelector('#mosaic-stage-table caption')?.textContent.includes('euler')", timeout=30_000,
            )
            sampler = page.get_by_label("Sampler", exact=True)  # back to the sampler the module's prune used
            sampler.click()
            page.get_by_role("option", name="ddim", exact=True).click()
            _set_number(page, "Steps", STEPS)
            _set_number(page, "Calibration images per stage", 16)
            page.wait_for_function(
                f"() => document.querySelector('#mosaic-stage-table caption')?.textContent.includes('ddim {STEPS} steps')",
                timeout=30_000,
            )
            page.locator("#mosaic-compare-prompts textarea").fill(PROMPTS[0])
            page.locator("#mosaic-compare-count input").fill("2")
            before = page.evaluate(f"() => document.querySelector('{COMPARE_JOB}').dataset.job")
            page.click("#mosaic-compare-start")
            page.wait_for_function(
                f"""() => {{ const job = document.querySelector('{COMPARE_JOB}');
                    return job && ['done', 'failed', 'cancelled'].includes(job.dataset.state) && job.dataset.job !== {before!r}; }}""",
                timeout=180_000,
            )
            state = page.evaluate(f"() => document.querySelector('{COMPARE_JOB}').dataset.state")
            assert state == "done", page.locator(COMPARE_JOB).inner_text()
            for gallery in ("#mosaic-gallery-dense", "#mosaic-gallery-staged"):
                page.wait_for_function(f"() => document.querySelectorAll('{gallery} img').length >= 2", timeout=30_000)
            table = page.locator("#mosaic-compare-table")
            assert PROMPTS[0] in table.inner_text() and "no negative prompt" in table.inner_text()
            assert table.locator("td[data-method=dense][data-field=psnr]").inner_text() == "ref"
            assert table.locator("td[data-method=staged][data-field=accuracy]").inner_text() == "—"
        finally:
            page.close()
            browser.close()
