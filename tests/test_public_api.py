"""The Python API a script imports: `import mosaic_core as mc` and the README's example."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


def test_importing_the_package_imports_no_torch():
    code = "import sys, mosaic_core; assert 'torch' not in sys.modules, 'torch imported'; print(len(mosaic_core.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) >= 15


def test_every_export_resolves():
    import mosaic_core as mc

    for name in mc.__all__:
        assert getattr(mc, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mc.nope  # noqa: B018


def test_readme_flow_plan_prune_save_load_compare(tiny_pixel_folder, tmp_path):
    """Plan → prune → save → load → compare through the top-level API equals the engine's own path."""
    import mosaic_core as mc

    dense = mc.load_model(str(tiny_pixel_folder), device="cpu")
    plan = mc.build_plan(dense.spec, num_inference_steps=6, sparsity=0.4)
    config = mc.PruneConfig(mc.CalibrationConfig(size=16, batch_size=8, source="samples", sample_steps=3))
    result = mc.prune_model(dense, plan, config)
    folder = mc.save_pruned(result, dense, tmp_path / "ckpt")
    staged = mc.load_pruned(folder, dense)
    assert isinstance(staged, mc.StagedDiT)
    x = torch.randn(2, 1, 8, 8)
    for t in (900, 300, 10):
        timestep = torch.full((2,), t)
        labels = torch.tensor([1, 2])
        assert torch.equal(staged(x, timestep=timestep, class_labels=labels).sample,
                           result.staged(x, timestep=timestep, class_labels=labels).sample)
    rows = mc.compare(dense, mc.dense_and_staged(dense.transformer, staged, plan), [0, 1], mc.SampleConfig(num_inference_steps=6))
    assert [row.name for row in rows] == ["dense", "staged"]
    assert rows[1].macs < rows[0].macs and rows[1].psnr is not None
