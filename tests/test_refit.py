"""Refit (prune/refit.py): the least-squares weights on the pruned network's own inputs.

The reference is an explicit least-squares solve (torch.linalg.lstsq) on the stacked
calibration tokens, gathered here by hooks of the test's own; the refit accumulates
normal equations batch by batch, so the two agree only if the accumulation is right.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_cli, tiny_pixel_dit
from mosaic_core.prune.refit import refit_targets, refit_weights
from mosaic_core.prune.surgery import BlockKeep, sliced_model

KEEPS = [BlockKeep(heads=(0, 2, 3), units=tuple(range(0, 128, 2))), BlockKeep(heads=(1, 2), units=tuple(range(40, 128)))]


def batches(seed: int, count: int = 3, rows: int = 5):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(rows, 1, 8, 8, generator=generator), torch.randint(0, 1000, (rows,), generator=generator),
         torch.randint(0, 11, (rows,), generator=generator))
        for _ in range(count)
    ]


def run(model, x, t, y):
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


def gather(dense, pruned, data, name):
    """Stacked pruned-layer inputs and dense-layer outputs of `name` over `data`."""
    got = {"x": [], "y": []}
    h1 = dict(dense.named_modules())[name].register_forward_hook(lambda m, a, o: got["y"].append(o.reshape(-1, o.shape[-1])))
    h2 = dict(pruned.named_modules())[name].register_forward_pre_hook(lambda m, a: got["x"].append(a[0].reshape(-1, a[0].shape[-1])))
    for x, t, y in data:
        run(dense, x, t, y)
        run(pruned, x, t, y)
    h1.remove()
    h2.remove()
    return torch.cat(got["x"]).double(), torch.cat(got["y"]).double()


def test_refit_is_the_least_squares_fit_on_the_pruned_inputs():
    dense = tiny_pixel_dit(3)
    pruned = sliced_model(dense, KEEPS)
    data = batches(7)
    solved = refit_weights(dense, pruned, data, damping=1e-9, rows=2)  # micro-batches of 2 rows: accumulation across calls
    assert sorted(solved) == sorted(
        f"transformer_blocks.{b}.{layer}{suffix}" for b in (0, 1) for layer in ("attn1.to_out.0", "ff.net.2") for suffix in ("", ".bias")
    )
    for name in refit_targets(dense, pruned):
        x, target = gather(dense, pruned, data, name)
        design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        reference = torch.linalg.lstsq(design, target).solution  # (kept + 1) × out
        assert torch.allclose(solved[name].double(), reference[:-1].T, atol=2e-3, rtol=1e-3), name
        assert torch.allclose(solved[name + ".bias"].double(), reference[-1], atol=2e-3, rtol=1e-3), name


def test_refit_brings_the_pruned_network_closer_to_dense_and_leaves_dense_alone():
    dense = tiny_pixel_dit(4)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    pruned = sliced_model(dense, KEEPS)
    refit = sliced_model(dense, KEEPS, refit_weights(dense, pruned, batches(11, count=6, rows=8)))
    held_out = batches(99, count=2, rows=8)
    error = {
        label: sum(float((run(model, *b) - run(dense, *b)).pow(2).mean()) for b in held_out)
        for label, model in (("sliced", pruned), ("refit", refit))
    }
    assert error["refit"] < 0.8 * error["sliced"], error
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())  # shared biases not overwritten
    bias = "transformer_blocks.0.ff.net.2.bias"
    assert dict(refit.named_parameters())[bias] is not dict(dense.named_parameters())[bias]


def test_every_sliced_layer_is_refit_the_dense_model_never_and_a_bad_bias_is_refused():
    dense = tiny_pixel_dit(5)
    keeps = [BlockKeep(heads=(0, 1, 2, 3), units=tuple(range(128))), KEEPS[1]]  # block 0 keeps all: its inputs still change
    pruned = sliced_model(dense, keeps)
    assert refit_targets(dense, pruned) == [
        f"transformer_blocks.{b}.{layer}" for b in (0, 1) for layer in ("attn1.to_out.0", "ff.net.2")
    ]
    assert refit_targets(dense, dense) == [] and refit_weights(dense, dense, batches(1)) == {}
    with pytest.raises(ValueError, match="refit bias"):
        sliced_model(dense, keeps, {"transformer_blocks.0.ff.net.2.bias": torch.zeros(7)})
    with pytest.raises(ValueError, match="refit damping"):
        refit_weights(dense, pruned, batches(1), damping=0.0)


def test_prune_refits_by_default_writes_v4_and_no_refit_writes_v2(tiny_pixel_folder, tmp_path):
    from mosaic_core.models.loading import load_model
    from mosaic_core.prune.checkpoint import load_pruned

    common = ["prune", "--model", str(tiny_pixel_folder), "--sparsity", "0.4", "--steps", "10", "--calib-size", "16"]
    for extra, out in (((), "refit"), (("--no-refit",), "obs")):
        done = run_cli(*common, *extra, "--out", str(tmp_path / out))
        assert done.returncode == 0, done.stderr
    refit = json.loads((tmp_path / "refit" / "manifest.json").read_text())
    obs = json.loads((tmp_path / "obs" / "manifest.json").read_text())
    assert (refit["format_version"], refit["prune"].get("refit")) == (4, True)
    assert (obs["format_version"], obs["prune"].get("refit")) == (2, None)
    loaded = load_model(str(tiny_pixel_folder))
    x, t, y = batches(5, count=1, rows=4)[0]
    t = torch.full((4,), 900)  # the early stage: pruned at this sparsity
    a, b = run(load_pruned(tmp_path / "refit", loaded), x, t, y), run(load_pruned(tmp_path / "obs", loaded), x, t, y)
    assert not torch.allclose(a, b) and math.isfinite(float(a.abs().sum()))
    done = run_cli(*common, "--stages", "4", "--refit", "--out", str(tmp_path / "k"))
    assert done.returncode == 2 and "--refit is done for three stages" in done.stderr
