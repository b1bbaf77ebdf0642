"""Registry and loading: built-in assets, local diffusers folders, hub ids, clear errors."""

import dataclasses
import shutil

import numpy as np
import pytest

from mosaic_core.models.loading import load_model
from mosaic_core.models.registry import resolve_model
from mosaic_core.conquer.sampling import SampleConfig, labels_for, run_to_end, sample_loaded


def test_builtin_digits_dit_loads_with_its_schedule():
    loaded = load_model("digits-dit", device="cpu")
    spec = loaded.spec
    assert spec.num_classes == 10 and not spec.latent and loaded.vae is None
    config = loaded.transformer.config
    assert (config.num_layers, config.num_attention_heads, config.attention_head_dim) == (6, 6, 32)
    assert spec.shape.num_tokens == (config.sample_size // config.patch_size) ** 2 == 64
    # the label table holds the null class used by classifier-free guidance
    assert loaded.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 11
    assert len(loaded.weights_hash) == 16


def test_local_folder_in_diffusers_layout_loads_and_samples(tiny_latent_folder):
    spec = resolve_model(str(tiny_latent_folder))
    assert spec.source == "folder" and spec.latent and spec.num_classes == 1000
    assert (spec.shape.num_layers, spec.shape.num_heads, spec.shape.head_dim, spec.shape.num_tokens) == (2, 2, 8, 16)
    loaded = load_model(spec, device="cpu")
    assert loaded.vae is not None
    result = run_to_end(sample_loaded(loaded, [1, 999], SampleConfig(num_inference_steps=3)))
    assert result.images.shape == (2, 16, 16, 3) and result.images.dtype == np.uint8


def test_hub_id_loads_from_models_dir_and_is_refused_clearly_when_absent(tiny_latent_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("MOSAIC_MODELS_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=r"weights not present: put a diffusers copy of 'facebook/DiT-XL-2-256'"):
        load_model("facebook/DiT-XL-2-256", device="cpu")
    shutil.copytree(tiny_latent_folder, tmp_path / "facebook" / "DiT-XL-2-256")
    loaded = load_model("facebook/DiT-XL-2-256", device="cpu")
    assert loaded.spec.path == str(tmp_path / "facebook" / "DiT-XL-2-256")
    assert loaded.transformer.config.num_embeds_ada_norm == 1000


def test_unknown_model_and_missing_builtin_weights_are_clear(tmp_path):
    with pytest.raises(ValueError, match=r"unknown model 'nope': choose one of digits-dit"):
        resolve_model("nope")
    missing = dataclasses.replace(resolve_model("digits-dit"), path=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match=r"run `python -m mosaic_core train`"):
        load_model(missing, device="cpu")
    (tmp_path / "empty").mkdir()
    # a folder without a scheduler config gets the same answer as a missing one (reveals nothing)
    with pytest.raises(ValueError, match=r"unknown model '.*empty': .*scheduler config"):
        resolve_model(str(tmp_path / "empty"))


@pytest.mark.slow
def test_shipped_digits_dit_draws_recognisable_digits():
    """Quality smoke test of the committed weights: few images, few steps, most are right."""
    from mosaic_core.conquer.metrics import class_accuracy

    loaded = load_model("digits-dit", device="cpu")
    labels = labels_for(30, 10)
    result = run_to_end(sample_loaded(loaded, labels, SampleConfig(num_inference_steps=20, guidance_scale=1.5, seed=0)))
    assert class_accuracy(result.images, labels) >= 0.8
