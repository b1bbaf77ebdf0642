"""The models directory: which folders the studio's picker lists (configs only, no weights needed)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from mosaic_core.models.registry import MODELS_DIR_ENV, local_model_folders, resolve_model

SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
DIT = {"_class_name": "DiTTransformer2DModel", "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4,
       "out_channels": 4, "num_layers": 2, "sample_size": 8, "patch_size": 2, "num_embeds_ada_norm": 10}


def _pipeline_folder(folder, denoiser="transformer"):
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    (folder / denoiser).mkdir()
    (folder / denoiser / "config.json").write_text(json.dumps(DIT))


def test_the_models_directory_lists_model_folders_but_not_registry_copies(tmp_path, monkeypatch):
    root = tmp_path / "models"
    _pipeline_folder(root / "my-dit")
    _pipeline_folder(root / "someone" / "their-dit")  # <owner>/<name>
    _pipeline_folder(root / "facebook--DiT-XL-2-256")  # a registry entry's weights: listed as that entry
    _pipeline_folder(root / "stabilityai" / "stable-diffusion-xl-base-1.0")
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a model")
    (root / "half").mkdir()
    (root / "half" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))  # no denoiser config
    monkeypatch.setenv(MODELS_DIR_ENV, str(root))
    listed = [folder for folder in local_model_folders() if root in folder.parents]
    assert listed == [root / "my-dit", root / "someone" / "their-dit"]
    assert resolve_model(str(listed[0])).conditioning == "class"
    assert resolve_model("facebook/DiT-XL-2-256").path == str(root / "facebook--DiT-XL-2-256")


def _flux_schnell_copy(root):
    """Where `flux-schnell`'s weights are looked for in the models directory `root` (`<owner>/<name>`)."""
    return root / resolve_model("flux-schnell").hub_id


def test_a_registry_copy_whose_config_contradicts_the_shipped_one_is_refused_in_one_line(tmp_path, monkeypatch):
    """A real tiny Flux saved under FLUX.1-schnell's hub id: an `error:` line naming the field and both
    values, from the registry, the CLI and the studio alike (not a shape error deep in sampling)."""
    from conftest import run_cli
    from diffusers import FluxPipeline
    from tiny_joint import tiny_flux_parts

    from ui.engine import StudioEngine

    root = tmp_path / "models"
    copy = _flux_schnell_copy(root)
    FluxPipeline(**tiny_flux_parts(tmp_path / "tokenizers", guidance=False)).save_pretrained(copy)
    monkeypatch.setenv(MODELS_DIR_ENV, str(root))
    expected = (
        rf"registry entry 'flux-schnell' does not match its local copy {re.escape(str(copy))}: "
        r"'num_layers' is 19 in the shipped config "
        r"\(assets/configs/flux-schnell/transformer_config\.json\) but 2 in the folder's transformer/config\.json; "
    )
    with pytest.raises(ValueError, match=expected):
        resolve_model("flux-schnell")
    result = run_cli("plan", "--model", "flux-schnell", "--sparsity", "0.3")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and re.match("error: " + expected, result.stderr)
    engine = StudioEngine(cache_root=tmp_path / "cache", local_model_roots=())
    try:
        with pytest.raises(ValueError, match=expected):
            engine.resolve("flux-schnell")
    finally:
        engine.jobs.shutdown()


def test_a_registry_copy_with_the_shipped_config_resolves_as_before_and_a_dit_copy_gives_its_shape(tmp_path, monkeypatch):
    """The folder's config is the truth: equal to the shipped one, the spec is the entry's with the folder's
    path; a DiT-XL/2 entry (no shipped config) takes the shape of the copy found under its name."""
    from conftest import run_cli

    from mosaic_core.models.registry import ASSETS_DIR

    root = tmp_path / "models"
    monkeypatch.setenv(MODELS_DIR_ENV, str(root))
    shipped = resolve_model("flux-schnell")
    assert shipped.path is None
    copy = _flux_schnell_copy(root)
    for shipped_file, copied in (("scheduler_config.json", "scheduler"), ("transformer_config.json", "transformer")):
        (copy / copied).mkdir(parents=True)
        text = (ASSETS_DIR / "configs" / "flux-schnell" / shipped_file).read_text()
        (copy / copied / ("config.json" if copied == "transformer" else shipped_file)).write_text(text)
    assert resolve_model("flux-schnell") == dataclasses.replace(shipped, path=str(copy))
    assert run_cli("plan", "--model", "flux-schnell", "--sparsity", "0.3").returncode == 0
    _pipeline_folder(root / "facebook--DiT-XL-2-256")  # a 2-layer DiT: planned, measured and sampled as what it is
    spec = resolve_model("facebook/DiT-XL-2-256")
    shape = spec.shape
    assert (shape.num_layers, shape.num_heads, shape.head_dim, spec.num_classes, spec.sample_size) == (2, 2, 8, 10, 8)
    assert spec.name == "facebook/DiT-XL-2-256" and spec.path == str(root / "facebook--DiT-XL-2-256")
