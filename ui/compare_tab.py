"""The Compare section: dense vs staged on the same labels (or prompts) and seeds, timed and scored, as a job.

`build_compare_section(engine, divide, prune)` lays out the sampling controls, the two
galleries, the timing/quality table and the run history, wired like the Prune section: the
Compare button submits a job to `engine.jobs` and returns; a `gr.Timer` polls it.

What is compared: the dense model against the pruned model of the current plan and the Prune
section's settings (which must have been pruned, or be queued for pruning: otherwise the
button says so). "Prune one stage only" compares against a plan that prunes only that stage,
at its sparsity in the plan, and 0 in the others; that model is pruned inside the comparison
job if needed, through the same cache (its Hessians are the plan's, so it costs seconds).

What is sampled follows the model's family (`ModelSpec.conditioning`): a class-conditional
model shows the class-label box; a text-to-image model shows a prompt box (one prompt per
line, repeated to the image count) and a negative-prompt box (empty: the family's own
unconditional branch) instead. Both contenders get the same prompts and seeds; the image
size is the model's (its config's sample size through the VAE).

Every finished comparison adds a point to the session's history chart (PSNR to dense against
measured speed-up, seconds, or MACs as on the tuner's chart), so the quality/time trade-off of
the settings tried shows up; the runs on its Pareto front (no other run both cheaper and
closer to dense) are joined and starred.

| trigger             | handler                          | api_name (gr.api, plain arguments) |
|---------------------|----------------------------------|------------------------------------|
| Compare             | `CompareHandlers.start`          | `compare_start` (`start_api`)      |
| timer tick          | `JobView` poll → `render`        | `compare_status`                   |
| Cancel              | `JobView` cancel                 | `compare_cancel`                   |
| history x-axis      | `history_figure`          | private                            |
| model picked        | `CompareHandlers.select_model`   | private (label or prompt boxes)    |
| tuner chose a point | `reference_steps`                | private (Dense reference steps)    |

`compare_start` takes the plan and prune settings, then `labels, seed, count, cfg, repeats,
only_stage` (the original positional order, unchanged) and, for text-to-image models,
`prompts` (text, one per line, or a list) and `negative_prompt`; `allocation` and
`dense_steps` (the dense reference's steps; the plan's when left out) come last.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import gradio as gr
import numpy as np
import plotly.graph_objects as go

from mosaic_core.divide.plan import Plan
from mosaic_core.divide.stages import STAGE_NAMES

from ui import settings
from ui.charts import FONT, message_figure
from mosaic_core import limits
from mosaic_core.requests import CompareRequest, PlanRequest
from ui.divide_tab import PLAN_CONTROL_COUNT
from ui.engine import StudioEngine
from ui.job_view import JobView, owner_of, status_dict, user_errors
from ui.jobs import JobStatus
from ui.panels import steps_text
from ui.prune_tab import PruneSection, describe_prune_event, prune_request, prune_summary

COMPARE_TEXT = """
## 5 · Compare: dense vs staged, same seeds
Both models sample the same class labels (or prompts, for a text-to-image model) from the same initial noise. Seconds are
the timed runs' floor on a CPU (each step's least time over the runs, summed: a shared machine only ever adds time) and
their median on a GPU, after a short warm-up, split by stage; the ideal speed-up is the MACs ratio.
Measured stays below ideal by the work pruning does not shrink: LayerNorms, the adaLN modulation and residual adds,
copies (14 % of a dense digits-dit call on a 2-core CPU, docs/method.md §9), and on a GPU the kernel launches
of small batches (§3.11).
PSNR and SSIM compare each staged image with the dense image of the same seed; accuracy and
the Fréchet distance (digit classifier features) apply to the digit model.
"""

PROMPT_CAPTION = 60  # characters of a prompt shown under an image
IDLE_COMPARE = "No comparison yet: prune the plan in section 4, then press Compare."
AXES = ("measured speed-up", "seconds", "MACs (of dense)")


@dataclass
class CompareJob:
    """A checked comparison, resolved: the staged model's plan and prune config, what to sample, how often."""

    request: CompareRequest  # what was asked (labels or prompts repeated to the count, seed, cfg, one stage only)
    spec: object  # ModelSpec
    plan: Plan  # the plan of the staged model (the stage-only variant when one is chosen)
    config: object  # PruneConfig
    sample_config: object  # SampleConfig
    dense_plan: Optional[Plan] = None  # the dense reference's plan when it samples other steps (`dense_steps`)

    @property
    def variant(self) -> str:
        """'all stages', 'early only', 'middle only' or 'late only'."""
        return self.request.only_stage

    @property
    def labels(self) -> list:
        """One condition per image: a class id, or a prompt for a text-to-image model."""
        return self.request.conditions

    @property
    def negative_prompt(self) -> str:
        """The unconditional branch's prompt of a text-to-image model ("" = the family's null)."""
        return self.request.negative_prompt

    @property
    def repeats(self) -> int:
        """Timed runs (their floor is reported on a CPU, their median on a GPU)."""
        return self.request.repeats


@dataclass
class CompareRun:
    """The result of a comparison job: small values only (the pruned model's summary, not the model)."""

    request: CompareJob
    pruned: dict  # prune_summary of the staged model
    results: list  # compare.MethodResult, dense first


def describe_compare_event(event) -> str:
    """'warm-up · dense' or 'sampling staged · run 1/1 · step 4/10'."""
    if event.repeat == 0:
        return f"warm-up · {event.contender}"
    return f"sampling {event.contender} · run {event.repeat}/{event.repeats} · step {event.step + 1}/{event.num_steps}"


# ----- rendering ----------------------------------------------------------------------------------


def _caption(label, names: Sequence[str]) -> str:
    """A class id's name (or the id), or a prompt cut to PROMPT_CAPTION characters."""
    if isinstance(label, str):
        return label if len(label) <= PROMPT_CAPTION else label[: PROMPT_CAPTION - 1] + "…"
    return names[label] if 0 <= label < len(names) else str(label)


def gallery_items(images: np.ndarray, labels: Sequence, spec) -> list[tuple[np.ndarray, str]]:
    """(image, caption) pairs, the caption a class name or a prompt; small images upscaled (nearest) to about GALLERY_PIXELS."""
    scale = max(1, settings.GALLERY_PIXELS // max(images.shape[1], 1))
    names = getattr(spec, "class_names", ()) or ()
    items = []
    for image, label in zip(images, labels):
        big = image.repeat(scale, axis=0).repeat(scale, axis=1)
        if big.shape[-1] == 1:
            big = np.repeat(big, 3, axis=-1)
        items.append((big, _caption(label, names)))
    return items


def conditions_text(request: CompareRequest) -> str:
    """'classes 0, 1, 2 …' or 'prompts “a cat”, “a dog” · negative “blurry”' for captions (not escaped)."""
    if not request.prompts:
        labels = request.labels
        return "classes " + ", ".join(map(str, labels[:12])) + (" …" if len(labels) > 12 else "")
    distinct = list(dict.fromkeys(request.prompts))
    text = "prompts " + ", ".join(f"“{_caption(p, ())}”" for p in distinct[:3]) + (" …" if len(distinct) > 3 else "")
    negative = request.negative_prompt
    return text + (f" · negative “{_caption(negative, ())}”" if negative else " · no negative prompt")


def _fmt(value, spec: str, none: str = "—") -> str:
    return none if value is None else format(value, spec)


def _statistic_words(results, repeats: int) -> str:
    """How the seconds were taken over the timed runs, in the caption's words."""
    runs = f"{repeats} timed run{'s' if repeats > 1 else ''}"
    if repeats > 1 and results and results[0].statistic == "floor":
        return f"floor of {runs} (Σ of each step's least time)"
    return f"median of {runs}" if repeats > 1 else runs


def timing_flags_of(run: CompareRun) -> dict[str, tuple[str, ...]]:
    """Per row, why its timing is not a result: `bench`'s flags (measured/ideal outside the
    plausible range, timed runs that disagree), from the run's own timed runs."""
    from mosaic_core.conquer.bench import comparison_flags

    return comparison_flags(run.results)


def compare_table_html(run: CompareRun) -> str:
    """Per-stage and total seconds, speed-up measured and ideal, accuracy, FD, PSNR and SSIM."""
    request = run.request
    sample = request.sample_config
    flags = timing_flags_of(run)
    rows = []
    for result in run.results:
        is_dense = result.name == "dense"
        stages = "".join(
            f'<td data-method="{result.name}" data-field="seconds-{name}">{result.stage_seconds.get(name, 0.0):.3f}</td>'
            for name in STAGE_NAMES
        )
        cells = {
            "steps": str(result.num_inference_steps),
            "seconds": f"{result.seconds:.3f}",
            "speedup": f"{result.speedup:.2f}×",
            "ideal": f"{result.ideal_speedup:.2f}×",
            "ratio": f"{result.speedup / result.ideal_speedup:.2f}",
            "accuracy": _fmt(result.accuracy, ".2f"),
            "fd": _fmt(result.fd, ".1f"),
            "psnr": "ref" if is_dense else _fmt(result.psnr, ".1f"),
            "ssim": "ref" if is_dense else _fmt(result.ssim, ".3f"),
        }
        row_flags = flags.get(result.name, ())
        if row_flags:
            cells["ratio"] += " ⚠"
        cell = lambda field: f'<td data-method="{result.name}" data-field="{field}">{cells[field]}</td>'  # noqa: E731
        name = "dense" if is_dense else f"staged · {request.variant}"
        rows.append(
            f'<tr data-method="{result.name}" data-flags="{html.escape(" · ".join(row_flags))}">'
            f'<td><b>{html.escape(name)}</b></td>{cell("steps")}{stages}'
            f'{cell("seconds")}{cell("speedup")}{cell("ideal")}{cell("ratio")}{cell("accuracy")}{cell("fd")}'
            f'{cell("psnr")}{cell("ssim")}</tr>'
        )
    plan = request.plan
    labels = request.labels
    caption = (
        f"{html.escape(plan.model)} · {plan.scheduler} {steps_text(plan)}"
        + (f" (dense reference: {request.dense_plan.num_inference_steps})" if request.dense_plan is not None else "")
        + f" · cfg {sample.guidance_scale:g} · "
        f"{len(labels)} images ({html.escape(conditions_text(request.request))}) · seed {sample.seed} · seconds: {_statistic_words(run.results, request.repeats)} after a warm-up · staged overall sparsity {plan.overall_sparsity:.3f}"
        f" ({request.config.calibration.mode}, {request.config.calibration.size} images, {request.config.scorer})"
    )
    note = ""
    if len(labels) < 50 and any(r.fd is not None for r in run.results):
        note = f'<p class="mosaic-note">A Fréchet distance over {len(labels)} images is rough: compare it between runs of equal size.</p>'
    flagged = [f"{'dense' if name == 'dense' else 'staged'}: {'; '.join(why)}" for name, why in flags.items() if why]
    if flagged:
        note += (
            '<p class="mosaic-note mosaic-flagged" id="mosaic-compare-flags">⚠ These speed-ups are not a result '
            f"({html.escape(' · '.join(flagged))}): something else ran on the machine during the timed runs, "
            "or too few runs were timed to tell. Raise “Timed runs” and compare again on a quiet machine. "
            "The images and their quality are unaffected.</p>"
        )
    head = "".join(f"<th>{name} s</th>" for name in STAGE_NAMES)
    return (
        '<div class="mosaic-panel" id="mosaic-compare-table">'
        f'<table class="mosaic-table"><caption>{caption}</caption>'
        f"<thead><tr><th>method</th><th>steps</th>{head}<th>total s</th><th>speed-up</th><th>ideal</th>"
        "<th>measured / ideal</th><th>accuracy</th><th>FD</th><th>PSNR dB</th><th>SSIM</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>{note}</div>"
    )


def history_entry(job_id: str, number: int, run: CompareRun) -> dict:
    """One point of the history chart (JSON-ready, kept in the session's gr.State)."""
    request = run.request
    dense = next(r for r in run.results if r.name == "dense")
    staged = next(r for r in run.results if r.name == "staged")
    flags = tuple(why for rows in timing_flags_of(run).values() for why in rows)
    calibration = request.config.calibration
    settings_text = (
        f"{request.variant}, S={request.plan.overall_sparsity:.2f}, {request.plan.scheduler} "
        + (f"{len(request.plan.step_stages)}/{request.plan.num_inference_steps}" if request.plan.drop_steps
           else f"{request.plan.num_inference_steps}")
        + (f" vs dense {request.dense_plan.num_inference_steps}" if request.dense_plan is not None else "")
        + ", "
        f"cfg {request.sample_config.guidance_scale:g}, {calibration.mode}/{calibration.size}/{request.config.scorer}, "
        f"{len(request.labels)} img"
    )
    return {
        "job": job_id,
        "run": number,
        "variant": request.variant,
        "label": f"#{number} {request.variant.replace(' stages', '').replace(' only', '')} S={request.plan.overall_sparsity:.2f}"
        + (" ⚠" if flags else ""),
        "flags": list(flags),  # why the staged row's timing is not a result (`timing_flags_of`)
        "settings": settings_text,
        "seconds": staged.seconds,
        "dense_seconds": dense.seconds,
        "speedup": staged.speedup,
        "ideal_speedup": staged.ideal_speedup,
        "macs_fraction": 1.0 / staged.ideal_speedup if staged.ideal_speedup else None,
        "psnr": staged.psnr,
        "ssim": staged.ssim,
        "accuracy": staged.accuracy,
    }


def history_x(entry: dict, axis: str) -> float:
    """A run's x on the history chart: measured speed-up, staged seconds, or MACs as a fraction of dense."""
    if axis == AXES[0]:
        return entry["speedup"]
    if axis == AXES[1]:
        return entry["seconds"]
    return entry.get("macs_fraction") or 1.0 / entry["ideal_speedup"]  # entries of earlier versions lack the field


def history_front(history: list, axis: str) -> list[int]:
    """Indices of the runs on the history's Pareto front on `axis` (no run is both cheaper and closer to dense)."""
    from mosaic_core.conquer.tune import pareto_front

    # the front wants a cost: less is better for seconds and MACs, more for the speed-up
    costs = [-history_x(h, axis) if axis == AXES[0] else history_x(h, axis) for h in history]
    return pareto_front(costs, [h["psnr"] for h in history])


def history_figure(history: Optional[list], axis: str = AXES[0]) -> go.Figure:
    """PSNR to dense against measured speed-up (or staged seconds, or MACs), one point per run; the front joined."""
    history = [h for h in (history or []) if h.get("psnr") is not None]
    if not history:
        return message_figure("Each comparison adds a point here:\nPSNR to dense against speed-up.", settings.HISTORY_HEIGHT)
    axis = axis if axis in AXES else AXES[0]
    x_key = {AXES[0]: "speedup", AXES[1]: "seconds", AXES[2]: "macs_fraction"}[axis]
    history = [dict(h, macs_fraction=history_x(h, AXES[2])) for h in history]
    figure = go.Figure()
    front = sorted((history[i] for i in history_front(history, axis)), key=lambda h: h[x_key])
    on_front = {id(h) for h in front}
    if len(front) > 1:
        figure.add_trace(
            go.Scatter(
                x=[h[x_key] for h in front], y=[h["psnr"] for h in front], mode="lines", name="front (no run cheaper and closer)",
                line=dict(color="#333", width=1, dash="dot"), hoverinfo="skip",
            )
        )
    for variant in settings.STAGE_ONLY_CHOICES:
        points = [h for h in history if h["variant"] == variant]
        if not points:
            continue
        figure.add_trace(
            go.Scatter(
                x=[h[x_key] for h in points],
                y=[h["psnr"] for h in points],
                mode="markers+text",
                name=variant,
                text=[h["label"] + (" ★" if id(h) in on_front else "") for h in points],
                textposition="top center",
                textfont=dict(size=10),
                marker=dict(size=11, color=settings.VARIANT_COLORS[variant], line=dict(color="white", width=1)),
                customdata=[[h["settings"], h["ideal_speedup"], h["seconds"], h["dense_seconds"]] for h in points],
                hovertemplate={
                    "speedup": "%{customdata[0]}<br>PSNR %{y:.1f} dB<br>speed-up %{x:.2f}× (ideal %{customdata[1]:.2f}×)<br>"
                    "staged %{customdata[2]:.2f} s, dense %{customdata[3]:.2f} s<extra></extra>",
                    "seconds": "%{customdata[0]}<br>PSNR %{y:.1f} dB<br>staged %{x:.2f} s (dense %{customdata[3]:.2f} s)<extra></extra>",
                    "macs_fraction": "%{customdata[0]}<br>PSNR %{y:.1f} dB<br>MACs %{x:.3f} of dense<extra></extra>",
                }[x_key],
            )
        )
    ys = [h["psnr"] for h in history]
    xs = [h[x_key] for h in history]
    shapes = []
    if x_key == "macs_fraction":
        x_range = [0, 1.05]
    elif x_key == "speedup":
        shapes.append(dict(type="line", x0=1, x1=1, yref="paper", y0=0, y1=1, line=dict(color="#9aa5b1", dash="dot", width=1)))
        x_range = [min(0.9, min(xs) - 0.1), max(xs) + 0.15]
    else:
        x_range = [0, max(xs + [h["dense_seconds"] for h in history]) * 1.15]
        for h in history:  # the dense time of each run, as a faint tick on the axis
            shapes.append(dict(type="line", x0=h["dense_seconds"], x1=h["dense_seconds"], yref="paper", y0=0, y1=0.04,
                               line=dict(color="#9aa5b1", width=1)))
    figure.update_layout(
        height=settings.HISTORY_HEIGHT,
        margin=dict(l=58, r=16, t=36, b=48),
        font=FONT,
        plot_bgcolor="white",
        paper_bgcolor="white",
        title=dict(text="Quality vs time, one point per run (higher and further right is better)", font=dict(size=12), x=0.01),
        xaxis=dict(title={"speedup": "measured speed-up over dense (×)", "seconds": "staged seconds",
                          "macs_fraction": "MACs (fraction of dense), as on the tuner's chart"}[x_key], range=x_range,
                   gridcolor="#eef1f4", zeroline=False, ticks="outside"),
        yaxis=dict(title="PSNR to dense (dB)", range=[min(ys) - 3, max(ys) + 4], gridcolor="#eef1f4", zeroline=False,
                   ticks="outside"),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1, font=dict(size=11)),
        shapes=shapes,
        showlegend=True,
    )
    return figure


def compare_summary(run: CompareRun) -> dict:
    """What the API returns about a comparison (no images: their shape and labels); each row's
    `flags` say why its timing is not a result (empty: none)."""
    flags = timing_flags_of(run)
    return {
        "variant": run.request.variant,
        "labels": list(run.request.request.labels),  # class ids ([] for a text-to-image model)
        "prompts": list(run.request.request.prompts),  # one per image ([] for a class model)
        "negative_prompt": run.request.negative_prompt,
        "num_images": len(run.request.labels),
        "image_shape": list(run.results[0].images.shape[1:]),
        "rows": [{**result.row(), "flags": list(flags.get(result.name, ()))} for result in run.results],
        "pruned": {k: v for k, v in run.pruned.items() if k in ("key", "source", "stages", "overall_sparsity")},
    }


# ----- handlers -----------------------------------------------------------------------------------


class CompareHandlers:
    """Validates a comparison, submits it as a job (one `JobView`), renders it."""

    def __init__(self, engine: StudioEngine, prune: PruneSection, view: JobView) -> None:
        self.engine = engine
        self.prune = prune.handlers
        self.view = view

    def resolve(self, plan_request: PlanRequest, prune_values: tuple, compare_values: tuple, hidden_ignored: bool = False) -> CompareJob:
        """Check every value (ValueError naming it) and decide which staged model to compare.

        `compare_values`: labels, seed, count, cfg, repeats, only_stage[, prompts, negative_prompt[, dense_steps]].
        With `hidden_ignored` (the page: a class model's prompt boxes are hidden, not empty),
        the prompt boxes of a class model are not read.
        """
        prune_request_ = prune_request(plan_request, *prune_values)
        spec = self.engine.resolve(plan_request.model)
        values = list(compare_values)
        if hidden_ignored and spec.conditioning != "text":
            values = [*values[:6], None, "", *values[8:]]
        request = CompareRequest.from_values(  # every value checked before "no weights" can answer instead
            prune_request_, spec.num_classes, *values, conditioning=spec.conditioning,
            count_range=settings.COMPARE_COUNT_RANGE, repeats_range=settings.REPEATS_RANGE,
        )
        self.engine.require_weights(spec)
        plan, config = prune_request_.build(spec)
        sample_config = request.sample_config(plan)
        dense_plan = request.dense_plan(spec, plan)
        dense_plan = None if dense_plan is plan else dense_plan
        if request.stage >= 0:
            plan = request.staged_plan(spec, plan)
        elif not (
            self.engine.cached_pruned(spec, plan, config) is not None
            or self.engine.pruned_on_disk(spec, plan, config)
            or self.prune.pending_job(self.engine.pruned_key(spec, plan, config))
        ):
            raise ValueError(
                "no pruned model for this plan and these prune settings yet: press “Start pruning” in section 4 "
                "first (or pick one stage only, which prunes inside the comparison)"
            )
        return CompareJob(request, spec, plan, config, sample_config, dense_plan)

    def submit(self, owner: Optional[str], job: CompareJob) -> str:
        """Queue the comparison for `owner` (after any prune job of the same plan, FIFO)."""
        engine = self.engine

        def work(context) -> CompareRun:
            spec, plan, config = job.spec, job.plan, job.config
            have = engine.cached_pruned(spec, plan, config) is not None or engine.pruned_on_disk(spec, plan, config)
            if job.variant == settings.STAGE_ONLY_CHOICES[0] and not have:
                raise ValueError("the pruned model of this plan is not in the cache (was its prune job cancelled?): prune it again")
            share = 0.0 if have else 0.4  # of the bar, for pruning the stage-only variant
            context.report(0.0, "loading the pruned model" if have else f"pruning the {job.variant.replace(' only', '')} stage only")
            pruned = engine.prune(
                spec, plan, config, should_stop=context.should_stop,
                on_event=lambda event: context.report(share * event.fraction, f"prune {job.variant} · {describe_prune_event(event)}"),
            )
            results = engine.compare(
                pruned, job.labels, job.sample_config, job.repeats, should_stop=context.should_stop,
                on_event=lambda event: context.report(share + (1 - share) * event.fraction, describe_compare_event(event)),
                negative_prompt=job.negative_prompt, dense_plan=job.dense_plan,
            )
            context.report(1.0, "measured")
            return CompareRun(job, prune_summary(pruned), results)

        return engine.jobs.submit(work, label="compare", owner=owner)

    # ----- UI events ----------------------------------------------------------------------------
    def start(self, owner, *values):
        """Compare: the Divide controls (14), the Prune controls (4) and the Compare controls (9) → a queued job."""
        n = PLAN_CONTROL_COUNT
        plan = PlanRequest.from_controls(*values[:n])
        return self.submit(owner, self.resolve(plan, values[n : n + 4], values[n + 4 :], hidden_ignored=True))  # 4 prune controls

    def select_model(self, model, folder):
        """A model was picked: the label box for a class model, the prompt boxes for a text model; its CFG."""
        try:
            spec = self.engine.resolve(model, folder)
        except ValueError:  # the Divide section reports it; leave these controls as they are
            return gr.update(), gr.update(), gr.update(), gr.update()
        text = spec.conditioning == "text"
        return gr.update(visible=not text), gr.update(visible=text), gr.update(visible=text), gr.update(value=spec.default_cfg)

    def render(self, status: JobStatus, history, axis):
        """Galleries, table, history (with this run added once) and the history chart."""
        run: CompareRun = status.result
        dense, staged = run.results[0], run.results[1]
        history = list(history or [])
        if not any(h.get("job") == status.job_id for h in history):
            history.append(history_entry(status.job_id, len(history) + 1, run))
        spec = run.request.spec
        return (
            gr.update(value=gallery_items(dense.images, run.request.labels, spec), label=f"dense · {dense.seconds:.2f} s"),
            gr.update(
                value=gallery_items(staged.images, run.request.labels, spec),
                label=f"staged ({run.request.variant}) · {staged.seconds:.2f} s · {staged.speedup:.2f}× · PSNR {_fmt(staged.psnr, '.1f')} dB",
            ),
            compare_table_html(run),
            history,
            history_figure(history, axis),
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
        labels: str = settings.COMPARE_LABELS_DEFAULT,
        seed: int = settings.COMPARE_SEED_DEFAULT,
        count: int = settings.COMPARE_COUNT_DEFAULT,
        cfg: float = settings.CFG_DEFAULT,
        repeats: int = settings.REPEATS_DEFAULT,
        only_stage: str = settings.STAGE_ONLY_CHOICES[0],
        prompts: Optional[Union[str, list[str]]] = None,
        negative_prompt: str = "",
        request: gr.Request = None,
        allocation: Optional[str] = None,
        dense_steps: Optional[int] = None,
        drop_steps: int = 0,
    ) -> dict:
        """Compare dense vs the pruned model of this plan and prune config; returns the job's status.

        `labels` is '0-9' or '1,3,5' (repeated to `count` images); `only_stage` is one of
        'all stages', 'early only', 'middle only', 'late only'. A text-to-image model takes
        `prompts` instead of labels (text, one prompt per line, or a list; repeated to `count`)
        and an optional `negative_prompt`. `dense_steps` samples the dense reference at that
        many steps (None or 0: `steps`), e.g. the tuner's reference when it chose fewer steps;
        speed-ups, MACs and PSNR are then against it. `drop_steps` k (DDIM only) compares the model
        pruned for N − k of the `steps` reference steps, sampled on those (the plan's), against dense
        at every reference step. Poll `compare_status`.
        """
        return self.start_edges_api(
            model, sampler, steps, M, lam, sparsity, stage_sparsity, cx, calibration, calibration_size, scorer,
            labels, seed, count, cfg, repeats, only_stage, None, prompts, negative_prompt, request, allocation, dense_steps,
            drop_steps,
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
        labels: str = settings.COMPARE_LABELS_DEFAULT,
        seed: int = settings.COMPARE_SEED_DEFAULT,
        count: int = settings.COMPARE_COUNT_DEFAULT,
        cfg: float = settings.CFG_DEFAULT,
        repeats: int = settings.REPEATS_DEFAULT,
        only_stage: str = settings.STAGE_ONLY_CHOICES[0],
        edges: Optional[list[int]] = None,
        prompts: Optional[Union[str, list[str]]] = None,
        negative_prompt: str = "",
        request: gr.Request = None,
        allocation: Optional[str] = None,
        dense_steps: Optional[int] = None,
        drop_steps: int = 0,
    ) -> dict:
        """`compare_start` with the stage edges set by hand: `edges` [LO, HI], the middle stage in
        training timesteps (None: from M). Poll `compare_status`.
        """
        plan = PlanRequest.from_values(model, sampler, steps, M, lam, sparsity, stage_sparsity, cx, edges=edges, drop_steps=drop_steps)
        job = self.resolve(
            plan, (calibration, calibration_size, scorer, allocation),
            (labels, seed, count, cfg, repeats, only_stage, prompts, negative_prompt, dense_steps),
        )
        owner = owner_of(request)
        return status_dict(self.engine.jobs.status(self.submit(owner, job), owner), compare_summary)


def reference_steps(token: str):
    """Compare's dense reference steps from the tuner's "<job> <steps>" (unchanged when empty)."""
    parts = (token or "").split()
    return gr.update(value=int(parts[-1])) if parts and parts[-1].isdigit() else gr.update()


def build_compare_section(engine: StudioEngine, divide, prune: PruneSection) -> None:
    """Lay out and wire the Compare section (it reads the Divide controls and the Prune controls)."""
    view = JobView(engine, "compare", IDLE_COMPARE, done_title="Comparison", nothing_running="No comparison is running.")
    handlers = CompareHandlers(engine, prune, view)
    gr.Markdown(COMPARE_TEXT)
    with gr.Row():
        with gr.Column(scale=2, min_width=340):
            labels = gr.Textbox(
                settings.COMPARE_LABELS_DEFAULT, label="Class labels", info="ids or ranges, e.g. 0-9 or 1,3,5 (repeated to the count)",
                elem_id="mosaic-compare-labels", max_length=limits.MAX_TEXT_LENGTH,
            )
            prompts = gr.Textbox(  # text-to-image models (shown instead of the labels)
                settings.COMPARE_PROMPTS_DEFAULT, label="Prompts", lines=settings.COMPARE_PROMPT_LINES, visible=False,
                info="one prompt per line, repeated to the count (one line: the same prompt for every image)",
                elem_id="mosaic-compare-prompts", max_length=limits.MAX_PROMPTS * (limits.MAX_PROMPT_LENGTH + 1),
            )
            negative_prompt = gr.Textbox(
                "", label="Negative prompt", visible=False, placeholder="empty: the model's own unconditional branch",
                info="guidance steers away from it (both models get the same)", elem_id="mosaic-compare-negative",
                max_length=limits.MAX_PROMPT_LENGTH,
            )
            with gr.Row():
                count = gr.Number(
                    settings.COMPARE_COUNT_DEFAULT, label="Images", precision=0, minimum=settings.COMPARE_COUNT_RANGE[0],
                    maximum=settings.COMPARE_COUNT_RANGE[1], elem_id="mosaic-compare-count",
                )
                seed = gr.Number(settings.COMPARE_SEED_DEFAULT, label="Seed", precision=0, minimum=0, elem_id="mosaic-compare-seed")
            cfg = gr.Slider(*settings.CFG_RANGE, value=settings.CFG_DEFAULT, step=settings.CFG_STEP, label="CFG (guidance scale)", elem_id="mosaic-compare-cfg")
            repeats = gr.Slider(
                *settings.REPEATS_RANGE, value=settings.REPEATS_DEFAULT, step=1, label="Timed runs (CPU: floor, GPU: median)",
                elem_id="mosaic-compare-repeats",
            )
            only_stage = gr.Radio(
                list(settings.STAGE_ONLY_CHOICES), value=settings.STAGE_ONLY_CHOICES[0], label="Prune one stage only",
                info="the other stages stay dense: which stage hurts?", elem_id="mosaic-compare-stage",
            )
            dense_steps = gr.Number(
                0, label="Dense reference steps", precision=0, minimum=0, maximum=limits.MAX_STEPS,
                info="0: the plan's steps · the tuner sets the steps it scored against", elem_id="mosaic-compare-dense-steps",
            )
            view.layout("Compare")
        with gr.Column(scale=3, min_width=420):
            history_plot = gr.Plot(history_figure([]), label="Run history", elem_id="mosaic-history-plot")
            axis = gr.Radio(list(AXES), value=AXES[0], label="History x-axis", elem_id="mosaic-history-axis")
    with gr.Row(equal_height=True):
        gallery_options = dict(columns=settings.GALLERY_COLUMNS, height="auto", object_fit="contain", format="png", allow_preview=True)
        dense_gallery = gr.Gallery(label="dense", elem_id="mosaic-gallery-dense", **gallery_options)
        staged_gallery = gr.Gallery(label="staged", elem_id="mosaic-gallery-staged", **gallery_options)
    table = gr.HTML(
        '<div class="mosaic-panel mosaic-empty" id="mosaic-compare-table">Seconds per stage, speed-ups and quality will show here.</div>',
        elem_id="mosaic-compare-table-box",
    )
    history = gr.State([])
    view.wire(
        handlers.start,
        [*divide.controls, *prune.controls, labels, seed, count, cfg, repeats, only_stage, prompts, negative_prompt, dense_steps],
        handlers.render, render_inputs=[history, axis],
        render_outputs=[dense_gallery, staged_gallery, table, history, history_plot],
    )
    # the tuner's chosen point was scored against dense at its reference steps: compare against the same
    prune.tune_reference.change(
        reference_steps, inputs=[prune.tune_reference], outputs=[dense_steps], show_progress="hidden", api_visibility="private",
    )
    axis.change(history_figure, inputs=[history, axis], outputs=[history_plot], show_progress="hidden", api_visibility="private")
    model_boxes = dict(inputs=[divide.model, divide.folder], outputs=[labels, prompts, negative_prompt, cfg], api_visibility="private")
    gr.on([divide.model.input, divide.folder.submit], handlers.select_model, show_progress="hidden", **model_boxes)
    divide.demo.load(handlers.select_model, **model_boxes)
    view.register_api(user_errors(handlers.start_api), compare_summary)
    gr.api(user_errors(handlers.start_edges_api), api_name="compare_start_edges")


COMPARE_CSS = """
#mosaic-gallery-dense img, #mosaic-gallery-staged img { image-rendering: pixelated; }
#mosaic-gallery-dense .grid-wrap.fixed-height, #mosaic-gallery-staged .grid-wrap.fixed-height {
  min-height: 0 !important; height: auto !important; max-height: none !important;
}
"""
