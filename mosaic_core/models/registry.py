"""Model registry: what the engine knows about a model before loading any weight.

An entry (`ModelSpec`) carries the noise schedule (a diffusers scheduler config), the
denoiser's cost shape and its family (the adapter in `mosaic_core.models.adapters` that
knows its blocks and conditioning), which is all the Divide engine and the cost model need.
Loading weights is `mosaic_core.models.loading`'s job; planning works for a model whose
weights are absent.

Names resolve in this order:
1. a built-in entry (`digits-dit`, `facebook/DiT-XL-2-256`, `facebook/DiT-XL-2-512`,
   `sdxl-base`, `pixart-sigma`, `sd3-medium`, `flux-dev`, `flux-schnell`: the public denoiser
   and scheduler configs of SDXL-base-1.0, PixArt-Σ-XL-2-1024-MS, SD3-medium, FLUX.1-dev and
   FLUX.1-schnell ship in `assets/configs/<name>/`). When its weights are found locally
   (`hub_folder`), the copy's own denoiser config gives the shape; a copy whose shape
   fields contradict the shipped config is refused, naming the field and both values;
2. a local folder in diffusers' layout (`scheduler/scheduler_config.json` and the denoiser's
   `transformer/config.json` or `unet/config.json`), or a folder holding a bare
   `scheduler_config.json` next to the denoiser's `config.json`. The config's `_class_name`
   picks the family; an unknown one is refused with the list of supported classes.

A server that resolves names sent by remote users passes `allowed_roots`: a local folder
must then lie (after resolving symlinks) inside one of them. Every refusal of a local
folder — missing, not a folder, unreadable, outside the roots, no usable scheduler
config — has the same message, so a caller cannot learn which paths exist, and no error
repeats what a config file contains (only the names of its fields). The one exception is a
registry entry's local copy, a folder of the server's own (models directory, HF cache): the
shape field where it contradicts the shipped config is shown with both values.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from mosaic_core import limits
from mosaic_core.divide.shapes import TransformerShape

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ASSETS_DIR = PROJECT_ROOT / "assets"
DEFAULT_MODEL = "digits-dit"

# Where real checkpoints are looked for, besides an explicit folder path and the HF cache.
MODELS_DIR_ENV = "MOSAIC_MODELS_DIR"


@dataclass(frozen=True)
class ModelSpec:
    """Everything known about a model without loading it.

    `source` is `"builtin"` (ships in `assets/`), `"hub"` (a diffusers id that must be
    present locally) or `"folder"` (a local diffusers folder).
    """

    name: str
    description: str
    scheduler_config: Mapping[str, Any]
    shape: TransformerShape
    num_classes: int
    source: str
    in_channels: int = 4
    sample_size: int = 32
    latent: bool = True  # False: the model works on pixels (no VAE)
    default_steps: int = 50
    default_cfg: float = 1.5
    path: str | None = None
    class_names: tuple[str, ...] = field(default=())
    family: str = "dit"  # the adapter (mosaic_core.models.adapters) that knows this denoiser
    hub_id: str | None = None  # where the weights are looked for, when it differs from `name`
    config_path: str | None = None  # the denoiser's shipped config.json, for entries planned without weights
    image_seq_len: int | None = None  # image tokens per sample at the default size: μ of a dynamically shifted flow schedule

    @property
    def conditioning(self) -> str:
        """What the family conditions on: "class" (labels) or "text" (prompts), from its adapter."""
        from mosaic_core.models.adapters import adapter_named

        return adapter_named(self.family).conditioning

    @property
    def null_class(self) -> int:
        """The label of the unconditional branch of classifier-free guidance."""
        return self.num_classes


_LINEAR_1000 = MappingProxyType(
    {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
    }
)

_DIGITS_SCHEDULER = MappingProxyType({**_LINEAR_1000, "clip_sample": True, "clip_sample_range": 1.0})

_REGISTRY: dict[str, ModelSpec] = {
    "digits-dit": ModelSpec(
        name="digits-dit",
        description="Built-in 10-class DiT trained on sklearn's real 8x8 digits (16x16 pixels).",
        scheduler_config=_DIGITS_SCHEDULER,
        shape=TransformerShape(num_layers=6, num_heads=6, head_dim=32, mlp_hidden=768, num_tokens=64),
        num_classes=10,
        source="builtin",
        in_channels=1,
        sample_size=16,
        latent=False,
        path=str(ASSETS_DIR / "digits-dit"),
        default_cfg=1.25,  # measured best: DDIM-50 accuracy 0.955 (cfg 1.0: 0.925, 1.5: 0.91, 2.0: 0.815)
        class_names=tuple(str(i) for i in range(10)),
    ),
    "facebook/DiT-XL-2-256": ModelSpec(
        name="facebook/DiT-XL-2-256",
        description="DiT-XL/2, ImageNet 256x256, class-conditional latent DiT (675 M parameters).",
        scheduler_config=_LINEAR_1000,
        shape=TransformerShape(num_layers=28, num_heads=16, head_dim=72, mlp_hidden=4608, num_tokens=256),
        num_classes=1000,
        source="hub",
        in_channels=4,
        sample_size=32,
    ),
    "facebook/DiT-XL-2-512": ModelSpec(
        name="facebook/DiT-XL-2-512",
        description="DiT-XL/2, ImageNet 512x512, class-conditional latent DiT (675 M parameters).",
        scheduler_config=_LINEAR_1000,
        shape=TransformerShape(num_layers=28, num_heads=16, head_dim=72, mlp_hidden=4608, num_tokens=1024),
        num_classes=1000,
        source="hub",
        in_channels=4,
        sample_size=64,
    ),
}


SDXL_BASE_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"  # where sdxl-base's weights are looked for


def _sdxl_base() -> ModelSpec:
    """SDXL-base-1.0 from its shipped public configs (no weights needed to plan)."""
    from mosaic_core.models.adapters import adapter_for_class

    folder = ASSETS_DIR / "configs" / "sdxl-base"
    unet = _read_json(folder / "unet_config.json")
    adapter = adapter_for_class(unet["_class_name"])
    return ModelSpec(
        name="sdxl-base",
        description="Stable Diffusion XL base 1.0: text-to-image latent UNet (2.6 B parameters), 1024x1024.",
        scheduler_config=MappingProxyType(_read_json(folder / "scheduler_config.json")),
        source="hub",
        default_steps=50,
        default_cfg=5.0,
        family=adapter.name,
        hub_id=SDXL_BASE_HUB_ID,
        config_path=str(folder / "unet_config.json"),
        **adapter.spec_fields(unet, folder),
    )


def _transformer_entry(name: str, description: str, hub_id: str, default_steps: int, default_cfg: float | None) -> ModelSpec:
    """A text-to-image transformer from its shipped public configs in assets/configs/<name>/ (no weights needed to plan)."""
    from mosaic_core.models.adapters import adapter_for_class

    folder = ASSETS_DIR / "configs" / name
    config = _read_json(folder / "transformer_config.json")
    adapter = adapter_for_class(config["_class_name"])
    fields = adapter.spec_fields(config, folder)
    if default_cfg is not None:
        fields["default_cfg"] = default_cfg
    fields.pop("default_steps", None)  # the entry's own count wins
    return ModelSpec(
        name=name,
        description=description,
        scheduler_config=MappingProxyType(_read_json(folder / "scheduler_config.json")),
        source="hub",
        default_steps=default_steps,
        family=adapter.name,
        hub_id=hub_id,
        config_path=str(folder / "transformer_config.json"),
        **fields,
    )


def _pixart_sigma() -> ModelSpec:
    """PixArt-Σ-XL-2 1024 (T5 text, cross-attention, adaLN-single), 1024x1024; M = 300 text tokens."""
    return _transformer_entry(
        "pixart-sigma", "PixArt-Σ-XL-2 1024-MS: text-to-image latent DiT with T5 text (0.6 B parameters), 1024x1024.",
        "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", 20, 4.5,
    )


def _sd3_medium() -> ModelSpec:
    """Stable Diffusion 3 medium (joint-attention transformer, flow matching), 1024x1024."""
    return _transformer_entry(
        "sd3-medium", "Stable Diffusion 3 medium: text-to-image joint-attention transformer (2 B parameters), 1024x1024.",
        "stabilityai/stable-diffusion-3-medium-diffusers", 28, 7.0,
    )


def _flux_dev() -> ModelSpec:
    """FLUX.1-dev (guidance-distilled: no unconditional branch), 1024x1024."""
    return _transformer_entry(
        "flux-dev", "FLUX.1-dev: guidance-distilled text-to-image transformer (12 B parameters), 1024x1024.",
        "black-forest-labs/FLUX.1-dev", 28, None,
    )


def _flux_schnell() -> ModelSpec:
    """FLUX.1-schnell (timestep-distilled, 4 steps), 1024x1024."""
    return _transformer_entry(
        "flux-schnell", "FLUX.1-schnell: 4-step distilled text-to-image transformer (12 B parameters), 1024x1024.",
        "black-forest-labs/FLUX.1-schnell", 4, None,
    )


# Entries built on first use (they read config files and import the family adapters).
_LAZY_REGISTRY = {
    "sdxl-base": _sdxl_base, "pixart-sigma": _pixart_sigma, "sd3-medium": _sd3_medium, "flux-dev": _flux_dev, "flux-schnell": _flux_schnell,
}


def known_models() -> list[str]:
    """Names of the built-in registry entries."""
    return list(_REGISTRY) + list(_LAZY_REGISTRY)


class _Unusable(Exception):
    """A local folder is not a usable model. Carries at most the config file that could not be read
    (`path`), shown only for a folder the caller may read; never what the file holds."""

    def __init__(self, path: Path | None = None) -> None:
        super().__init__()
        self.path = path


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a config file of bounded size; `_Unusable` otherwise (content never echoed)."""
    try:
        if path.stat().st_size > limits.MAX_CONFIG_BYTES:
            raise _Unusable(path)
        value = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        raise _Unusable(path) from None
    if not isinstance(value, dict):
        raise _Unusable(path)
    return value


# (steps, guidance scale) of the `__call__` defaults of the pipelines the adapters serve, written
# out so that planning a folder does not import a pipeline module (over a second, and transformers'
# warnings); a test holds them to the installed diffusers' own. Other pipelines are read by inspect.
PIPELINE_DEFAULTS: Mapping[str, tuple[int, float]] = MappingProxyType({
    "DiTPipeline": (50, 4.0),
    "PixArtAlphaPipeline": (20, 4.5),
    "PixArtSigmaPipeline": (20, 4.5),
    "StableDiffusionXLPipeline": (50, 5.0),
    "StableDiffusion3Pipeline": (28, 7.0),
    "FluxPipeline": (28, 3.5),
})


@functools.lru_cache(maxsize=32)
def _call_defaults(pipeline_class: str) -> tuple[tuple[str, Any], ...]:
    """(("default_steps", N), ("default_cfg", g)) from a diffusers pipeline's own `__call__`
    defaults (StableDiffusion3Pipeline: 28 steps, 7.0), the values a user of that pipeline gets."""
    if pipeline_class in PIPELINE_DEFAULTS:
        steps, guidance = PIPELINE_DEFAULTS[pipeline_class]
        return (("default_steps", steps), ("default_cfg", guidance))
    import diffusers

    try:
        call = getattr(diffusers, pipeline_class).__call__
        parameters = inspect.signature(call).parameters
    except (AttributeError, ImportError, TypeError, ValueError, RuntimeError):
        return ()
    found = []
    for key, field_name, kind in (("num_inference_steps", "default_steps", int), ("guidance_scale", "default_cfg", float)):
        value = parameters[key].default if key in parameters else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            found.append((field_name, kind(value)))
    return tuple(found)


def _pipeline_defaults(folder: Path) -> dict[str, Any]:
    """The step count and guidance scale of the pipeline a folder's model_index.json names, or {}
    (no model_index.json, or a class that is not a diffusers pipeline)."""
    index = folder / "model_index.json"
    if not _is_file(index):
        return {}
    try:
        name = _read_json(index).get("_class_name")
    except _Unusable:
        return {}
    if not isinstance(name, str) or not name.isidentifier() or not name.endswith("Pipeline") or len(name) > 80:
        return {}
    return dict(_call_defaults(name))


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def _scheduler_config_in(folder: Path) -> dict[str, Any] | None:
    for candidate in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"):
        if _is_file(candidate):
            return _read_json(candidate)
    return None


DENOISER_FOLDERS = ("transformer", "unet")


def _denoiser_config_in(folder: Path) -> dict[str, Any] | None:
    """The denoiser's diffusers config in a folder (transformer/, unet/ or the folder itself)."""
    for candidate in [folder / name / "config.json" for name in DENOISER_FOLDERS] + [folder / "config.json"]:
        if _is_file(candidate):
            config = _read_json(candidate)
            if "_class_name" in config:
                return config
    return None


# Fields of a local folder's configs the engine reads, with their allowed ranges.
_SCHEDULER_INTS = {"num_train_timesteps": (2, limits.MAX_TRAIN_TIMESTEPS)}
_SCHEDULER_FLOATS = {"beta_start": (0.0, 1.0), "beta_end": (0.0, 1.0), "clip_sample_range": (0.0, 1e6)}
_TRANSFORMER_INTS = {**limits.TRANSFORMER_CONFIG_INTS, "num_embeds_ada_norm": (1, 100_000)}


def _check_fields(config: Mapping[str, Any], ints: Mapping[str, tuple], floats: Mapping[str, tuple], what: str) -> None:
    """ValueError naming the field and its allowed range (never its value) when a read field is bad."""
    for key, (low, high) in ints.items():
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
            raise ValueError(f"{what}: '{key}' must be a whole number in [{low}, {high}]")
    for key, (low, high) in floats.items():
        value = config.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= float(value) <= high
        ):
            raise ValueError(f"{what}: '{key}' must be a number in [{low:g}, {high:g}]")


def _check_scheduler_config(config: Mapping[str, Any], what: str) -> None:
    """The scheduler fields the engine reads must be sane, and give a schedule (checked now, not at use)."""
    from mosaic_core.divide.flow_schedule import check_flow_config, is_flow_matching
    from mosaic_core.divide.noise_schedule import BETA_SCHEDULES, alphas_cumprod

    _check_fields(config, _SCHEDULER_INTS, _SCHEDULER_FLOATS, what)
    if is_flow_matching(config):  # σ schedule (docs/method.md §8): no β to check
        try:
            check_flow_config(config)
        except ValueError:
            raise ValueError(f"{what}: its flow-matching fields do not give a σ schedule (docs/method.md §8.1)") from None
        return
    kind = config.get("beta_schedule")
    if kind is not None and kind not in BETA_SCHEDULES:
        raise ValueError(f"{what}: 'beta_schedule' must be one of {', '.join(BETA_SCHEDULES)}")
    trained = config.get("trained_betas")
    if trained is not None and not (
        isinstance(trained, list)
        and 2 <= len(trained) <= limits.MAX_TRAIN_TIMESTEPS
        and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in trained)
    ):
        raise ValueError(f"{what}: 'trained_betas' must be a list of 2 to {limits.MAX_TRAIN_TIMESTEPS} numbers")
    try:
        alphas_cumprod(config)
    except (ValueError, TypeError, OverflowError):
        raise ValueError(
            f"{what}: its fields do not give a noise schedule (need betas in [0, 1) and ᾱ decreasing)"
        ) from None


def models_dirs() -> list[Path]:
    """Where local model copies live: `$MOSAIC_MODELS_DIR` (when set), then `<project>/cache/models`."""
    roots = [Path(os.environ[MODELS_DIR_ENV]).expanduser()] if os.environ.get(MODELS_DIR_ENV) else []
    return roots + [PROJECT_ROOT / "cache" / "models"]


def _is_model_folder(folder: Path) -> bool:
    """A scheduler config and a denoiser config: what `resolve_model` needs of a local folder."""
    try:
        return folder.is_dir() and _scheduler_config_in(folder) is not None and _denoiser_config_in(folder) is not None
    except (_Unusable, OSError):
        return False


def local_model_folders() -> list[Path]:
    """Model folders in the models directories that are not a registry entry's weights, sorted.

    A folder counts when it holds a diffusers scheduler config and a denoiser config
    (`<dir>/<name>` or `<dir>/<owner>/<name>`); a copy of a registry entry's hub id
    (`facebook--DiT-XL-2-256`) is that entry, listed under its registry name instead.
    """
    registered = set()
    for name in known_models():
        spec = _REGISTRY[name] if name in _REGISTRY else _LAZY_REGISTRY[name]()
        for model_id in {name, spec.hub_id or name}:
            registered.update({model_id, model_id.replace("/", "--")})
    found: list[Path] = []
    for root in models_dirs():
        try:
            children = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        except OSError:
            continue
        for child in children:
            candidates = [child] if _is_model_folder(child) else sorted(p for p in child.iterdir() if p.is_dir())
            for folder in candidates:
                name = str(folder.relative_to(root))
                if name not in registered and _is_model_folder(folder) and folder not in found:
                    found.append(folder)
    return found


def hub_folder(model_id: str) -> Path | None:
    """A local folder holding the diffusers files of a hub id, if any is present.

    Looked for in `$MOSAIC_MODELS_DIR/<id>` and `cache/models/<id>` (with `/` or `--`
    between owner and name), then in the Hugging Face cache (offline, never downloads).
    """
    for root in models_dirs():
        for name in (model_id, model_id.replace("/", "--")):
            if any((root / name / sub).is_dir() for sub in DENOISER_FOLDERS):
                return root / name
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model_id, local_files_only=True))
        return folder if any((folder / sub).is_dir() for sub in DENOISER_FOLDERS) else None
    except Exception:  # noqa: BLE001 - any cache miss or hub error means "not present"
        return None


def where_to_put(model_id: str) -> str:
    """One sentence telling the user where the weights of a hub id are looked for."""
    return (
        f"put a diffusers copy of '{model_id}' (folders transformer/ or unet/, vae/, scheduler/, …) in "
        f"cache/models/{model_id.replace('/', '--')} or ${MODELS_DIR_ENV}/{model_id}, "
        f"or pass the folder path as --model"
    )


def _unknown(name: str) -> ValueError:
    shown = name if len(name) <= 200 else name[:200] + "…"
    return ValueError(
        f"unknown model '{shown}': choose one of {', '.join(known_models())}, "
        f"or give a folder holding a diffusers scheduler config (scheduler/scheduler_config.json or "
        f"scheduler_config.json) that this caller may read"
    )


def _inside(folder: Path, roots: list[Path]) -> bool:
    return any(folder == root or root in folder.parents for root in roots)


# Denoiser config fields that fix the shapes of the weights (diffusers' names, every family), in the order checked.
_SHAPE_FIELDS = (
    "num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim",
    "block_out_channels", "layers_per_block", "transformer_layers_per_block",
    "down_block_types", "mid_block_type", "up_block_types",
    "in_channels", "out_channels", "patch_size", "sample_size", "pos_embed_max_size",
    "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "caption_channels", "cross_attention_dim",
    "projection_class_embeddings_input_dim", "addition_embed_type", "addition_time_embed_dim",
    "num_embeds_ada_norm", "norm_type", "use_additional_conditions", "use_linear_projection",
    "dual_attention_layers", "guidance_embeds",
)
# The `ModelSpec` fields a registry entry takes from its local copy's config (the weights' shape).
_FOLDER_SPEC_FIELDS = ("shape", "num_classes", "in_channels", "sample_size", "image_seq_len")


def _shown(value: Any) -> str:
    """A config value as JSON, cut to 60 characters (a field of the server's own files, never a user's)."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:60] + "…"


def _entry_in_folder(spec: ModelSpec, folder: Path) -> ModelSpec:
    """A registry entry whose weights are in a local folder, specced from that folder's own denoiser config.

    The folder's config is the truth: planning, MACs and sampling must match its weights. An
    entry that ships a transcribed config (`config_path`) must agree with it on every shape
    field both give (`_SHAPE_FIELDS`): a copy that disagrees is either another model or proof
    that the transcription is wrong, and only the user can tell which, so it is a ValueError
    naming the entry, the folder, the first differing field and both values. An entry without
    a shipped config (DiT-XL/2) takes the folder's shape, as a plain folder does. A copy
    without a denoiser config keeps the entry's spec: the loader says what is missing.
    """
    from mosaic_core.models.adapters import adapter_for_class, adapter_named, denoiser_class_name, supported_classes

    adapter = adapter_named(spec.family)
    where = f"{adapter.denoiser_folder}/config.json"
    config_file = folder / where
    what = f"registry entry '{spec.name}'"
    if not _is_file(config_file):
        return ModelSpec(**{**spec.__dict__, "path": str(folder)})
    try:
        config = _read_json(config_file)
    except _Unusable:
        raise ValueError(
            f"{what}: the {where} of its local copy {folder} is not a readable JSON object of at most "
            f"{limits.MAX_CONFIG_BYTES} bytes: replace it with the model's own config"
        ) from None
    class_name = denoiser_class_name(config)
    supported = isinstance(class_name, str) and class_name in supported_classes()
    if not supported or adapter_for_class(class_name) is not adapter:
        # a class name is shown only when it looks like one, as for a plain folder
        shown = isinstance(class_name, str) and class_name.isidentifier() and len(class_name) <= 80
        raise ValueError(
            f"{what} is a {adapter.name} model, but the {where} of its local copy {folder} names "
            f"{f'a {class_name}' if shown else 'no supported class'}: put the {spec.hub_id or spec.name} weights there, "
            f"or give the folder's path as the model to use it as a model of its own"
        )
    if spec.config_path:
        shipped = _read_json(Path(spec.config_path))
        for key in _SHAPE_FIELDS:
            expected, found = shipped.get(key), config.get(key)
            if expected is not None and found is not None and expected != found:
                shipped_file = Path(spec.config_path)
                if PROJECT_ROOT in shipped_file.parents:
                    shipped_file = shipped_file.relative_to(PROJECT_ROOT)
                raise ValueError(
                    f"{what} does not match its local copy {folder}: '{key}' is {_shown(expected)} in the shipped config "
                    f"({shipped_file}) but {_shown(found)} in the folder's {where}; put the {spec.hub_id or spec.name} weights "
                    f"there, correct the shipped config if the folder is the real model, or give the folder's path as the "
                    f"model to use it as a model of its own"
                )
    if adapter.name == "dit":
        _check_fields(config, _TRANSFORMER_INTS, {}, f"{what} (the {where} of its local copy {folder})")
    try:
        fields = adapter.spec_fields(config, folder)
    except (KeyError, TypeError, IndexError, AttributeError):
        raise ValueError(
            f"{what}: the {class_name} config of its local copy {folder} lacks fields or has fields of the wrong type"
        ) from None
    own = {key: fields[key] for key in _FOLDER_SPEC_FIELDS if key in fields}
    return ModelSpec(**{**spec.__dict__, **own, "path": str(folder)})


def resolve_model(name: str, allowed_roots: list[str | Path] | None = None) -> ModelSpec:
    """The `ModelSpec` for a registry name or a local diffusers folder.

    `allowed_roots` (None = any folder) restricts local folders to those inside one of the
    given roots. Raises ValueError naming the model and the allowed choices when it is
    neither; the message is the same whatever the reason a folder was refused. A registry
    entry whose weights are found locally (`hub_folder`) is specced from that copy's own
    denoiser config, and refused clearly when it contradicts the shipped one (`_entry_in_folder`).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {str(name)[:80]!r}")
    if len(name) > limits.MAX_NAME_LENGTH:
        raise ValueError(f"model name is {len(name)} characters long: at most {limits.MAX_NAME_LENGTH} allowed")
    if "\x00" in name:
        raise ValueError("model name must not contain NUL characters")
    if name in _REGISTRY or name in _LAZY_REGISTRY:
        spec = _REGISTRY[name] if name in _REGISTRY else _LAZY_REGISTRY[name]()
        if spec.source == "hub":
            folder = hub_folder(spec.hub_id or name)
            if folder is not None:
                return _entry_in_folder(spec, folder)
        return spec
    try:
        folder = Path(name).expanduser()
        if allowed_roots is not None:
            folder = folder.resolve()
            if not _inside(folder, [Path(root).expanduser().resolve() for root in allowed_roots]):
                raise _Unusable
        if not folder.is_dir():
            raise _Unusable
        scheduler = _scheduler_config_in(folder)
        if scheduler is None:
            raise _Unusable
        denoiser = _denoiser_config_in(folder)
    except _Unusable as unusable:
        if unusable.path is None or allowed_roots is not None:
            raise _unknown(name) from None  # a server's refused folders all look alike
        # the caller's own folder (the CLI may read any), holding a config that is not one: say which file
        try:
            shown = unusable.path.relative_to(folder)
        except ValueError:
            shown = unusable.path.name
        raise ValueError(
            f"model folder '{name}': {shown} is not a readable JSON object of at most {limits.MAX_CONFIG_BYTES} "
            "bytes: replace it with the model's own config"
        ) from None
    except (OSError, RuntimeError):
        raise _unknown(name) from None
    from mosaic_core.models.adapters import adapter_for_class, denoiser_class_name, supported_classes

    what = f"model folder '{name}'"
    _check_scheduler_config(scheduler, f"{what} (scheduler config)")
    if denoiser is None:
        raise ValueError(
            f"{what} has no denoiser config: expected transformer/config.json or unet/config.json "
            f"(diffusers layout) or config.json, with a _class_name among {', '.join(supported_classes())}"
        )
    class_name = denoiser_class_name(denoiser)  # a legacy Transformer2DModel by its norm_type, as diffusers
    if not isinstance(class_name, str) or class_name not in supported_classes():
        # a class name is shown only when it looks like one (nothing else of a file is echoed)
        named = f" '{class_name}'" if isinstance(class_name, str) and class_name.isidentifier() and len(class_name) <= 80 else ""
        raise ValueError(f"{what}: unsupported denoiser class{named}: supported are {', '.join(supported_classes())}")
    adapter = adapter_for_class(class_name)
    if adapter.name == "dit":
        _check_fields(denoiser, _TRANSFORMER_INTS, {}, f"{what} (transformer config)")
    try:
        fields = adapter.spec_fields(denoiser, folder)
    except (KeyError, TypeError, IndexError, AttributeError):
        raise ValueError(f"{what}: its {class_name} config lacks fields or has fields of the wrong type") from None
    return ModelSpec(
        name=str(folder),
        description=f"local diffusers folder {folder}",
        scheduler_config=MappingProxyType(scheduler),
        source="folder",
        path=str(folder),
        family=adapter.name,
        **_folder_defaults(adapter, folder, fields),
    )


def _folder_defaults(adapter, folder: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """A local folder's spec fields with its defaults: what its family's adapter sets wins (Flux:
    no CFG, schnell's 4 steps), then its pipeline's own step count and, for text models, guidance
    (`_pipeline_defaults`), then 50 steps and CFG 5.0 (text) or 1.5 (class labels)."""
    own = _pipeline_defaults(folder)
    if adapter.conditioning != "text":
        own.pop("default_cfg", None)  # DiTPipeline's 4.0 is not what class-conditional FID is measured at
    return {"default_cfg": 5.0 if adapter.conditioning == "text" else ModelSpec.default_cfg, **own, **fields}
