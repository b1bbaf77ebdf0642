"""Layer Hessians: H = XᵀX/n at the pruned layers' inputs, hooks, progress and cancel."""

from __future__ import annotations

import pytest
import torch

from mosaic_core.prune.hessian import HessianAccumulator, PrunableLayer, collect_hessians, prunable_layers
from mosaic_core.jobs import Cancelled
from conftest import tiny_pixel_dit


def tiny_dit(seed: int = 0):
    return tiny_pixel_dit(seed)


def make_batches(count: int = 2, size: int = 3, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 1, 8, 8, generator=generator),
            torch.randint(0, 1000, (size,), generator=generator),
            torch.randint(0, 11, (size,), generator=generator),
        )
        for _ in range(count)
    ]


def all_hook_counts(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_prunable_layers_names_and_groups():
    layers = prunable_layers(tiny_dit())
    assert [layer.name for layer in layers] == [
        "transformer_blocks.0.attn1.to_out.0",
        "transformer_blocks.0.ff.net.2",
        "transformer_blocks.1.attn1.to_out.0",
        "transformer_blocks.1.ff.net.2",
    ]
    attn, mlp = layers[0], layers[1]
    assert (attn.kind, attn.group_size, attn.num_groups, attn.in_features) == ("attn", 8, 4, 32)
    assert (mlp.kind, mlp.group_size, mlp.num_groups, mlp.in_features) == ("mlp", 1, 128, 128)
    with pytest.raises(ValueError, match="kind"):
        PrunableLayer(0, "conv", "x", 1, 1)  # type: ignore[arg-type]


def test_hessian_equals_explicit_xtx_over_n():
    model = tiny_dit()
    batches = make_batches()
    layers = prunable_layers(model)
    modules = dict(model.named_modules())
    captured: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
    handles = [
        modules[name].register_forward_pre_hook(lambda m, args, name=name: captured[name].append(args[0].clone()))
        for name in captured
    ]
    with torch.no_grad():
        for x, t, y in batches:
            model(x, timestep=t, class_labels=y)
    for handle in handles:
        handle.remove()

    hessians = collect_hessians(model, batches)
    assert set(hessians) == set(captured)
    for name, inputs in captured.items():
        x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs]).double()  # (tokens, in)
        assert x.shape[0] == 2 * 3 * 16  # batches × samples × tokens (8/2)²
        expected = x.T @ x / x.shape[0]
        h = hessians[name]
        assert h.dtype == torch.float64
        torch.testing.assert_close(h, expected, rtol=1e-10, atol=1e-12)
        assert torch.equal(h, h.T)
        eigenvalues = torch.linalg.eigvalsh(h)
        assert eigenvalues.min() >= -1e-10 * eigenvalues.max()


def test_hooks_removed_progress_and_mode_restored():
    model = tiny_dit().train()
    before = all_hook_counts(model)
    progress: list[tuple[int, int | None]] = []
    collect_hessians(model, make_batches(3), on_progress=lambda done, total: progress.append((done, total)))
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert all_hook_counts(model) == before
    assert model.training  # restored after the eval-mode calibration

    progress.clear()
    collect_hessians(model, iter(make_batches(2)), on_progress=lambda done, total: progress.append((done, total)))
    assert progress == [(1, None), (2, None)]


def test_should_stop_raises_cancelled_and_removes_hooks():
    model = tiny_dit()
    before = all_hook_counts(model)
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 1  # stop before the second batch

    with pytest.raises(Cancelled):
        collect_hessians(model, make_batches(3), should_stop=should_stop)
    assert all_hook_counts(model) == before


def test_errors_inside_forward_remove_hooks():
    model = tiny_dit()
    before = all_hook_counts(model)
    bad = [(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]))]  # 3 channels, model has 1
    with pytest.raises(RuntimeError):
        collect_hessians(model, bad)
    assert all_hook_counts(model) == before


def test_layer_selection_and_validation():
    model = tiny_dit()
    hessians = collect_hessians(model, make_batches(1), layers=["transformer_blocks.1.ff.net.2"])
    assert list(hessians) == ["transformer_blocks.1.ff.net.2"]
    assert hessians["transformer_blocks.1.ff.net.2"].shape == (128, 128)
    with pytest.raises(ValueError, match="not a prunable layer"):
        collect_hessians(model, make_batches(1), layers=["transformer_blocks.0.attn1.to_q"])
    with pytest.raises(ValueError, match="empty"):
        collect_hessians(model, [])


def test_accumulator_lifecycle():
    accumulator = HessianAccumulator(4)
    with pytest.raises(ValueError, match="no calibration tokens"):
        accumulator.hessian()
    with pytest.raises(ValueError, match="end in 4 features"):
        accumulator.add_batch(torch.ones(2, 3))
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)  # (..., in)
    accumulator.add_batch(x)
    assert accumulator.count == 6
    flat = x.reshape(6, 4).double()
    torch.testing.assert_close(accumulator.hessian(), flat.T @ flat / 6)
    accumulator.reset()
    assert accumulator.count == 0
    accumulator.add_batch(x[0])
    torch.testing.assert_close(accumulator.hessian(), flat[:3].T @ flat[:3] / 3)
    accumulator.free()
    with pytest.raises(ValueError):
        accumulator.hessian()
