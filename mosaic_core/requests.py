"""What a caller asks for, as one frozen value per action, built and validated in one place.

The studio's three sections, its gradio_client API and the CLI all turn raw values (slider
numbers, JSON from a client, argparse strings already converted) into one of these:

    PlanRequest     model, sampler, steps, M | edges, λ, c_x, sparsity | stage sparsity   -> Plan
    PruneRequest    PlanRequest + calibration mode, calibration size, scorer   -> (Plan, PruneConfig)
    CompareRequest  PruneRequest + labels | prompts (+ negative prompt), seed, count, cfg, repeats, one stage only

`from_values` checks every value's *type and range* before anything is built, and raises
ValueError naming the parameter, what was given (shortened) and what is allowed: a string
where a number belongs, NaN, ±inf, 1e400, a 100 000-character model name and a 20 KB label
list all stop here (`mosaic_core.limits` bounds every size). The ranges are the engine's
own checks (`check_M`, `check_lam`, `check_sparsity`, …), so a request that validates is
one the engine accepts; a caller with narrower limits (the studio's sliders) passes them in.

Resolving the model name is *not* done here: `PlanRequest.plan()` uses the registry, and a
server that restricts local folders resolves the name itself and calls `build(spec)`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional, Sequence

from mosaic_core import limits
from mosaic_core.divide.allocation import MAX_SPARSITY, check_sparsity
from mosaic_core.divide.noise_schedule import check_cx, check_lam
from mosaic_core.divide.plan import DEFAULT_LAM, Plan, build_plan, stage_only_plan
from mosaic_core.divide.stages import DEFAULT_M, STAGE_NAMES, check_edges, check_M
from mosaic_core.models.registry import DEFAULT_MODEL, ModelSpec, resolve_model
from mosaic_core.models.samplers import DEFAULT_SCHEDULER, SCHEDULERS, check_scheduler_name, model_default_sampler

ONLY_STAGE_CHOICES = ("all stages", "early only", "middle only", "late only")  # index - 1 = stage (-1: all)
MAX_GUIDANCE = 20.0  # classifier-free guidance scale (conquer.sampling.SampleConfig's bound)


def shorten(value: Any, length: int = 60) -> str:
    """repr(value), cut to `length` characters: an error message never echoes a huge input."""
    text = repr(value)
    return text if len(text) <= length else f"{text[: length - 12]}… ({len(text)} chars)"


def real_number(name: str, value: Any, allowed: str) -> float:
    """`value` as a float when it is an int or float (not a bool, not a string), else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number {allowed}, got {type(value).__name__} {shorten(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range (JSON allows 1e400 as an integer literal)
        raise ValueError(f"{name} must be a finite number {allowed}, got an integer of {len(str(value))} digits") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number {allowed}, got {number}")
    return number


def choice(name: str, value: Any, choices: Sequence[str], what: str = "") -> str:
    """`value` when it is one of `choices` (strings), else ValueError listing them."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {type(value).__name__} {shorten(value)}")
    if value not in choices:
        raise ValueError(f"unknown {what or name} {shorten(value.strip())}: choose one of {', '.join(map(repr, choices))}")
    return value


def model_name(value: Any, folder: Any = "") -> str:
    """The model to resolve: `folder` when filled (it overrides the picker), else `value`, both bounded."""
    text = limits.check_text("model", value, limits.MAX_NAME_LENGTH).strip()
    path = limits.check_text("folder", "" if folder is None else folder, limits.MAX_NAME_LENGTH).strip()
    name = path or text
    if not name:
        raise ValueError("model must be a registry name (like 'digits-dit') or a local diffusers folder, got an empty string")
    return name


@dataclass(frozen=True)
class PlanRequest:
    """The Divide settings of one plan: which model, sampled how, divided and allocated how."""

    model: str = DEFAULT_MODEL
    sampler: Optional[str] = DEFAULT_SCHEDULER  # None: the model's own (`model_default_sampler`)
    steps: Optional[int] = None  # None: the model's default step count
    M: float = DEFAULT_M
    lam: float = DEFAULT_LAM
    cx: float = 1.0
    sparsity: Optional[float] = None  # overall target (auto allocation); None = 0
    stage_sparsity: Optional[tuple[float, float, float]] = None  # manual (early, middle, late)
    uniform: bool = False
    edges: Optional[tuple[int, int]] = None  # the middle stage (τ_lo, τ_hi) set by hand; None = from M
    drop_steps: int = 0  # reference steps dropped evenly (DDIM only, docs/method.md §4.6); checked against steps in `build`

    @classmethod
    def from_values(
        cls,
        model: Any = DEFAULT_MODEL,
        sampler: Any = DEFAULT_SCHEDULER,
        steps: Any = None,
        M: Any = DEFAULT_M,
        lam: Any = DEFAULT_LAM,
        sparsity: Any = None,
        stage_sparsity: Any = None,
        cx: Any = 1.0,
        uniform: Any = False,
        folder: Any = "",
        edges: Any = None,
        drop_steps: Any = 0,
    ) -> "PlanRequest":
        """A checked request from raw values (the API's argument order); ValueError naming the bad one.

        `stage_sparsity` (3 numbers) wins over `sparsity`, as in the studio's "Set per stage".
        `edges` [LO, HI] (whole training timesteps) sets the middle stage by hand instead of M;
        their range 0 <= LO <= HI < T is checked when the model (so T) is known, in `build_plan`.
        `drop_steps` (None or 0: every step) keeps all but that many of the `steps` reference steps,
        spread evenly; that it leaves a step and that the sampler is DDIM are checked in `build_plan`.
        """
        name = model_name(model, folder)
        if sampler is not None and not isinstance(sampler, str):
            raise ValueError(f"sampler must be one of {', '.join(SCHEDULERS)}, got {type(sampler).__name__} {shorten(sampler)}")
        if sampler is not None:  # None: the model's own sampler, chosen in `build`
            sampler = check_scheduler_name(limits.check_text("sampler", sampler, 64))
        if steps is not None:
            steps = limits.check_int("steps", steps, 1, limits.MAX_STEPS)
        M = check_M(real_number("M", M, "in (0, 1)"))
        lam = check_lam(real_number("lam (λ)", lam, "(any real, 0.01 recommended)"))
        cx = check_cx(real_number("cx (c_x)", cx, "in (0, inf), 1.0 as fallback"))
        if not isinstance(uniform, bool):
            raise ValueError(f"uniform must be true or false, got {shorten(uniform)}")
        if stage_sparsity is not None:
            if isinstance(stage_sparsity, (str, bytes)) or not isinstance(stage_sparsity, Sequence) or len(stage_sparsity) != 3:
                raise ValueError(
                    f"stage_sparsity must be 3 numbers [early, middle, late], each in [0, {MAX_SPARSITY}], "
                    f"got {shorten(stage_sparsity)}"
                )
            stage_sparsity = tuple(
                check_sparsity(real_number(f"{stage} sparsity", value, f"in [0, {MAX_SPARSITY}]"), f"{stage} sparsity")
                for stage, value in zip(STAGE_NAMES, stage_sparsity)
            )
            sparsity = None
            if uniform:
                raise ValueError("uniform means one sparsity for every step: give sparsity, not stage_sparsity")
        elif sparsity is not None:
            sparsity = check_sparsity(real_number("sparsity", sparsity, f"in [0, {MAX_SPARSITY}]"))
        if edges is not None:
            edges = check_edges(edges, None)
        drop = 0 if drop_steps is None else limits.check_int("drop_steps (reference steps dropped)", drop_steps, 0, limits.MAX_STEPS - 1)
        return cls(name, sampler, steps, M, lam, cx, sparsity, stage_sparsity, uniform, edges, drop)

    @classmethod
    def from_controls(
        cls, model, folder, sampler, steps, M, lam, cx, sparsity, per_stage, early, middle, late, edges=None, drop_steps=0
    ) -> "PlanRequest":
        """From the studio's Divide controls: the folder box overrides the picker; "Set per stage" picks the 3 sliders.

        `edges` is the studio's hand-set edges: None, "" or [] for edges from M, else [LO, HI].
        `drop_steps` is the "Dropped steps" box.
        """
        if not isinstance(per_stage, bool):
            raise ValueError(f"per_stage must be true or false, got {shorten(per_stage)}")
        if edges in ("", []):
            edges = None
        if per_stage:
            return cls.from_values(
                model, sampler, steps, M, lam, None, [early, middle, late], cx, folder=folder, edges=edges, drop_steps=drop_steps
            )
        return cls.from_values(model, sampler, steps, M, lam, sparsity, None, cx, folder=folder, edges=edges, drop_steps=drop_steps)

    def build(self, spec: ModelSpec) -> Plan:
        """The `Plan` of this request for an already resolved model."""
        return build_plan(
            spec,
            num_inference_steps=spec.default_steps if self.steps is None else self.steps,
            M=self.M,
            lam=self.lam,
            sparsity=self.sparsity,
            stage_sparsity=self.stage_sparsity,
            uniform=self.uniform,
            scheduler=model_default_sampler(spec) if self.sampler is None else self.sampler,
            cx=self.cx,
            edges=self.edges,
            drop_steps=self.drop_steps,
        )

    def plan(self) -> Plan:
        """The `Plan` of this request, the model resolved through the registry (or a local folder)."""
        return self.build(resolve_model(self.model))

    def to_dict(self) -> dict:
        """The request as JSON-ready values."""
        data = asdict(self)
        data["stage_sparsity"] = None if self.stage_sparsity is None else list(self.stage_sparsity)
        data["edges"] = None if self.edges is None else list(self.edges)
        if not self.drop_steps:  # requests of every step keep their old dict
            del data["drop_steps"]
        return data


@dataclass(frozen=True)
class PruneRequest:
    """A plan and how to prune it: calibration noise levels, images per stage, scorer."""

    plan: PlanRequest
    calibration: str = "snr"
    calibration_size: int = 256
    scorer: str = "obs"
    allocation: str = "measured"  # measured | paper (= per-stage) | per-block (stage_pruning.ALLOCATIONS)

    @classmethod
    def from_values(
        cls,
        plan: PlanRequest,
        calibration: Any = "snr",
        calibration_size: Any = 256,
        scorer: Any = "obs",
        size_range: tuple[int, int] = (1, limits.MAX_CALIBRATION_SIZE),
        allocation: Any = None,
    ) -> "PruneRequest":
        """A checked request; `size_range` narrows the engine's 1..8192 images (the studio keeps jobs short).

        `allocation` None: measured with the obs scorer, paper (per-stage) with magnitude (as `prune`).
        """
        from mosaic_core.prune.calibration import CALIBRATION_MODES
        from mosaic_core.prune.stage_pruning import ALLOCATION_ALIASES, ALLOCATIONS, SCORERS

        calibration = choice("calibration", calibration, tuple(CALIBRATION_MODES), "calibration mode")
        size = limits.check_int("calibration_size (images per stage)", calibration_size, *size_range)
        scorer = choice("scorer", scorer, tuple(SCORERS))
        if allocation is None:
            allocation = "measured" if scorer == "obs" else "per-stage"
        allocation = choice("allocation", allocation, (*ALLOCATIONS, *ALLOCATION_ALIASES))
        allocation = ALLOCATION_ALIASES.get(allocation, allocation)
        if allocation != "per-stage" and scorer != "obs":
            raise ValueError(f"the {allocation} allocation needs the obs scorer, got scorer {scorer!r}: choose obs or the paper allocation")
        return cls(plan, calibration, size, scorer, allocation)

    def config(self, spec: ModelSpec):
        """The `PruneConfig`: calibration from the model's default image source; OBS prunes refit (as `prune`);
        kept widths rounded for the device the model loads on (`default_unit_multiple`: a GPU's tiles)."""
        from mosaic_core.models.loading import default_device
        from mosaic_core.prune.calibration import CalibrationConfig, default_calibration_source
        from mosaic_core.prune.stage_pruning import PruneConfig, default_unit_multiple

        calibration = CalibrationConfig(mode=self.calibration, size=self.calibration_size, source=default_calibration_source(spec))
        unit_multiple = default_unit_multiple(default_device(), self.allocation, getattr(spec.shape, "mlp_hidden", None))
        return PruneConfig(
            calibration=calibration, scorer=self.scorer, allocation=self.allocation, refit=self.scorer == "obs",
            unit_multiple=unit_multiple,
        )

    def build(self, spec: ModelSpec) -> tuple[Plan, Any]:
        """(plan, prune config) for an already resolved model."""
        return self.plan.build(spec), self.config(spec)


@dataclass(frozen=True)
class CompareRequest:
    """A pruned model to compare with dense: which images (labels or prompts, seed, count), how (cfg), how often.

    A class-conditional model samples `labels` (one class id per image); a text-to-image model
    samples `prompts` (one per image) with `negative_prompt` as CFG's unconditional branch
    ("" = the family's own null, e.g. zero embeddings), and `labels` is empty.
    """

    prune: PruneRequest
    labels: tuple[int, ...]  # one class id per image (the parsed list repeated to `count`); () for text models
    seed: int = 0
    cfg: float = 1.5
    repeats: int = 1
    only_stage: str = ONLY_STAGE_CHOICES[0]
    prompts: tuple[str, ...] = ()  # one prompt per image (the list repeated to `count`); () for class models
    negative_prompt: str = ""
    dense_steps: Optional[int] = None  # the dense reference's sampler steps; None: the plan's own

    @classmethod
    def from_values(
        cls,
        prune: PruneRequest,
        num_classes: int,
        labels: Any = "0-9",
        seed: Any = 0,
        count: Any = 10,
        cfg: Any = 1.5,
        repeats: Any = 1,
        only_stage: Any = ONLY_STAGE_CHOICES[0],
        prompts: Any = None,
        negative_prompt: Any = "",
        dense_steps: Any = None,
        *,
        conditioning: str = "class",
        count_range: tuple[int, int] = (1, limits.MAX_IMAGES),
        repeats_range: tuple[int, int] = (1, limits.MAX_REPEATS),
    ) -> "CompareRequest":
        """A checked request; `labels` ('0-9', '1,3,5') or `prompts` (one per line, or a list) are parsed bounded.

        `dense_steps` (None or 0: the plan's steps) samples the dense reference at another step
        count, e.g. the tuner's reference when the tuner chose fewer steps for the staged model.

        `conditioning` is the model's (`ModelSpec.conditioning`): "class" reads `labels` and
        refuses prompts; "text" reads `prompts` and `negative_prompt` and ignores `labels`.
        """
        count = limits.check_int("count (images)", count, *count_range)
        negative = limits.check_text("negative_prompt", "" if negative_prompt is None else negative_prompt, limits.MAX_PROMPT_LENGTH).strip()
        if conditioning == "text":
            if prompts is None or (isinstance(prompts, str) and not prompts.strip()):
                raise ValueError("this model is text-to-image: give prompts (one per line, repeated to the image count)")
            texts = limits.parse_prompt_list(prompts)
            ids: list[int] = []
        else:
            if prompts is not None and not (isinstance(prompts, str) and not prompts.strip()):
                raise ValueError("prompts are for text-to-image models; this model is class-conditional: give class labels instead")
            if negative:
                raise ValueError("negative_prompt is for text-to-image models; this model is class-conditional: leave it empty")
            texts = []
            ids = limits.parse_label_list(labels, num_classes, max_ids=limits.MAX_IMAGES)
        seed = limits.check_int("seed", seed, 0, limits.MAX_SEED)
        cfg = limits.check_float("cfg (guidance scale)", real_number("cfg (guidance scale)", cfg, f"in [0, {MAX_GUIDANCE:g}]"), 0.0, MAX_GUIDANCE)
        repeats = limits.check_int("repeats", repeats, *repeats_range)
        only_stage = choice("only_stage", only_stage, ONLY_STAGE_CHOICES, "only_stage choice")
        if dense_steps is not None and not isinstance(dense_steps, bool) and dense_steps == 0:
            dense_steps = None  # 0: the plan's own steps (the studio's box)
        if dense_steps is not None:
            dense_steps = limits.check_int("dense_steps (0: the plan's steps)", dense_steps, 1, limits.MAX_STEPS)
        return cls(
            prune,
            tuple(ids[i % len(ids)] for i in range(count)) if ids else (),
            seed, cfg, repeats, only_stage,
            tuple(texts[i % len(texts)] for i in range(count)) if texts else (),
            negative, dense_steps,
        )

    @property
    def count(self) -> int:
        """Images per contender."""
        return len(self.prompts) or len(self.labels)

    @property
    def conditions(self) -> list:
        """What each image is conditioned on: its prompt (text models) or its class id."""
        return list(self.prompts) if self.prompts else list(self.labels)

    @property
    def stage(self) -> int:
        """-1 for the whole plan, else the one stage pruned (0 early, 1 middle, 2 late)."""
        return ONLY_STAGE_CHOICES.index(self.only_stage) - 1

    def staged_plan(self, spec: ModelSpec, plan: Plan) -> Plan:
        """The plan of the staged contender: `plan`, or the plan pruning only the chosen stage."""
        return plan if self.stage < 0 else stage_only_plan(spec, plan, self.stage)

    def dense_plan(self, spec: ModelSpec, plan: Plan) -> Plan:
        """The plan the dense reference samples: `plan`, or the same request at `dense_steps`
        (its step stages split the dense time per stage; its dense MACs set the ideal speed-up).
        A plan with dropped steps is always measured against dense at every reference step."""
        if not plan.drop_steps and (self.dense_steps is None or self.dense_steps == plan.num_inference_steps):
            return plan
        steps = plan.num_inference_steps if self.dense_steps is None else self.dense_steps
        try:
            return replace(self.prune.plan, steps=steps, drop_steps=0).build(spec)
        except ValueError as error:
            raise ValueError(f"dense_steps: {error}") from None

    def sample_config(self, plan: Plan):
        """The `SampleConfig` both contenders sample with."""
        from mosaic_core.conquer.sampling import SampleConfig

        return SampleConfig(plan.num_inference_steps, self.cfg, plan.scheduler, self.seed)
