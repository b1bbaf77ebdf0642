"""The family interface on DiT, and the edges: unknown classes and folders are refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from mosaic_core.models.adapters import ClassCondition, adapter_for_class, adapter_for_model, supported_classes
from mosaic_core.models.registry import resolve_model
from mosaic_core.prune.hessian import prunable_layers


def test_dit_adapter_finds_the_blocks_and_layers_by_module_path():
    from conftest import tiny_pixel_dit

    model = tiny_pixel_dit(num_layers=3)
    adapter = adapter_for_model(model)
    assert adapter.name == "dit" and adapter.block_paths(model) == [f"transformer_blocks.{i}" for i in range(3)]
    layers = prunable_layers(model)
    assert [(l.block, l.kind, l.name) for l in layers[:2]] == [
        (0, "attn", "transformer_blocks.0.attn1.to_out.0"),
        (0, "mlp", "transformer_blocks.0.ff.net.2"),
    ]
    shape = adapter.shape_from_config(model.config)
    assert (shape.num_layers, shape.num_heads, shape.head_dim, shape.mlp_hidden) == (3, 4, 8, 128)
    assert all(l.num_groups == (4 if l.kind == "attn" else 128) for l in layers)


def test_class_condition_call_is_the_dit_call():
    from conftest import tiny_pixel_dit

    model = tiny_pixel_dit()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), torch.tensor([3, 7])
    condition = ClassCondition(y, 10)
    with torch.no_grad():
        assert torch.equal(model(x, timestep=t, **condition.model_kwargs()).sample, model(x, timestep=t, class_labels=y).sample)
    assert condition.null().labels.tolist() == [10, 10]


def test_unknown_denoiser_classes_are_refused_with_the_supported_list(tmp_path):
    assert {"DiTTransformer2DModel", "UNet2DConditionModel"} <= set(supported_classes())
    with pytest.raises(ValueError, match=r"unsupported denoiser class 'HunyuanDiT2DModel': supported are .*DiTTransformer2DModel"):
        adapter_for_class("HunyuanDiT2DModel")
    folder = tmp_path / "hunyuan"
    (folder / "transformer").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": 1000}))
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "HunyuanDiT2DModel"}))
    with pytest.raises(ValueError, match=r"unsupported denoiser class 'HunyuanDiT2DModel'.*UNet2DConditionModel"):
        resolve_model(str(folder))
    (folder / "transformer" / "config.json").unlink()
    with pytest.raises(ValueError, match=r"has no denoiser config: expected transformer/config.json or unet/config.json"):
        resolve_model(str(folder))


def test_a_folder_picks_its_family_from_the_class_name(tiny_latent_folder, tiny_sdxl_folder):
    dit = resolve_model(str(tiny_latent_folder))
    sdxl = resolve_model(str(tiny_sdxl_folder))
    assert (dit.family, dit.num_classes) == ("dit", 1000)
    assert (sdxl.family, sdxl.in_channels, sdxl.sample_size, sdxl.latent) == ("sdxl", 4, 16, True)
    assert sdxl.shape.num_layers == 8 and sdxl.shape.num_heads == 8 * (4 + 4) and sdxl.shape.mlp_hidden == 8 * 128
