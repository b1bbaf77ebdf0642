"""Pruned checkpoints: a folder of safetensors plus a JSON manifest, rebuilt on the base model.

A pruned DiT cannot round-trip through `from_pretrained` (its config has one global head
count), so a checkpoint stores only what pruning changed and how to rebuild the shapes:

    manifest.json           format, versions, base model + hash of its weights, the plan,
                            the prune config, measured c_x, per stage the network it uses,
                            per network the kept heads/units of every block and the
                            SHA-256 of its tensor file, and (v2) `content_sha256`
    network_<k>.safetensors the OBS-solved kept-column weights of the layers that lost
                            groups (q/k/v/fc1 rows and biases are slices of the base)

Stages with nothing removed point at the base network (`"network": null`).

Format v3 holds K ≥ 2 stages (`prune --stages K`): `plan` is a `KStagePlan` (kind
"k-stage", its cuts, timesteps and per-stage kept counts), `num_stages` is K and the
stages are named "stage 0" (noisiest) … "stage K−1"; the rest is v2's, digest included.
It loads as a `MultiStageDenoiser`. Three-stage checkpoints stay v2, so earlier readers
keep reading them.

Format v4 is v2 whose network files also hold refit biases (`prune`'s default refit,
prune/refit.py): besides each sliced layer's kept weight, a tensor "<layer>.bias" replaces
that layer's shared dense bias. A reader that knew only v2 would not apply them, so such a
checkpoint says v4; a prune without refit still writes v2.

Integrity. Format v2 adds `content_sha256`: the SHA-256 of the manifest's canonical JSON
(sorted keys, no spaces) without that field. Since the manifest holds every tensor file's
SHA-256, the digest covers the whole checkpoint: an edited field (two stages' networks
swapped, a stage boundary moved) or a changed tensor file is refused. Version 1 manifests
(no digest) are still read; for them what they carry is checked: the tensor hashes, the
schema, and that the stage ranges and kept counts agree with the stored plan.

Loading refuses, with a ValueError saying what is wrong, a malformed manifest (missing
keys, wrong types, a `file` that is not a plain `network_<k>.safetensors` name), another
base model or format, and a tensor file whose hash or shapes do not match. Writes are
atomic (the folder appears complete or not at all) and never replace a folder holding
files a checkpoint does not own.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import re
from pathlib import Path
from typing import Any

import torch

from mosaic_core.atomic import check_output_folder, replace_folder, sha256_file, write_json

FORMAT = "mosaicdiff-pruned"
FORMAT_VERSION = 2  # v2: content_sha256 over the whole manifest (v1 had per-file hashes only)
K_STAGE_FORMAT_VERSION = 3  # v3: K ≥ 2 stages of a `KStagePlan`; three-stage checkpoints are still written as v2
REFIT_FORMAT_VERSION = 4  # v4: v2 whose network files may hold refit biases "<layer>.bias" (prune/refit.py)
READABLE_VERSIONS = (1, 2, 3, 4)
MANIFEST = "manifest.json"
DIGEST_FIELD = "content_sha256"
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few hundred kB even for DiT-XL/2
_NETWORK_FILE = re.compile(r"^network_\d{1,6}\.safetensors$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def owns_entry(path: Path) -> bool:
    """Whether a folder entry is one a checkpoint writes (its manifest or a network tensor file)."""
    return path.is_file() and not path.is_symlink() and (path.name == MANIFEST or bool(_NETWORK_FILE.match(path.name)))


def check_checkpoint_folder(folder: Any, what: str = "--out") -> Path:
    """A folder a checkpoint may be written to (new, empty, or an earlier checkpoint), or ValueError."""
    return check_output_folder(folder, owns_entry, what)


def content_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON without `content_sha256` (covers the tensor hashes too)."""
    body = {key: value for key, value in manifest.items() if key != DIGEST_FIELD}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _versions() -> dict[str, str]:
    import diffusers

    from mosaic_core import __version__

    return {"mosaic_core": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()}


def manifest_for(result, loaded, extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[dict[str, torch.Tensor]]]:
    """The manifest and the tensors of each distinct network of a `PruneResult`."""
    networks, tensors, stage_network = _distinct_networks(result.stage_networks, result.staged.networks())
    plan = result.plan.to_dict()
    refit = any(name.endswith(".bias") for weights in tensors for name in weights)
    manifest = {
        "format": FORMAT,
        "format_version": REFIT_FORMAT_VERSION if refit else FORMAT_VERSION,
        "base_model": loaded.spec.name,
        "base_weights_hash": loaded.weights_hash,
        "plan": plan,
        "prune": result.config.to_dict(),
        "cx": result.cx,
        "stages": [
            {"name": stage["name"], "network": index, "t_min": stage["t_min"], "t_max": stage["t_max"]}
            for stage, index in zip(plan["stages"], stage_network)
        ],
        "networks": networks,
        "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
        "versions": _versions(),
        **({"measured_allocation": result.measured.to_dict()} if getattr(result, "measured", None) is not None else {}),
        **(extra or {}),
    }
    return manifest, tensors


def save_pruned(result, loaded, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a pruned checkpoint folder atomically; returns its path.

    `folder` must be new, empty or an earlier checkpoint (ValueError otherwise, nothing written).
    """
    folder = check_checkpoint_folder(folder, "checkpoint folder")
    manifest, tensors = manifest_for(result, loaded, extra)
    return _write(folder, manifest, tensors)


def _distinct_networks(record, modules) -> tuple[list[dict[str, Any]], list[dict[str, torch.Tensor]], list[int | None]]:
    """Networks (file name, kept heads/units), their tensors, and each stage's network index (None: dense)."""
    networks: list[dict[str, Any]] = []
    tensors: list[dict[str, torch.Tensor]] = []
    stage_network: list[int | None] = []
    seen: dict[int, int] = {}
    for spec, module in zip(record, modules):
        if spec is None:
            stage_network.append(None)
            continue
        if id(module) not in seen:
            keeps, weights = spec
            seen[id(module)] = len(networks)
            networks.append({"file": f"network_{len(networks)}.safetensors", "keep": [k.to_dict() for k in keeps]})
            tensors.append({name: w.detach().to("cpu", torch.float32).contiguous() for name, w in weights.items()})
        stage_network.append(seen[id(module)])
    return networks, tensors, stage_network


def save_k_stages(denoiser, record, plan, config, cx: float, loaded, folder: str | Path, seconds: dict | None = None,
                  extra: dict[str, Any] | None = None) -> Path:
    """Write the K-stage result of `prune_k_stages` (its `record`) as a v3 checkpoint; returns the folder."""
    folder = check_checkpoint_folder(folder, "checkpoint folder")
    if len(record) != plan.num_stages:
        raise ValueError(f"{len(record)} recorded stages for a {plan.num_stages}-stage plan")
    networks, tensors, stage_network = _distinct_networks(record, denoiser.networks())
    manifest = {
        "format": FORMAT,
        "format_version": K_STAGE_FORMAT_VERSION,
        "base_model": loaded.spec.name,
        "base_weights_hash": loaded.weights_hash,
        "num_stages": plan.num_stages,
        "plan": plan.to_dict(),
        "prune": config.to_dict(),
        "cx": float(cx),
        "stages": [
            {"name": f"stage {i}", "network": index, "t_min": None if r is None else r[0], "t_max": None if r is None else r[1]}
            for i, (r, index) in enumerate(zip(plan.partition.ranges, stage_network))
        ],
        "networks": networks,
        "seconds": {k: round(float(v), 3) for k, v in (seconds or {}).items()},
        "versions": _versions(),
        **(extra or {}),
    }
    return _write(folder, manifest, tensors)


def _write(folder: Path, manifest: dict[str, Any], tensors: list[dict[str, torch.Tensor]]) -> Path:
    from safetensors.torch import save_file

    with replace_folder(folder, owns_entry) as tmp:
        for network, weights in zip(manifest["networks"], tensors):
            path = tmp / network["file"]
            save_file(weights, str(path), metadata={"format": FORMAT})
            network["sha256"] = sha256_file(path)
        manifest[DIGEST_FIELD] = content_digest(manifest)
        write_json(tmp / MANIFEST, manifest)
    return folder


def _damaged(where: Any, what: str) -> ValueError:
    return ValueError(f"damaged manifest {where}: {what}; prune again to rewrite it")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(x) for x in value)


def _check_networks(networks: list, where: Any, most: int) -> None:
    """Every network entry: a plain unique file name, a SHA-256, and kept heads/units per block."""
    if len(networks) > most:
        raise _damaged(where, f"it lists {len(networks)} networks, at most {most} allowed")
    files = set()
    for index, network in enumerate(networks):
        if not isinstance(network, dict):
            raise _damaged(where, f"networks[{index}] must be an object")
        file = network.get("file")
        if not isinstance(file, str) or not _NETWORK_FILE.match(file):
            raise _damaged(where, f"networks[{index}].file must be a plain name like network_0.safetensors (no folders, no '..')")
        if file in files:
            raise _damaged(where, f"networks[{index}].file repeats an earlier network's file")
        files.add(file)
        if not isinstance(network.get("sha256"), str) or not _SHA256.match(network["sha256"]):
            raise _damaged(where, f"networks[{index}].sha256 must be 64 hexadecimal digits")
        keep = network.get("keep")
        if not isinstance(keep, list) or not all(
            isinstance(k, dict) and _int_list(k.get("heads")) and _int_list(k.get("units")) for k in keep
        ):
            raise _damaged(where, f"networks[{index}].keep must be a list of {{heads: [ints], units: [ints]}}")


def _check_stage(stage: Any, index: int, name: str, expected, num_networks: int, where: Any) -> int | None:
    """One `stages` entry: an object named `name`, a network index or null, the plan's timesteps; its network."""
    if not isinstance(stage, dict) or stage.get("name") != name:
        raise _damaged(where, f"stages[{index}] must be an object named '{name}'")
    network = stage.get("network")
    if network is not None and not (_is_int(network) and 0 <= network < num_networks):
        raise _damaged(where, f"stages[{index}].network must be null or a network index in [0, {num_networks - 1}]")
    given = (stage.get("t_min"), stage.get("t_max"))
    if given != ((None, None) if expected is None else tuple(expected)):
        raise _damaged(where, f"stage '{name}' has timesteps {given}, its plan says {expected}")
    return network


def _validate_k_stages(manifest: dict[str, Any], where: Any) -> None:
    """A v3 manifest: its K-stage plan holds together, and each stage's network fits it."""
    from mosaic_core.divide.k_plan import KStagePlan

    networks, stages = manifest["networks"], manifest["stages"]
    try:
        plan = KStagePlan.from_dict(manifest["plan"])
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        raise _damaged(where, f"its K-stage plan is not valid ({type(error).__name__}: {str(error)[:200]})") from None
    if manifest.get("num_stages") != plan.num_stages or len(stages) != plan.num_stages:
        raise _damaged(where, f"it lists {len(stages)} stages and num_stages {str(manifest.get('num_stages'))[:20]}, its plan has {plan.num_stages}")
    a = plan.allocation
    for index, stage in enumerate(stages):
        name = f"stage {index}"
        network = _check_stage(stage, index, name, plan.partition.ranges[index], len(networks), where)
        heads, units = a.heads_kept[index], a.units_kept[index]
        removes = a.step_counts[index] > 0 and (heads < plan.shape.num_heads or units < plan.shape.mlp_hidden)
        if network is None:
            if removes:
                raise _damaged(where, f"stage '{name}' uses the dense network, its plan prunes it")
            continue
        kept = {(len(k["heads"]), len(k["units"])) for k in networks[network]["keep"]}
        if kept != {(heads, units)}:
            raise _damaged(where, f"stage '{name}' uses a network whose kept sizes differ from its plan ({heads} heads, {units} units)")


def validate_manifest(manifest: Any, where: Any = MANIFEST) -> dict[str, Any]:
    """Check a manifest's format, schema, file names, digest (v2) and plan consistency; ValueError if bad.

    Nothing of the manifest's content is echoed except small numbers and the names of fields.
    """
    from mosaic_core.divide.plan import Plan
    from mosaic_core.divide.stages import STAGE_NAMES

    if not isinstance(manifest, dict):
        raise _damaged(where, f"expected a JSON object, got {type(manifest).__name__}")
    found_format, found_version = manifest.get("format"), manifest.get("format_version")
    if found_format != FORMAT or not _is_int(found_version) or found_version not in READABLE_VERSIONS:
        raise ValueError(
            f"{where} is not a {FORMAT} manifest of a readable version ({', '.join(f'v{v}' for v in READABLE_VERSIONS)}); "
            f"found format={str(found_format)[:40]!r}, version={str(found_version)[:20]!r}"
        )
    required = {"base_model": str, "base_weights_hash": str, "plan": dict, "prune": dict, "stages": list, "networks": list}
    for key, kind in required.items():
        if key not in manifest:
            raise _damaged(where, f"the field '{key}' is missing")
        if not isinstance(manifest[key], kind):
            raise _damaged(where, f"the field '{key}' must be a {kind.__name__}, got {type(manifest[key]).__name__}")
    if found_version >= 2:
        digest = manifest.get(DIGEST_FIELD)
        if not isinstance(digest, str) or digest != content_digest(manifest):
            raise _damaged(where, f"its {DIGEST_FIELD} does not match its content (edited or corrupted)")
    networks, stages = manifest["networks"], manifest["stages"]
    if found_version == K_STAGE_FORMAT_VERSION:
        _check_networks(networks, where, len(stages))
        _validate_k_stages(manifest, where)
        return manifest
    _check_networks(networks, where, len(STAGE_NAMES))
    if len(stages) != len(STAGE_NAMES):
        raise _damaged(where, f"it lists {len(stages)} stages, {len(STAGE_NAMES)} expected")
    try:
        plan = Plan.from_dict(manifest["plan"])
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise _damaged(where, f"its plan is not valid ({type(error).__name__})") from None
    allocation = manifest["prune"].get("allocation", "per-stage")
    per_stage = allocation == "per-stage"
    for index, (name, stage) in enumerate(zip(STAGE_NAMES, stages)):
        network = _check_stage(stage, index, name, plan.bounds.ranges[index], len(networks), where)
        heads, units = plan.allocation.heads_kept[index], plan.allocation.units_kept[index]
        removes = plan.step_counts[index] > 0 and (heads < plan.shape.num_heads or units < plan.shape.mlp_hidden)
        if network is None:
            if removes and allocation != "measured":  # the measured rule may leave a stage dense
                raise _damaged(where, f"stage '{name}' uses the dense network, its plan prunes it")
        elif per_stage and plan.layer_keep_counts(index) is None:
            # homogeneous plans (DiT): every block keeps the plan's counts. Blockwise plans (a UNet's
            # levels differ) keep per-layer counts; the v2 content digest covers those.
            kept = {(len(k["heads"]), len(k["units"])) for k in networks[network]["keep"]}
            if kept != {(heads, units)}:
                raise _damaged(where, f"stage '{name}' uses a network whose kept sizes differ from its plan ({heads} heads, {units} units)")
    cx = manifest.get("cx", 0.0)
    if isinstance(cx, bool) or not isinstance(cx, (int, float)):
        raise _damaged(where, "the field 'cx' must be a number")
    if "seconds" in manifest and not (
        isinstance(manifest["seconds"], dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in manifest["seconds"].values())
    ):
        raise _damaged(where, "the field 'seconds' must map phases to finite numbers")
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The validated manifest of a checkpoint folder, or ValueError saying what is wrong with it."""
    path = Path(folder) / MANIFEST
    if not path.parent.is_dir():
        raise ValueError(f"pruned checkpoint '{folder}' does not exist: give the folder `prune --out` wrote")
    if not path.is_file():
        raise ValueError(f"'{folder}' is not a pruned checkpoint: {MANIFEST} is missing")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ValueError(f"damaged manifest {path}: larger than {MAX_MANIFEST_BYTES} bytes")
        manifest = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"damaged manifest {path}: not readable JSON ({type(error).__name__})") from None
    return validate_manifest(manifest, path)


def load_pruned(folder: str | Path, loaded):
    """Rebuild the `StagedDiT` of a checkpoint on the loaded base model (everything checked first).

    A v3 (K-stage) checkpoint comes back as a `MultiStageDenoiser`; both are called like the dense model.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mosaic_core.divide.plan import Plan
    from mosaic_core.prune.stage_pruning import build_staged
    from mosaic_core.prune.surgery import BlockKeep

    folder = Path(folder)
    manifest = read_manifest(folder)
    # The weights decide, not the name: a folder named by another path (relative, a copy, a
    # link) holds the same model when its safetensors hash the same.
    if manifest["base_weights_hash"] != loaded.weights_hash:
        raise ValueError(
            f"checkpoint {folder} was pruned from '{manifest['base_model'][:200]}' (weights {manifest['base_weights_hash'][:64]}), "
            f"not from the loaded '{loaded.spec.name}' (weights {loaded.weights_hash}): prune this model again"
        )
    networks = []
    from mosaic_core.models.adapters import adapter_for_model

    num_blocks = len(adapter_for_model(loaded.transformer).block_paths(loaded.transformer))
    for network in manifest["networks"]:
        path = folder / network["file"]
        if path.is_symlink() or not path.is_file():
            raise ValueError(f"damaged checkpoint {folder}: {network['file']} is missing")
        if sha256_file(path) != network["sha256"]:
            raise ValueError(f"damaged checkpoint {folder}: {network['file']} does not match its SHA-256 in the manifest")
        try:
            weights = load_file(str(path), device=str(loaded.device))
            keeps = [BlockKeep.from_dict(k) for k in network["keep"]]
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"damaged checkpoint {folder}: cannot read {network['file']} ({type(error).__name__})") from None
        if len(keeps) != num_blocks:
            raise ValueError(f"checkpoint {folder} has {len(keeps)} blocks, the base model has {num_blocks}")
        networks.append((keeps, {k: v.to(loaded.dtype) for k, v in weights.items()}))
    stage_networks = [None if s["network"] is None else networks[s["network"]] for s in manifest["stages"]]
    if manifest["format_version"] == K_STAGE_FORMAT_VERSION:
        return _k_stage_denoiser(folder, manifest, networks, loaded)
    plan = Plan.from_dict(manifest["plan"])
    try:
        return build_staged(loaded.transformer, plan, stage_networks)
    except (RuntimeError, ValueError, KeyError, IndexError) as error:
        raise ValueError(f"checkpoint {folder} does not fit the base model: {error}") from error


def _k_stage_denoiser(folder: Path, manifest: dict[str, Any], networks: list, loaded):
    """The `MultiStageDenoiser` of a v3 checkpoint: each distinct network sliced once, dense stages the base model."""
    from mosaic_core.conquer.multistage_denoiser import MultiStageDenoiser
    from mosaic_core.divide.k_plan import KStagePlan
    from mosaic_core.prune.surgery import sliced_model

    plan = KStagePlan.from_dict(manifest["plan"])
    try:
        built = [sliced_model(loaded.transformer, keeps, weights) for keeps, weights in networks]
    except (RuntimeError, ValueError, KeyError, IndexError) as error:
        raise ValueError(f"checkpoint {folder} does not fit the base model: {error}") from error
    modules = [loaded.transformer if s["network"] is None else built[s["network"]] for s in manifest["stages"]]
    return MultiStageDenoiser(modules, plan.partition)
