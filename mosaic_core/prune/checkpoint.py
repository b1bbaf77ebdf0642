"""Pruned checkpoints: a folder of safetensors plus a JSON manifest, rebuilt on the base model.

A pruned DiT cannot round-trip through `from_pretrained` (its config has one global head
count), so a checkpoint stores only what pruning changed and how to rebuild the shapes:

    manifest.json           format, versions, base model + hash of its weights, the plan,
                            the prune config, measured c_x, per stage the network it uses,
                            per network the kept heads/units of every block and the
                            SHA-256 of its tensor file
    network_<k>.safetensors the OBS-solved kept-column weights of the layers that lost
                            groups (q/k/v/fc1 rows and biases are slices of the base)

Stages with nothing removed point at the base network (`"network": null`). Loading
refuses a manifest of another base model or format, and a tensor file whose hash or
shapes do not match. Writes are atomic: the folder appears complete or not at all.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import torch

from mosaic_core.atomic import replace_folder, write_json

FORMAT = "mosaicdiff-pruned"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def _versions() -> dict[str, str]:
    import diffusers

    from mosaic_core import __version__

    return {"mosaic_core": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_for(result, loaded, extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[dict[str, torch.Tensor]]]:
    """The manifest and the tensors of each distinct network of a `PruneResult`."""
    networks: list[dict[str, Any]] = []
    tensors: list[dict[str, torch.Tensor]] = []
    stage_network: list[int | None] = []
    seen: dict[int, int] = {}
    for spec, module in zip(result.stage_networks, result.staged.networks()):
        if spec is None:
            stage_network.append(None)
            continue
        if id(module) not in seen:
            keeps, weights = spec
            seen[id(module)] = len(networks)
            networks.append({"file": f"network_{len(networks)}.safetensors", "keep": [k.to_dict() for k in keeps]})
            tensors.append({name: w.detach().to("cpu", torch.float32).contiguous() for name, w in weights.items()})
        stage_network.append(seen[id(module)])
    plan = result.plan.to_dict()
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
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
        **(extra or {}),
    }
    return manifest, tensors


def save_pruned(result, loaded, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a pruned checkpoint folder atomically; returns its path."""
    from safetensors.torch import save_file

    manifest, tensors = manifest_for(result, loaded, extra)
    folder = Path(folder)
    with replace_folder(folder) as tmp:
        for network, weights in zip(manifest["networks"], tensors):
            path = tmp / network["file"]
            save_file(weights, str(path), metadata={"format": FORMAT})
            network["sha256"] = _sha256(path)
        write_json(tmp / MANIFEST, manifest)
    return folder


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a checkpoint folder, or ValueError saying what is wrong with it."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ValueError(f"'{folder}' is not a pruned checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"damaged manifest {path}: {error}") from error
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} is not a {FORMAT} v{FORMAT_VERSION} manifest "
            f"(found format={manifest.get('format')!r}, version={manifest.get('format_version')!r})"
        )
    return manifest


def load_pruned(folder: str | Path, loaded):
    """Rebuild the `StagedDiT` of a checkpoint on the loaded base model (checked first)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mosaic_core.divide.plan import Plan
    from mosaic_core.prune.stage_pruning import build_staged
    from mosaic_core.prune.surgery import BlockKeep

    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest["base_model"] != loaded.spec.name or manifest["base_weights_hash"] != loaded.weights_hash:
        raise ValueError(
            f"checkpoint {folder} was pruned from '{manifest['base_model']}' (weights {manifest['base_weights_hash']}), "
            f"not from the loaded '{loaded.spec.name}' (weights {loaded.weights_hash}): prune this model again"
        )
    networks = []
    from mosaic_core.models.adapters import adapter_for_model

    num_blocks = len(adapter_for_model(loaded.transformer).block_paths(loaded.transformer))
    for network in manifest["networks"]:
        path = folder / network["file"]
        if not path.is_file():
            raise ValueError(f"damaged checkpoint {folder}: {network['file']} is missing")
        if _sha256(path) != network.get("sha256"):
            raise ValueError(f"damaged checkpoint {folder}: {network['file']} does not match its SHA-256 in the manifest")
        try:
            weights = load_file(str(path), device=str(loaded.device))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"damaged checkpoint {folder}: cannot read {network['file']}: {error}") from error
        keeps = [BlockKeep.from_dict(k) for k in network["keep"]]
        if len(keeps) != num_blocks:
            raise ValueError(f"checkpoint {folder} has {len(keeps)} blocks, the base model has {num_blocks}")
        networks.append((keeps, {k: v.to(loaded.dtype) for k, v in weights.items()}))
    stage_networks = [None if s["network"] is None else networks[s["network"]] for s in manifest["stages"]]
    plan = Plan.from_dict(manifest["plan"])
    try:
        return build_staged(loaded.transformer, plan, stage_networks)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"checkpoint {folder} does not fit the base model: {error}") from error

