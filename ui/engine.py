"""The studio's handle on the engine: mosaic_core services plus the caches an interactive UI needs.

`app.py` builds one `StudioEngine` and hands it to the UI builders (hysts' Spaces style);
the builders never call mosaic_core's heavy functions directly. Nothing here imports
gradio, torch or diffusers: every decision (which folder holds the weights, how a model is
pruned and cached, what a trajectory is, which plan prunes one stage only, who competes in
a comparison, where calibration images come from) is the engine's, and this module only
holds the studio's state — the loaded model, the caches, the one background job runner.

Prune and Compare go through `prune` and `compare`, which the UI runs as background jobs on
`jobs` (one worker thread: one heavy job at a time, FIFO). Pruned models are cached by
`mosaic_core.prune.service.PruneService`: in memory, on disk under `cache_root/pruned/`, and
the Hessians/removal orders under `cache_root/analyses/`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from mosaic_core.conquer.compare import compare_steps, dense_and_staged, timing_statistic
from mosaic_core.conquer.conditions import conditions_for
from mosaic_core.conquer.trajectory import Trajectory, trajectory_steps
from mosaic_core.divide.noise_schedule import ScoreCurve
from mosaic_core.divide.plan import Plan, schedule_curve, stage_only_plan
from mosaic_core.jobs import run_to_end
from mosaic_core.models.dynamics import Dynamics, read_dynamics
from mosaic_core.models.loading import load_model, missing_weights_hint, weights_folder
from mosaic_core.models.parameters import ParameterSplit, parameter_split
from mosaic_core.models.registry import ModelSpec, known_models, local_model_folders, resolve_model
from mosaic_core.prune.service import PrunedModel, PruneService
from mosaic_core.requests import PlanRequest, model_name, shorten

from ui import settings
from ui.jobs import JobRunner
from ui.job_view import public_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelStatus:
    """Whether a model's weights are on disk, and one line of markdown saying so."""

    weights_present: bool
    message: str


class StudioEngine:
    """Cached access to plans, score curves, model status, dynamics, trajectories and pruning."""

    def __init__(
        self,
        model_overrides: Optional[Mapping[str, ModelSpec]] = None,
        cache_root: Optional[str | Path] = None,
        local_model_roots: Optional[Sequence[str | Path]] = None,
    ) -> None:
        # `model_overrides` maps a registry name to another spec (tests, or a dev copy of
        # the weights); production code leaves it empty and uses the registry.
        # `local_model_roots`: folders a typed path may be under (default: settings.local_model_roots()).
        self._overrides = dict(model_overrides or {})
        self.cache_root = Path(cache_root) if cache_root is not None else settings.cache_dir()
        self.jobs = JobRunner(  # the studio's one worker thread for heavy work, bounded and private per session
            max_finished=settings.JOB_RESULTS_PER_SESSION, max_queue=settings.JOB_QUEUE_MAX,
            max_per_owner=settings.JOBS_PER_SESSION, max_owners=settings.JOB_SESSIONS_KEPT,
        )
        self.pruning = PruneService(self.cache_root, memory_size=settings.PRUNED_IN_MEMORY)
        self._cache_lock = threading.Lock()  # guards the trajectory cache (held briefly)
        self._compute_lock = threading.Lock()  # one model load / sampling run at a time
        self._sensitivities: dict[str, Any] = {}  # checkpoint key -> SensitivityCurve (or None)
        self._tune_memo: dict = {}  # the tuner's budget-independent dense images and points (one model's worth)
        self._loaded_key: Optional[tuple] = None
        self._loaded: Any = None
        self._trajectories: OrderedDict[tuple, Trajectory] = OrderedDict()
        roots = settings.local_model_roots() if local_model_roots is None else local_model_roots
        self.local_model_roots = tuple(Path(root) for root in roots)
        self._real_roots = tuple(Path(os.path.realpath(root.expanduser())) for root in self.local_model_roots)

    # ----- models -------------------------------------------------------------------------
    @staticmethod
    def model_choices() -> list:
        """The model picker: the registry's names, then (folder name, path) of each model in the models directories."""
        return known_models() + [(f"{folder.name} (local)", str(folder)) for folder in local_model_folders()]

    def resolve(self, model: str, folder: str = "") -> ModelSpec:
        """The spec of a registry name, a folder of the models directory, or a local folder under an allowed root.

        The models directory's folders (`model_choices`) were put there by the server's owner,
        so they resolve even where typed paths are off; anything else is a ValueError.

        Every refusal of a path says the same thing whether or not the path exists, is a
        folder, is readable or holds a config: nothing about the server's disk leaks out.
        """
        name = model_name(model, folder)
        if name in self._overrides:
            return self._overrides[name]
        if name in known_models():
            return resolve_model(name)
        if name in {str(folder) for folder in local_model_folders()}:  # put in the models directory by the server's owner
            return resolve_model(name)
        # A path is not echoed back: "/root" and "/root/.ssh" get the very same answer.
        shown = "" if any(mark in name for mark in ("/", "\\", "~")) or name.startswith(".") else f" {shorten(name)}"
        refusal = f"unknown model{shown}: choose one of {', '.join(known_models())}" + (
            ", or give a local diffusers folder (with scheduler/scheduler_config.json) under the server's allowed "
            f"model roots (${settings.LOCAL_MODEL_ROOTS_ENV})"
            if self.local_model_roots
            else f"; local model folders are off on this server (${settings.LOCAL_MODEL_ROOTS_ENV} allows them)"
        )
        if not self.local_model_roots:
            raise ValueError(refusal)
        try:
            path = Path(os.path.realpath(Path(name).expanduser()))
            if not any(path == root or root in path.parents for root in self._real_roots):
                raise ValueError(refusal)
            return resolve_model(str(path))
        except (ValueError, OSError, RuntimeError):  # missing, not a folder, unreadable, no/garbled config
            raise ValueError(refusal) from None

    @staticmethod
    def weights_folder(spec: ModelSpec) -> Optional[Path]:
        """The folder holding the transformer weights (the engine's one rule), or None."""
        return weights_folder(spec)

    def status(self, spec: ModelSpec) -> ModelStatus:
        """Weights present or not, with what to do about it; planning works either way."""
        folder = weights_folder(spec)
        if folder is not None:
            return ModelStatus(True, f"**{spec.name}**: weights present in `{public_text(str(folder), self.cache_root)}`. {spec.description}")
        hint = public_text(missing_weights_hint(spec), self.cache_root)
        return ModelStatus(False, f"**{spec.name}**: {hint}. The schedule, stages and costs below need no weights.")

    def require_weights(self, spec: ModelSpec) -> None:
        """ValueError saying where to put the weights when they are not on disk (pruning, sampling)."""
        if weights_folder(spec) is None:
            raise ValueError(f"{spec.name}: {missing_weights_hint(spec).replace('`', '')}")

    def warm_up(self, model: str = settings.MODEL_DEFAULT) -> None:
        """Import diffusers and fill the caches for one model, so the first page load is quick."""
        spec = self.resolve(model)
        PlanRequest.from_values(model, settings.SAMPLER_DEFAULT, settings.STEPS_DEFAULT, settings.M_DEFAULT, settings.LAM_DEFAULT).build(spec)
        self.curve(spec, settings.LAM_DEFAULT, settings.CX_DEFAULT)
        self.parameter_split(spec)

    # ----- divide -------------------------------------------------------------------------
    def curve(self, spec: ModelSpec, lam: float, cx: float, image_seq_len: Optional[int] = None) -> ScoreCurve:
        """The importance score of a model's schedule (cached per schedule, λ, c_x, image tokens).

        `image_seq_len` matters only for a dynamically shifted flow schedule (the spec's by default)."""
        tokens = getattr(spec, "image_seq_len", None) if image_seq_len is None else image_seq_len
        return _cached_curve(json.dumps(dict(spec.scheduler_config), sort_keys=True, default=str), float(lam), float(cx), tokens)

    # ----- teaching panel -----------------------------------------------------------------
    def dynamics(self, spec: ModelSpec) -> Optional[Dynamics]:
        """The training dynamics recorded next to the weights, or None when there are none."""
        return read_dynamics(spec.path)

    def measured_cx(self, spec: ModelSpec) -> Optional[float]:
        """c_x = E‖x₀‖²/d measured on the training images (from dynamics.json), if known."""
        dynamics = self.dynamics(spec)
        return None if dynamics is None else dynamics.cx

    @staticmethod
    def parameter_split(spec: ModelSpec) -> ParameterSplit:
        """Dense parameters (all, and prunable-linear) of a model, from its config alone."""
        return parameter_split(spec)

    def trajectory_key(self, spec: ModelSpec, sampler: str, steps: int) -> tuple:
        folder = weights_folder(spec)
        stamp = None if folder is None else max(p.stat().st_mtime_ns for p in folder.glob("*.safetensors"))
        return (spec.name, spec.path, stamp, sampler, int(steps), settings.TRAJECTORY_IMAGES, settings.TRAJECTORY_SEED)

    def cached_trajectory(self, spec: ModelSpec, sampler: str, steps: int) -> Optional[Trajectory]:
        """A trajectory computed before for this model, sampler and step count, or None."""
        key = self.trajectory_key(spec, sampler, steps)
        with self._cache_lock:
            return self._trajectories.get(key)

    def trajectory(
        self,
        spec: ModelSpec,
        sampler: str,
        steps: int,
        on_step: Optional[Callable[[int, int], None]] = None,
        should_stop: Optional[Callable[[], bool]] = None,
    ) -> Trajectory:
        """Sample a few images densely and measure how x̂₀ approaches the final image (cached).

        Runs on the job thread; `should_stop` cancels between sampler steps.
        """
        key = self.trajectory_key(spec, sampler, steps)
        with self._compute_lock:
            cached = self.cached_trajectory(spec, sampler, steps)
            if cached is not None:
                return cached
            loaded = self._load(spec)
            generator = trajectory_steps(
                loaded, sampler, int(steps), settings.TRAJECTORY_IMAGES, settings.TRAJECTORY_SEED, should_stop
            )
            result = run_to_end(generator, None if on_step is None else (lambda e: on_step(e.step + 1, e.num_steps)))
        with self._cache_lock:
            self._trajectories[key] = result
            while len(self._trajectories) > settings.TRAJECTORY_CACHE_SIZE:
                self._trajectories.popitem(last=False)
        return result

    def _load(self, spec: ModelSpec):
        """The loaded dense model (one kept in memory at a time). Caller holds the compute lock."""
        self.require_weights(spec)
        key = (spec.name, spec.path)
        if self._loaded_key != key:
            self._loaded, self._loaded_key = None, None
            self._loaded = load_model(spec)
            self._loaded_key = key
        return self._loaded

    # ----- prune --------------------------------------------------------------------------
    @property
    def analyses(self):
        """The `AnalysisStore` (Hessians and removal orders) of this engine's cache root."""
        return self.pruning.analyses

    def pruned_key(self, spec: ModelSpec, plan: Plan, config) -> Optional[str]:
        """The cache key of these settings (None when the model has no weights on disk)."""
        return self.pruning.key(spec, plan, config)

    def cached_pruned(self, spec: ModelSpec, plan: Plan, config) -> Optional[PrunedModel]:
        """The pruned model of these settings if it is in memory (no disk access, no compute)."""
        return self.pruning.cached(spec, plan, config)

    def pruned_on_disk(self, spec: ModelSpec, plan: Plan, config) -> bool:
        """Whether a complete checkpoint of these settings is in the disk cache."""
        return self.pruning.on_disk(spec, plan, config)

    def prune(
        self,
        spec: ModelSpec,
        plan: Plan,
        config,
        should_stop: Optional[Callable[[], bool]] = None,
        on_event: Optional[Callable[[Any], None]] = None,
    ) -> PrunedModel:
        """The staged model of `plan`: from memory, from the disk cache, or pruned now and saved.

        Runs on the job thread. Cancelling (`should_stop`) raises `Cancelled` before the
        checkpoint is written, so the cache holds complete entries only.
        """
        hit = self.pruning.cached(spec, plan, config)
        if hit is not None:
            return hit
        with self._compute_lock:
            loaded = self._load(spec)
            return run_to_end(self.pruning.prune_steps(loaded, plan, config, should_stop), on_event)

    def sensitivity(self, pruned: PrunedModel, compute: bool = True):
        """Measured sensitivity e(τ) of a pruned model (`prune.sensitivity.staged_sensitivity`),
        remembered per checkpoint key; `compute=False` only looks it up (None when unknown)."""
        from mosaic_core.prune.sensitivity import staged_sensitivity

        with self._cache_lock:
            if pruned.key in self._sensitivities:
                return self._sensitivities[pruned.key]
        if not compute:
            return None
        with self._compute_lock:
            result = staged_sensitivity(self._load(pruned.spec), pruned.staged)
        with self._cache_lock:
            self._sensitivities[pruned.key] = result
            while len(self._sensitivities) > 16:
                self._sensitivities.pop(next(iter(self._sensitivities)))
        return result

    def tune(self, spec: ModelSpec, budget: float, plan: Plan, config, should_stop=None, on_progress=None, methods=None, check=None):
        """`conquer.tune.tune` on the loaded model at `plan`'s sampler, steps (the reference), M, λ and c_x;
        the analyses come from (and go to) this engine's cache, so a second budget re-gathers nothing. The
        points sampled are kept in `cache_root/tune/` per model, so after a restart later budgets are
        predicted at once (docs/method.md §4.5)."""
        from mosaic_core.conquer.tune import DEFAULT_CHECK, default_steps_grid, load_memo_points, memo_path, save_memo_points, tune
        from mosaic_core.prune.service import _JobAnalyses

        grid = default_steps_grid(plan.num_inference_steps)
        with self._compute_lock:
            loaded = self._load(spec)
            saved = memo_path(self.cache_root, spec.name, loaded.weights_hash)
            if any(key[0][:2] != (spec.name, loaded.weights_hash) for key in self._tune_memo):
                self._tune_memo.clear()  # another model: its images are of no use
            if not self._tune_memo:  # what was sampled for this model before a restart
                self._tune_memo.update(load_memo_points(saved))
            try:
                return tune(
                    loaded, budget, config, reference_steps=plan.num_inference_steps, steps_grid=grid, M=plan.M, lam=plan.lam,
                    scheduler=plan.scheduler, cx=plan.cx, images=settings.TUNE_IMAGES, analyses=_JobAnalyses(self.analyses),
                    on_progress=on_progress, should_stop=should_stop, memo=self._tune_memo,
                    methods=settings.TUNE_METHODS if methods is None else methods, check=DEFAULT_CHECK if check is None else check,
                    check_seconds=settings.TUNE_CHECK_SECONDS, edges=plan.manual_edges,
                )
            finally:  # also what a cancelled tuning sampled; a cache that cannot be written only costs the next restart
                try:
                    save_memo_points(self._tune_memo, saved)
                except OSError as error:
                    log.warning("could not keep the tuner's points in %s: %s", saved, error)

    def stage_only_plan(self, spec: ModelSpec, plan: Plan, stage: int) -> Plan:
        """The plan that prunes only `stage` (0 early, 1 middle, 2 late) at its sparsity in `plan`."""
        return stage_only_plan(spec, plan, stage)

    # ----- compare ------------------------------------------------------------------------
    def compare(
        self,
        pruned: PrunedModel,
        labels: Sequence,
        sample_config,
        repeats: int,
        should_stop: Optional[Callable[[], bool]] = None,
        on_event: Optional[Callable[[Any], None]] = None,
        negative_prompt: str = "",
        dense_plan=None,
    ) -> list:
        """Dense vs `pruned` on the same conditions and seeds: `compare.MethodResult`s, dense first.

        `dense_plan` samples the dense reference at its step count (default: the pruned plan's).

        Seconds are each contender's floor over its timed runs on a CPU, the median on a GPU
        (`timing_statistic`), as `bench` reports them.

        `labels` are class ids, or prompts for a text-to-image model (embedded once, with
        `negative_prompt` as the unconditional branch, and shared by both contenders).
        """
        with self._compute_lock:
            loaded = self._load(pruned.spec)
            conditions = conditions_for(loaded, labels, negative_prompt)
            contenders = dense_and_staged(loaded.transformer, pruned.staged, pruned.plan, dense_plan)
            statistic = timing_statistic(loaded.device)
            generator = compare_steps(
                loaded, contenders, conditions, sample_config, repeats=repeats, should_stop=should_stop, statistic=statistic,
            )
            return run_to_end(generator, on_event)


@lru_cache(maxsize=settings.CURVE_CACHE_SIZE)
def _cached_curve(scheduler_json: str, lam: float, cx: float, image_seq_len: Optional[int] = None) -> ScoreCurve:
    return schedule_curve(json.loads(scheduler_json), lam, cx, image_seq_len)
