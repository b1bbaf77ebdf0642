"""cache-dit's DBCache on a real tiny diffusers DiT: off = dense, on = a hand-built reference, cost as counted by hooks."""

import numpy as np
import pytest
import torch

from conftest import LINEAR_SCHEDULER, tiny_pixel_dit
from mosaic_core.conquer.cache_dit_row import (
    CacheDiT, DBCacheSetting, match_threshold, parse_dbcache, probe_fraction, threshold_search,
)
from mosaic_core.conquer.sampling import SampleConfig, sample
from mosaic_core.jobs import run_to_end

TIMESTEPS = (900, 800, 700, 600, 500, 400)


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 1, 8, 8, generator=generator), torch.tensor([1, 7])


def _call(model, x, t, y):
    return model(x, timestep=torch.tensor([t, t]), class_labels=y).sample


def test_threshold_zero_never_skips_and_is_the_dense_model_bit_for_bit():
    model = tiny_pixel_dit(num_layers=4)
    x, y = _inputs()
    row = CacheDiT(model, DBCacheSetting(0.0, fn=1, bn=0, warmup=2), len(TIMESTEPS))
    with torch.no_grad():
        for t in TIMESTEPS:
            assert torch.equal(_call(row, x, t, y), _call(model, x, t, y))
    assert row.computed_fraction() == 1.0 and row.trajectories[0][0] == 6


def test_skipped_steps_equal_a_hand_built_residual_reference():
    # threshold 10: every step after the 2 warm-up steps skips blocks 1..3. Reference by
    # another mechanism, forward hooks on the dense model: at the last warm-up step record
    # block 0's output h₁ and block 3's output h₄; at a later step let every block run but
    # make block 3 return (block 0's output now) + (h₄ − h₁).
    model = tiny_pixel_dit(num_layers=4)
    blocks = model.transformer_blocks
    x, y = _inputs()
    row = CacheDiT(model, DBCacheSetting(10.0, fn=1, bn=0, warmup=2), len(TIMESTEPS))
    saved = {}

    def keep(name):
        def hook(module, args, out):
            saved[name] = out
        return hook

    def replace_last(module, args, out):
        return saved["first"] + saved["residual"]

    with torch.no_grad():
        got = [_call(row, x, t, y) for t in TIMESTEPS]
        handles = [blocks[0].register_forward_hook(keep("first")), blocks[3].register_forward_hook(keep("last"))]
        for t in TIMESTEPS[:2]:
            assert torch.equal(got[TIMESTEPS.index(t)], _call(model, x, t, y))  # warm-up: full steps
        saved["residual"] = saved["last"] - saved["first"]
        handles.append(blocks[3].register_forward_hook(replace_last))
        for i, t in enumerate(TIMESTEPS[2:], 2):
            torch.testing.assert_close(got[i], _call(model, x, t, y), rtol=1e-5, atol=1e-6)
        for handle in handles:
            handle.remove()
        dense_late = _call(model, x, TIMESTEPS[-1], y)
    assert not torch.allclose(got[-1], dense_late, atol=1e-4)  # the skip changed the output
    # 2 full steps × 4 blocks + 4 skipping steps × block 0 only, of 6 × 4
    assert row.computed_fraction() == (2 * 4 + 4 * 1) / (6 * 4)


def test_a_new_trajectory_reuses_nothing_from_the_last():
    model = tiny_pixel_dit(num_layers=3)
    x, y = _inputs()
    row = CacheDiT(model, DBCacheSetting(10.0, fn=1, bn=1, warmup=1), 4)
    with torch.no_grad():
        first = [_call(row, x, t, y) for t in TIMESTEPS[:4]]
        other = _call(row, x + 1.0, TIMESTEPS[0], y)  # timestep went up: a new trajectory, a full step
        assert torch.equal(other, _call(model, x + 1.0, TIMESTEPS[0], y))
        again = [_call(row, x, t, y) for t in TIMESTEPS[:4]]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert [calls for calls, _ in row.trajectories] == [4, 1, 4]
    # bn = 1: a skipping step runs the first and the last block, 2 of 3
    assert row.computed_fraction(0) == (3 + 3 * 2) / (4 * 3) and row.computed_fraction(1) == 1.0


def test_the_dense_model_keeps_its_forward_and_shares_every_weight():
    model = tiny_pixel_dit(num_layers=2)
    x, y = _inputs()
    with torch.no_grad():
        before = _call(model, x, 500, y)
        row = CacheDiT(model, DBCacheSetting(10.0, warmup=0), 3)
        [_call(row, x, t, y) for t in (900, 600, 300)]
        assert torch.equal(_call(model, x, 500, y), before)
    dense = {p.data_ptr() for p in model.parameters()}
    assert {p.data_ptr() for p in row.parameters()} == dense  # no weight copied
    assert row.config is model.config or dict(row.config) == dict(model.config)  # samplers read the DiT's config


def test_in_a_sampler_threshold_zero_gives_the_dense_images_and_matching_stays_within_the_target():
    model = tiny_pixel_dit(num_layers=4)
    config = SampleConfig(8, 1.5, "ddim", 0)

    def run(denoiser):
        return sample(denoiser, LINEAR_SCHEDULER, [0, 1, 2], config, num_classes=10, sample_shape=(1, 8, 8))

    dense = run(model).images
    assert np.array_equal(run(CacheDiT(model, DBCacheSetting(0.0, warmup=2), 8)).images, dense)
    setting, share = match_threshold(run, model, 8, 0.6, DBCacheSetting(warmup=2), probes=5)
    assert share <= 0.6
    # the least share possible: 2 full steps and block 0 of 6 others = (8 + 6) / 32
    assert share >= (2 * 4 + 6 * 1) / (8 * 4)
    assert probe_fraction(run, model, setting, 8) == share  # the search reports what the setting does
    probes = list(_drain(threshold_search(run, model, 8, 0.6, DBCacheSetting(warmup=2), probes=4)))
    low, high = 1e-3, 1.0  # geometric bisection: a probe within the target moves the upper end down
    for threshold, fraction in probes:
        assert threshold == pytest.approx((low * high) ** 0.5, rel=1e-12)
        low, high = (low, threshold) if fraction <= 0.6 else (threshold, high)
    # a bracket narrows the interval; when nothing in it fits, its upper end is the answer
    probes = list(_drain(threshold_search(run, model, 8, 0.6, DBCacheSetting(warmup=2), probes=3, bracket=(0.01, 0.04))))
    assert probes[0][0] == pytest.approx(0.02, rel=1e-12)
    everything = run_to_end(threshold_search(run, model, 8, 0.5, DBCacheSetting(warmup=2), probes=2, bracket=(1e-9, 1e-8)))
    assert everything[0].threshold == 1e-8 and everything[1] == probe_fraction(run, model, DBCacheSetting(1e-8, warmup=2), 8) > 0.5
    with pytest.raises(ValueError, match=r"bracket must be two thresholds 0 < low < high <= 10, got \(0.5, 0.1\)"):
        run_to_end(threshold_search(run, model, 8, 0.5, bracket=(0.5, 0.1)))


def _drain(generator):
    while True:
        try:
            yield next(generator)
        except StopIteration:
            return


def test_bad_settings_and_families_are_refused_clearly():
    with pytest.raises(ValueError, match=r"threshold must be a number in \[0, 10\], got -1"):
        DBCacheSetting(-1)
    with pytest.raises(ValueError, match=r"fn must be a whole number in \[1, 1000\], got 0"):
        DBCacheSetting(0.1, fn=0)
    with pytest.raises(ValueError, match="THRESHOLD or THRESHOLD,FN,BN,WARMUP"):
        parse_dbcache("0.1,2")
    assert parse_dbcache("auto,1,1,4") == DBCacheSetting(None, 1, 1, 4)
    with pytest.raises(ValueError, match="a number or auto, then whole numbers"):
        parse_dbcache("fast")
    assert parse_dbcache("0.05,2,1,4") == DBCacheSetting(0.05, 2, 1, 4) and parse_dbcache("") is None
    with pytest.raises(ValueError, match=r"serve diffusers' DiTTransformer2DModel \(cache-dit's DiT patch\), got Linear"):
        CacheDiT(torch.nn.Linear(2, 2), DBCacheSetting(), 4)
    with pytest.raises(ValueError, match="needs its threshold before it runs"):
        CacheDiT(tiny_pixel_dit(), DBCacheSetting(None), 4)
    with pytest.raises(ValueError, match=r"target must be a fraction of the dense MACs in \(0, 1\], got 1.5"):
        match_threshold(lambda row: None, tiny_pixel_dit(), 4, 1.5)


def test_a_staged_model_gets_a_context_per_network_and_costs_each_networks_own_blocks():
    from mosaic_core.conquer.staged_denoiser import StagedDiT
    from mosaic_core.prune.surgery import BlockKeep, sliced_model

    dense = tiny_pixel_dit(num_layers=4)  # D = 32, 4 heads of 8, 128 MLP units
    pruned = sliced_model(dense, [BlockKeep(heads=(0, 2), units=tuple(range(0, 128, 2))) for _ in range(4)])
    staged = StagedDiT(pruned, dense, dense, t_min=0, t_max=650)  # 900, 800, 700: pruned; 600, 500, 400: dense
    # the cost model per token and block: 4·D·h·hd + 2·D·u
    dense_block, pruned_block = 4 * 32 * 4 * 8 + 2 * 32 * 128, 4 * 32 * 2 * 8 + 2 * 32 * 64
    x, y = _inputs()
    with torch.no_grad():
        exact = CacheDiT(staged, DBCacheSetting(0.0, warmup=1), 6, dense=dense)
        for t in TIMESTEPS:
            assert torch.equal(_call(exact, x, t, y), _call(staged, x, t, y))
        assert exact.computed_fraction() == (3 * 4 * pruned_block + 3 * 4 * dense_block) / (6 * 4 * dense_block)
        skipping = CacheDiT(staged, DBCacheSetting(10.0, warmup=1), 6, dense=dense)
        got = [_call(skipping, x, t, y) for t in TIMESTEPS]
        # the dense network's first call, at 600, has nothing cached of its own: a full step
        assert torch.equal(got[3], _call(staged, x, 600, y)) and not torch.equal(got[4], _call(staged, x, 500, y))
    # each network: one full call, then two that run block 0 only
    expected = (4 + 2) * pruned_block + (4 + 2) * dense_block
    assert skipping.computed_fraction() == expected / (6 * 4 * dense_block)


def test_sample_cli_stacks_cache_dit_and_refuses_what_it_cannot_do(tiny_pixel_folder, tmp_path):
    from conftest import run_cli
    from mosaic_core.conquer.images import load_samples

    common = ("sample", "--model", str(tiny_pixel_folder), "--n", "2", "--steps", "6", "--seed", "3")
    assert run_cli(*common, "--out", str(tmp_path / "dense.npz")).returncode == 0
    exact = run_cli(*common, "--cache-dit", "0,1,0,1", "--out", str(tmp_path / "exact.npz"))
    assert exact.returncode == 0 and "cache-dit ran 1.000 of the dense block-linear MACs" in exact.stdout
    skipping = run_cli(*common, "--cache-dit", "10,1,0,1", "--out", str(tmp_path / "skip.npz"))
    # 2 blocks: one full step, then five that run block 0 only: (2 + 5) / 12
    assert skipping.returncode == 0 and f"cache-dit ran {7 / 12:.3f} of the dense" in skipping.stdout
    dense, _ = load_samples(tmp_path / "dense.npz")
    assert np.array_equal(load_samples(tmp_path / "exact.npz")[0], dense)
    assert not np.array_equal(load_samples(tmp_path / "skip.npz")[0], dense)
    both = run_cli(*common, "--cache", "2", "--cache-dit", "0.1", "--out", str(tmp_path / "b.npz"))
    assert both.returncode == 2 and "give --cache (DeepCache-style) or --cache-dit, not both" in both.stderr
    auto = run_cli(*common, "--cache-dit", "auto", "--out", str(tmp_path / "a.npz"))
    assert auto.returncode == 2 and "give sample a threshold" in auto.stderr
    assert not (tmp_path / "b.npz").exists() and not (tmp_path / "a.npz").exists()
