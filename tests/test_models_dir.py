"""The models directory: which folders the studio's picker lists (configs only, no weights needed)."""

from __future__ import annotations

import json

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
