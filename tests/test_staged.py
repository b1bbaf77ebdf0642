"""StagedDiT: routing by timestep (boundaries, floats, mixed batches), dense equivalence, memory."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from mosaic_core.conquer.staged_denoiser import StagedDiT, memory_ledger, param_count
from mosaic_core.prune.surgery import BlockKeep, sliced_model
from conftest import tiny_pixel_dit

T_MIN, T_MAX = 300, 600


def tiny_dit(seed: int = 0):
    return tiny_pixel_dit(seed)


@pytest.fixture(scope="module")
def networks():
    dense = tiny_dit()
    early = sliced_model(dense, [BlockKeep((0,), tuple(range(0, 128, 4)))] * 2)  # heavily pruned
    middle = sliced_model(dense, [BlockKeep((0, 1, 2), tuple(range(0, 128, 1)))] * 2)  # lightly pruned
    late = sliced_model(dense, [BlockKeep((1, 3), tuple(range(1, 128, 2)))] * 2)
    return dense, early, middle, late


def run(model, x, t, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


def batch(timesteps, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    t = torch.as_tensor(timesteps)
    x = torch.randn(t.shape[0], 1, 8, 8, generator=generator)
    y = torch.randint(0, 10, (t.shape[0],), generator=generator)
    return x, t, y


@pytest.mark.parametrize(
    ("timestep", "stage"),
    [
        (999, "early"), (T_MAX + 1, "early"), (T_MAX, "middle"), (T_MIN, "middle"), (T_MIN - 1, "late"), (0, "late"),
        (T_MAX + 0.4, "middle"), (T_MAX + 0.5, "early"), (T_MIN - 0.5, "middle"), (T_MIN - 0.6, "late"),
    ],
)
def test_picks_the_stage_network(networks, timestep, stage):
    dense, early, middle, late = networks
    staged = StagedDiT(early, middle, late, T_MIN, T_MAX)
    x, t, y = batch([timestep, timestep])
    out = run(staged, x, t, y)
    assert staged.stage_calls == [stage]
    expected = run({"early": early, "middle": middle, "late": late}[stage], x, t, y)
    assert torch.equal(out, expected)


def test_the_three_networks_differ(networks):
    _, early, middle, late = networks
    x, t, y = batch([450, 450])
    outputs = [run(network, x, t, y) for network in (early, middle, late)]
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])
    assert not torch.allclose(outputs[0], outputs[2])


def test_mixed_batch_is_split_and_reassembled_in_order(networks):
    dense, early, middle, late = networks
    staged = StagedDiT(early, middle, late, T_MIN, T_MAX)
    timesteps = [10, 900, 450, 601, 300, 299.6, 0]
    stages = ["late", "early", "middle", "early", "middle", "middle", "late"]
    x, t, y = batch(torch.tensor(timesteps, dtype=torch.float32))
    out = run(staged, x, t, y)
    assert out.shape == x.shape
    assert staged.stage_calls == ["early", "middle", "late"]
    for name, network in (("early", early), ("middle", middle), ("late", late)):
        rows = torch.tensor([i for i, s in enumerate(stages) if s == name])
        assert torch.equal(out[rows], run(network, x[rows], t[rows], y[rows]))
    staged.reset_stage_calls()
    assert staged.stage_calls == []
    tuple_out = staged(x, timestep=t, class_labels=y, return_dict=False)
    assert isinstance(tuple_out, tuple) and torch.equal(tuple_out[0], out)


def test_dense_in_every_stage_is_bit_identical(networks):
    dense = networks[0]
    staged = StagedDiT(dense, dense, dense, T_MIN, T_MAX)
    x, t, y = batch([999, 450, 3, 700])
    assert torch.equal(run(staged, x, t, y), run(dense, x, t, y))
    assert staged.stage_calls == ["early", "middle", "late"]
    ledger = memory_ledger(dense, staged)
    assert ledger.staged_bytes == ledger.dense_bytes and ledger.naive_bytes == 3 * ledger.dense_bytes
    assert param_count(staged) == param_count(dense)


def test_looks_like_the_dense_transformer(networks):
    dense, early, middle, late = networks
    staged = StagedDiT(early, middle, late, T_MIN, T_MAX)
    assert staged.config is dense.config
    assert staged.config.in_channels == 1 and staged.config.sample_size == 8
    assert staged.dtype == dense.dtype == torch.float32
    assert staged.device == dense.device
    assert staged.eval() is staged and not staged.training


def test_sampling_loop_switches_stages_like_the_schedule(networks):
    dense, early, middle, late = networks
    staged = StagedDiT(early, middle, late, T_MIN, T_MAX)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(6)  # 833, 666 early; 500, 333 middle; 166, 0 late
    sample = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = staged(sample, timestep=t.expand(2), class_labels=labels).sample
            sample = scheduler.step(eps, t, sample).prev_sample
    expected = ["early" if t > T_MAX else "late" if t < T_MIN else "middle" for t in scheduler.timesteps.tolist()]
    assert staged.stage_calls == expected == ["early"] * 2 + ["middle"] * 2 + ["late"] * 2
    assert torch.isfinite(sample).all()


def test_memory_ledger_counts_shared_modules_once(networks):
    dense, early, middle, late = networks
    staged = StagedDiT(early, middle, late, T_MIN, T_MAX)
    ledger = memory_ledger(dense, staged)
    assert ledger.dense_bytes <= ledger.staged_bytes < ledger.naive_bytes
    assert ledger.stage_params == (param_count(early), param_count(middle), param_count(late))
    assert ledger.stage_params[0] < ledger.stage_params[1] < param_count(dense)
    # staged = shared part once + each stage's own pruned weights
    shared = {id(p) for p in dense.parameters()} & {id(p) for p in early.parameters()}
    shared_bytes = sum(p.numel() * p.element_size() for p in dense.parameters() if id(p) in shared)
    own = sum(
        p.numel() * p.element_size() for n in (early, middle, late) for p in n.parameters() if id(p) not in shared
    )
    assert ledger.staged_bytes == shared_bytes + own
    assert ledger.naive_over_dense > ledger.staged_over_dense


def test_validation(networks):
    dense = networks[0]
    with pytest.raises(ValueError, match=r"0 <= t_min <= t_max"):
        StagedDiT(dense, dense, dense, 600, 300)
    staged = StagedDiT(dense, dense, dense, T_MIN, T_MAX)
    x, t, y = batch([1, 2])
    with pytest.raises(ValueError, match="needs a timestep"):
        staged(x, timestep=None, class_labels=y)
    with pytest.raises(ValueError, match="finite"):
        staged(x, timestep=torch.tensor([float("nan"), 1.0]), class_labels=y)
