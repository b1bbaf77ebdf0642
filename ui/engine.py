"""The studio's handle on the engine: mosaic_core calls plus the caches an interactive UI needs.

`app.py` builds one `StudioEngine` and hands it to the UI builders (hysts' Spaces style);
the builders never call mosaic_core's heavy functions directly. Nothing here imports
gradio, so it is testable without a server, and nothing heavy happens on construction.

Two helpers live here for now because the engine has no equivalent yet (see the report):
`dense_parameter_split` (all parameters of the dense DiT, counted on the meta device) and
`compute_trajectory` (‖x̂₀(t) − x̂₀(final)‖ along a dense sampling run).

Prune and Compare (sections 4-5) go through `prune` and `compare`, which the UI runs as
background jobs on `jobs` (one worker thread: one heavy job at a time, FIFO). Pruned
models are cached three ways, all keyed by `cache.checkpoint_key` (base weights + plan +
prune config): in memory (the last few `PrunedModel`s), on disk as checkpoint folders
under `cache_root/pruned/` (so the same settings return at once after a restart too), and
the Hessians/removal orders under `cache_root/analyses/` through one `AnalysisStore` per
cache root (so moving only the sparsity re-solves nothing but the kept weights).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from mosaic_core.divide.cost import linear_parameter_count
from mosaic_core.divide.plan import Plan, build_plan
from mosaic_core.models.registry import ModelSpec, known_models, resolve_model, where_to_put
from mosaic_core.divide.noise_schedule import ScoreCurve, alphas_cumprod, importance_score

from ui import settings
from ui.jobs import JobRunner


@dataclass(frozen=True)
class ModelStatus:
    """Whether a model's weights are on disk, and one line of markdown saying so."""

    weights_present: bool
    message: str


@dataclass(frozen=True)
class Dynamics:
    """A model folder's dynamics.json: eps-MSE per noise-level bin at logged training steps.

    `loss[k, b]` is the loss of bin b (model timesteps `bins[b]`, inclusive) at `steps[k]`.
    """

    bins: np.ndarray  # B×2 int
    steps: np.ndarray  # K int
    loss: np.ndarray  # K×B float
    cx: Optional[float]
    eval_images: Optional[int]

    @property
    def bin_centres(self) -> np.ndarray:
        return self.bins.mean(axis=1)


@dataclass(frozen=True)
class ParameterSplit:
    """All parameters of the dense network, and how many of them pruning can touch."""

    total: int
    prunable_linear: int
    exact: bool  # False when the count comes from the registry's shape, not a real config

    @property
    def shared(self) -> int:
        """Parameters every stage network shares (embedders, adaLN, final layer)."""
        return self.total - self.prunable_linear


@dataclass(frozen=True)
class StageKept:
    """What one stage's network kept, measured on the built modules (not read from the plan)."""

    name: str
    num_steps: int
    sparsity: float  # the plan's achieved sparsity of this stage
    heads_kept: int
    heads_total: int
    units_kept: int
    units_total: int
    shared_with: Optional[str] = None  # "dense" or an earlier stage whose network it reuses


@dataclass
class PrunedModel:
    """A pruned staged model ready to sample, with what the Prune section shows about it.

    `source` is "pruned" (computed now), "memory" or "disk" (a cache hit); `seconds` are the
    prune seconds by phase of the run that made it (read from the manifest on a disk hit)
    and `load_seconds` how long this request took.
    """

    key: str
    folder: Path
    spec: ModelSpec
    plan: Plan
    config: Any  # PruneConfig
    staged: Any  # StagedDiT
    source: str
    seconds: dict
    load_seconds: float
    cx: float
    ledger: Any  # staged.MemoryLedger
    stages: tuple[StageKept, ...]

    @property
    def from_cache(self) -> bool:
        return self.source != "pruned"


@dataclass(frozen=True)
class Trajectory:
    """Distance of the predicted clean image to the final one, per sampler step."""

    timesteps: np.ndarray  # N model timesteps, in sampling order
    distance: np.ndarray  # N, RMS ‖x̂₀(t_k) − x̂₀(final)‖ / √d, mean over images
    num_images: int
    seconds: float


def _folder_has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _missing_weights_hint(spec: ModelSpec) -> str:
    """'weights not present …: what to do' for a model whose weights are not on disk."""
    if spec.source == "builtin":
        return f"weights not present yet in `{spec.path}`: run `python -m mosaic_core train`"
    if spec.source == "hub":
        return f"weights not present: {where_to_put(spec.name)}"
    return f"weights not present in `{spec.path}` (expected transformer/config.json and *.safetensors)"


class StudioEngine:
    """Cached access to plans, score curves, model status, dynamics and trajectories."""

    def __init__(
        self,
        model_overrides: Optional[Mapping[str, ModelSpec]] = None,
        cache_root: Optional[str | Path] = None,
    ) -> None:
        # `model_overrides` maps a registry name to another spec (tests, or a dev copy of
        # the weights); production code leaves it empty and uses the registry.
        self._overrides = dict(model_overrides or {})
        self.cache_root = Path(cache_root) if cache_root is not None else settings.cache_dir()
        self.jobs = JobRunner()  # the studio's one worker thread for heavy work
        self._pruned: OrderedDict[str, PrunedModel] = OrderedDict()  # guarded by _cache_lock
        self._cache_lock = threading.Lock()  # guards the trajectory cache (held briefly)
        self._compute_lock = threading.Lock()  # one model load / sampling run at a time
        self._loaded_key: Optional[tuple] = None
        self._loaded: Any = None
        self._trajectories: OrderedDict[tuple, Trajectory] = OrderedDict()

    # ----- models -------------------------------------------------------------------------
    @staticmethod
    def model_choices() -> list[str]:
        """Names for the model picker: the registry's entries."""
        return known_models()

    def resolve(self, model: str, folder: str = "") -> ModelSpec:
        """The spec of a local folder (when given) or of a registry name; ValueError otherwise."""
        name = (folder or "").strip() or (model or "").strip()
        if name in self._overrides:
            return self._overrides[name]
        return resolve_model(name)

    @staticmethod
    def weights_folder(spec: ModelSpec) -> Optional[Path]:
        """The folder holding the transformer weights, if they are on disk where `load_model` looks.

        The built-in model keeps them at the top of its folder; hub copies and local folders
        in diffusers' layout, under `transformer/`.
        """
        if not spec.path:
            return None
        root = Path(spec.path)
        folder = root if spec.source == "builtin" else root / "transformer"
        return folder if _folder_has_weights(folder) else None

    def status(self, spec: ModelSpec) -> ModelStatus:
        """Weights present or not, with what to do about it; planning works either way."""
        folder = self.weights_folder(spec)
        if folder is not None:
            return ModelStatus(True, f"**{spec.name}**: weights present in `{folder}`. {spec.description}")
        return ModelStatus(False, f"**{spec.name}**: {_missing_weights_hint(spec)}. The schedule, stages and costs below need no weights.")

    def require_weights(self, spec: ModelSpec) -> None:
        """ValueError saying where to put the weights when they are not on disk (pruning, sampling)."""
        if self.weights_folder(spec) is None:
            raise ValueError(f"{spec.name}: {_missing_weights_hint(spec).replace('`', '')}")

    def warm_up(self, model: str = settings.MODEL_DEFAULT) -> None:
        """Import diffusers and fill the caches for one model, so the first page load is quick."""
        spec = self.resolve(model)
        self.plan(spec, settings.SAMPLER_DEFAULT, settings.STEPS_DEFAULT, settings.M_DEFAULT, settings.LAM_DEFAULT)
        self.curve(spec, settings.LAM_DEFAULT, settings.CX_DEFAULT)
        self.parameter_split(spec)

    # ----- divide -------------------------------------------------------------------------
    def curve(self, spec: ModelSpec, lam: float, cx: float) -> ScoreCurve:
        """The importance score of a model's schedule (cached per schedule, λ, c_x)."""
        return _cached_curve(json.dumps(dict(spec.scheduler_config), sort_keys=True, default=str), float(lam), float(cx))

    def plan(
        self,
        spec: ModelSpec,
        sampler: str,
        steps: int,
        M: float,
        lam: float,
        cx: float = settings.CX_DEFAULT,
        sparsity: Optional[float] = None,
        stage_sparsity: Optional[Sequence[float]] = None,
    ) -> Plan:
        """`build_plan`, with the step count given as a whole number when it is one."""
        if isinstance(steps, float) and math.isfinite(steps) and steps.is_integer():
            steps = int(steps)
        return build_plan(
            spec,
            num_inference_steps=steps,
            M=M,
            lam=lam,
            sparsity=sparsity,
            stage_sparsity=stage_sparsity,
            scheduler=sampler,
            cx=cx,
        )

    # ----- teaching panel -----------------------------------------------------------------
    def dynamics(self, spec: ModelSpec) -> Optional[Dynamics]:
        """The training dynamics recorded next to the weights, or None when there are none."""
        if not spec.path:
            return None
        path = Path(spec.path) / "dynamics.json"
        if not path.is_file():
            return None
        return _read_dynamics(str(path), path.stat().st_mtime_ns)

    def measured_cx(self, spec: ModelSpec) -> Optional[float]:
        """c_x = E‖x₀‖²/d measured on the training images (from dynamics.json), if known."""
        dynamics = self.dynamics(spec)
        return None if dynamics is None else dynamics.cx

    def parameter_split(self, spec: ModelSpec) -> ParameterSplit:
        """Dense parameters (all, and prunable-linear) of a model, from its config on the meta device."""
        config, exact = _transformer_config(spec, self.weights_folder(spec))
        total = _meta_parameter_count(json.dumps(config, sort_keys=True))
        return ParameterSplit(total=total, prunable_linear=linear_parameter_count(spec.shape), exact=exact)

    def trajectory_key(self, spec: ModelSpec, sampler: str, steps: int) -> tuple:
        folder = self.weights_folder(spec)
        stamp = None if folder is None else max(p.stat().st_mtime_ns for p in folder.glob("*.safetensors"))
        return (spec.name, spec.path, stamp, sampler, int(steps), settings.TRAJECTORY_IMAGES, settings.TRAJECTORY_SEED)

    def cached_trajectory(self, spec: ModelSpec, sampler: str, steps: int) -> Optional[Trajectory]:
        """A trajectory computed before for this model, sampler and step count, or None."""
        key = self.trajectory_key(spec, sampler, steps)
        with self._cache_lock:
            return self._trajectories.get(key)

    def trajectory(
        self, spec: ModelSpec, sampler: str, steps: int, on_step: Optional[Callable[[int, int], None]] = None
    ) -> Trajectory:
        """Sample a few images densely and measure how x̂₀ approaches the final image (cached)."""
        key = self.trajectory_key(spec, sampler, steps)
        with self._compute_lock:
            cached = self.cached_trajectory(spec, sampler, steps)
            if cached is not None:
                return cached
            loaded = self._load(spec)
            result = compute_trajectory(loaded, sampler, int(steps), settings.TRAJECTORY_IMAGES, settings.TRAJECTORY_SEED, on_step)
        with self._cache_lock:
            self._trajectories[key] = result
            while len(self._trajectories) > settings.TRAJECTORY_CACHE_SIZE:
                self._trajectories.popitem(last=False)
        return result

    def _load(self, spec: ModelSpec):
        """The loaded dense model (one kept in memory at a time). Caller holds the compute lock."""
        from mosaic_core.models.loading import load_model

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
        return analysis_store(self.cache_root)

    @staticmethod
    def prune_config(spec: ModelSpec, mode: str, size: int, scorer: str):
        """The `PruneConfig` of the Prune controls (calibration source: the built-in data, else samples).

        `size` is checked against the studio's range here; the engine checks the rest.
        """
        from mosaic_core.prune.calibration import CalibrationConfig
        from mosaic_core.prune.stage_pruning import PruneConfig

        low, high = settings.CALIBRATION_SIZE_RANGE
        if isinstance(size, float) and math.isfinite(size) and size.is_integer():
            size = int(size)
        if isinstance(size, bool) or not isinstance(size, int) or not low <= size <= high:
            raise ValueError(f"calibration size must be a whole number in [{low}, {high}], got {size!r}")
        source = "data" if spec.source == "builtin" else "samples"
        return PruneConfig(calibration=CalibrationConfig(mode=mode, size=size, source=source), scorer=scorer)

    def _weights_hash(self, spec: ModelSpec) -> Optional[str]:
        """`LoadedModel.weights_hash` without loading the model (None when there are no weights)."""
        folder = self.weights_folder(spec)
        return None if folder is None else _weights_hash(str(folder), _newest_mtime(folder))

    def pruned_key(self, spec: ModelSpec, plan: Plan, config) -> Optional[str]:
        """The cache key of these settings (None when the model has no weights on disk)."""
        from mosaic_core.prune.cache import checkpoint_key

        weights = self._weights_hash(spec)
        return None if weights is None else checkpoint_key(weights, plan, config)

    def cached_pruned(self, spec: ModelSpec, plan: Plan, config) -> Optional[PrunedModel]:
        """The pruned model of these settings if it is in memory (no disk access, no compute)."""
        start = time.perf_counter()
        key = self.pruned_key(spec, plan, config)
        with self._cache_lock:
            hit = self._pruned.get(key) if key else None
            if hit is None:
                return None
            self._pruned.move_to_end(key)
        return _replace_source(hit, "memory", time.perf_counter() - start)

    def pruned_on_disk(self, spec: ModelSpec, plan: Plan, config) -> bool:
        """Whether a complete checkpoint of these settings is in the disk cache."""
        from mosaic_core.prune.cache import checkpoint_folder

        weights = self._weights_hash(spec)
        if weights is None:
            return False
        return (checkpoint_folder(self.cache_root, weights, plan, config) / "manifest.json").is_file()

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
        from mosaic_core.prune.cache import checkpoint_folder, load_cached_staged
        from mosaic_core.prune.checkpoint import read_manifest, save_pruned
        from mosaic_core.prune.stage_pruning import prune_steps
        from mosaic_core.conquer.sampling import run_to_end

        start = time.perf_counter()
        hit = self.cached_pruned(spec, plan, config)
        if hit is not None:
            return hit
        with self._compute_lock:
            loaded = self._load(spec)
            folder = checkpoint_folder(self.cache_root, loaded.weights_hash, plan, config)
            staged = load_cached_staged(self.cache_root, loaded, plan, config)
            if staged is not None:
                manifest = read_manifest(folder)
                source, seconds, cx = "disk", dict(manifest.get("seconds", {})), float(manifest.get("cx", float("nan")))
            else:
                generator = prune_steps(loaded, plan, config, should_stop=should_stop, analyses=self.analyses)
                result = run_to_end(generator, on_event)
                save_pruned(result, loaded, folder)
                source, seconds, cx, staged = "pruned", dict(result.seconds), float(result.cx), result.staged
            pruned = _pruned_model(loaded, folder, spec, plan, config, staged, source, seconds, cx, time.perf_counter() - start)
        with self._cache_lock:
            self._pruned[pruned.key] = pruned
            self._pruned.move_to_end(pruned.key)
            while len(self._pruned) > settings.PRUNED_IN_MEMORY:
                self._pruned.popitem(last=False)
        return pruned

    def stage_only_plan(self, spec: ModelSpec, plan: Plan, stage: int) -> Plan:
        """The plan that prunes only `stage` (0 early, 1 middle, 2 late) at its sparsity in `plan`."""
        from mosaic_core.divide.stages import STAGE_NAMES

        name = STAGE_NAMES[stage]
        if plan.step_counts[stage] == 0:
            raise ValueError(f"the {name} stage has no sampler steps in this plan: pruning it alone changes nothing")
        sparsity = plan.allocation.achieved[stage]
        if sparsity <= 0:
            raise ValueError(f"the {name} stage is not pruned in this plan (sparsity 0): raise its sparsity in section 3")
        values = tuple(sparsity if index == stage else 0.0 for index in range(3))
        return self.plan(spec, plan.scheduler, plan.num_inference_steps, plan.M, plan.lam, plan.cx, stage_sparsity=values)

    # ----- compare ------------------------------------------------------------------------
    def compare(
        self,
        pruned: PrunedModel,
        labels: Sequence[int],
        sample_config,
        repeats: int,
        should_stop: Optional[Callable[[], bool]] = None,
        on_event: Optional[Callable[[Any], None]] = None,
    ) -> list:
        """Dense vs `pruned` on the same labels and seeds: `compare.MethodResult`s, dense first."""
        from mosaic_core.conquer.compare import Contender, compare_steps
        from mosaic_core.conquer.sampling import run_to_end
        from mosaic_core.conquer.staged_denoiser import param_count

        plan = pruned.plan
        with self._compute_lock:
            loaded = self._load(pruned.spec)
            dense = loaded.transformer
            contenders = [
                Contender("dense", dense, plan.num_inference_steps, plan.macs_dense, param_count(dense), plan.step_stages),
                Contender("staged", pruned.staged, plan.num_inference_steps, plan.macs_staged, param_count(pruned.staged), plan.step_stages),
            ]
            generator = compare_steps(loaded, contenders, labels, sample_config, repeats=repeats, should_stop=should_stop)
            return run_to_end(generator, on_event)


@lru_cache(maxsize=64)
def _cached_curve(scheduler_json: str, lam: float, cx: float) -> ScoreCurve:
    return importance_score(alphas_cumprod(json.loads(scheduler_json)), lam, cx)


_STORES: dict[Path, Any] = {}
_STORES_LOCK = threading.Lock()


def analysis_store(root: str | Path):
    """One `AnalysisStore` per cache root, shared by every engine (and job) that uses it."""
    from mosaic_core.prune.cache import AnalysisStore

    root = Path(root).resolve()
    with _STORES_LOCK:
        if root not in _STORES:
            _STORES[root] = AnalysisStore(root)
        return _STORES[root]


def _newest_mtime(folder: Path) -> int:
    return max(p.stat().st_mtime_ns for p in folder.glob("*.safetensors"))


@lru_cache(maxsize=16)
def _weights_hash(folder: str, mtime_ns: int) -> str:
    """`loading.weights_hash`, remembered while the files keep their modification time."""
    from mosaic_core.models.loading import weights_hash

    return weights_hash(folder)


def _stage_kept(plan: Plan, staged, dense) -> tuple[StageKept, ...]:
    """Heads and MLP units of each stage network, read from its blocks (all blocks must agree)."""
    from mosaic_core.divide.stages import STAGE_NAMES
    from mosaic_core.prune.surgery import block_sizes

    total_heads, _, total_units = block_sizes(dense.transformer_blocks[0])
    networks = staged.networks()
    rows = []
    for index, (name, network) in enumerate(zip(STAGE_NAMES, networks)):
        sizes = {block_sizes(block) for block in network.transformer_blocks}
        if len(sizes) != 1:
            raise ValueError(f"the {name} network's blocks differ in size: {sorted(sizes)}")
        heads, _, units = sizes.pop()
        shared = "dense" if network is dense else next((STAGE_NAMES[j] for j in range(index) if networks[j] is network), None)
        rows.append(
            StageKept(name, plan.step_counts[index], plan.allocation.achieved[index], heads, total_heads, units, total_units, shared)
        )
    return tuple(rows)


def _pruned_model(loaded, folder, spec, plan, config, staged, source, seconds, cx, load_seconds) -> PrunedModel:
    from mosaic_core.conquer.staged_denoiser import memory_ledger

    return PrunedModel(
        key=Path(folder).name,
        folder=Path(folder),
        spec=spec,
        plan=plan,
        config=config,
        staged=staged,
        source=source,
        seconds=seconds,
        load_seconds=load_seconds,
        cx=cx,
        ledger=memory_ledger(loaded.transformer, staged),
        stages=_stage_kept(plan, staged, loaded.transformer),
    )


def _replace_source(pruned: PrunedModel, source: str, load_seconds: float) -> PrunedModel:
    from dataclasses import replace

    return replace(pruned, source=source, load_seconds=load_seconds)


@lru_cache(maxsize=8)
def _read_dynamics(path: str, mtime_ns: int) -> Optional[Dynamics]:
    """Parse dynamics.json; a malformed file is reported as absent rather than crashing the UI."""
    try:
        data = json.loads(Path(path).read_text())
        bins = np.asarray(data["bins"], dtype=np.int64).reshape(-1, 2)
        steps = np.asarray(data["steps"], dtype=np.int64).reshape(-1)
        loss = np.asarray(data["loss"], dtype=np.float64).reshape(steps.size, bins.shape[0])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    cx = data.get("cx")
    images = data.get("eval_images")
    return Dynamics(
        bins=bins,
        steps=steps,
        loss=loss,
        cx=float(cx) if isinstance(cx, (int, float)) and math.isfinite(cx) and cx > 0 else None,
        eval_images=int(images) if isinstance(images, int) else None,
    )


def _transformer_config(spec: ModelSpec, weights_folder: Optional[Path]) -> tuple[dict, bool]:
    """The DiT config of a model: its config.json, the built-in recipe, or one built from the shape."""
    if weights_folder is not None:
        return json.loads((weights_folder / "config.json").read_text()), True
    if spec.name == "digits-dit":
        from mosaic_core.models.digits import DIGITS_DIT_CONFIG

        return dict(DIGITS_DIT_CONFIG), True
    shape = spec.shape
    patch = max(1, int(round(spec.sample_size / math.sqrt(shape.num_tokens))))
    # The registry's hub entries are DiT-XL/2: learned σ doubles the output channels.
    return {
        "num_attention_heads": shape.num_heads,
        "attention_head_dim": shape.head_dim,
        "in_channels": spec.in_channels,
        "out_channels": 2 * spec.in_channels if spec.latent else spec.in_channels,
        "num_layers": shape.num_layers,
        "sample_size": spec.sample_size,
        "patch_size": patch,
        "num_embeds_ada_norm": spec.num_classes,
    }, False


@lru_cache(maxsize=16)
def _meta_parameter_count(config_json: str) -> int:
    """Parameters of a DiTTransformer2DModel built on the meta device (no memory, no weights)."""
    import torch
    from diffusers import DiTTransformer2DModel

    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = DiTTransformer2DModel(**config)
    return int(sum(p.numel() for p in model.parameters()))


def _recording(transformer):
    """Wrap a transformer so that its last call's input and output are kept (x̂₀ without pred_original)."""
    import torch

    class Recorder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.last: Optional[tuple] = None

        @property
        def config(self):
            return self.inner.config

        def forward(self, hidden_states, timestep=None, class_labels=None, **kwargs):
            out = self.inner(hidden_states, timestep=timestep, class_labels=class_labels, **kwargs)
            self.last = (hidden_states, out.sample)
            return out

    return Recorder(transformer)


def compute_trajectory(
    loaded,
    sampler: str,
    steps: int,
    num_images: int,
    seed: int,
    on_step: Optional[Callable[[int, int], None]] = None,
) -> Trajectory:
    """Sample `num_images` images densely; distance of each step's x̂₀ to the last step's.

    x̂₀(t_k) is the scheduler's `pred_original_sample` when it gives one (DDIM, DDPM, Euler).
    DPM-Solver does not; then x̂₀ = (x_t − √(1−ᾱ) ε̂) / √ᾱ (Ho et al. 2020, eq. 15) from the
    guided ε̂ of that step's model call, with ᾱ at the rounded timestep. When the schedule
    clips samples (`clip_sample`, pixel models), every x̂₀ is clipped the same way, so the
    samplers are comparable. Distances are RMS over the d elements of one image, averaged
    over images.
    """
    import time

    import torch

    from mosaic_core.conquer.sampling import SampleConfig, labels_for, sample_steps

    spec = loaded.spec
    config = SampleConfig(num_inference_steps=steps, guidance_scale=spec.default_cfg, scheduler=sampler, seed=seed)
    labels = labels_for(num_images, spec.num_classes)
    recorder = _recording(loaded.transformer)
    alpha_bar = torch.as_tensor(alphas_cumprod(loaded.scheduler_config))
    guidance = float(config.guidance_scale)
    schedule = dict(loaded.scheduler_config)
    clip = float(schedule.get("clip_sample_range", 1.0)) if schedule.get("clip_sample") else None
    predictions, timesteps = [], []
    start = time.perf_counter()
    generator = sample_steps(
        recorder,
        loaded.scheduler_config,
        labels,
        config,
        num_classes=spec.num_classes,
        sample_shape=(spec.in_channels, spec.sample_size, spec.sample_size),
        vae=None,  # distances are measured in model space; nothing is decoded
    )
    for event in generator:
        if event.pred_original is not None:
            x0 = event.pred_original.float()
        else:
            x_in, out = recorder.last
            channels = event.latents.shape[1]
            eps = out[:, :channels].float()
            if eps.shape[0] == 2 * len(labels):  # classifier-free guidance doubled the batch
                eps_cond, eps_uncond = eps.chunk(2)
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)
                x_in = x_in[: len(labels)]
            a = alpha_bar[int(min(max(round(event.timestep), 0), alpha_bar.numel() - 1))].float()
            x0 = (x_in.float() - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)  # as DDIM/DDPM clip their own x̂₀, so samplers compare
        predictions.append(x0.cpu())
        timesteps.append(event.timestep)
        if on_step is not None:
            on_step(event.step + 1, event.num_steps)
    stacked = torch.stack(predictions)  # steps×N×C×H×W
    final = stacked[-1]
    rms = (stacked - final).flatten(2).pow(2).mean(dim=2).sqrt()  # steps×N
    return Trajectory(
        timesteps=np.asarray(timesteps, dtype=np.float64),
        distance=rms.mean(dim=1).double().numpy(),
        num_images=len(labels),
        seconds=time.perf_counter() - start,
    )
