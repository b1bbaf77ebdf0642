"""DeepCache-style block-output reuse: off = dense bit-for-bit, on = a hand-built reference, MACs."""

import pytest
import torch

from conftest import tiny_pixel_dit
from mosaic_core.conquer.caching import BlockReuse, CacheConfig, cache_schedule, cached_sampling_macs, parse_cache
from mosaic_core.conquer.staged_denoiser import StagedDiT
from mosaic_core.prune.surgery import BlockKeep, sliced_model


def _inputs(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 8, 8, generator=generator), torch.tensor([1, 7])


def test_reuse_disabled_is_the_dense_model_bit_for_bit():
    model = tiny_pixel_dit(num_layers=4)
    x, y = _inputs()
    wrapped = BlockReuse(model, CacheConfig(interval=2), enabled=False)
    with torch.no_grad():
        for t in (900, 800, 700):
            expected = model(x, timestep=torch.tensor([t, t]), class_labels=y).sample
            got = wrapped(x, timestep=torch.tensor([t, t]), class_labels=y).sample
            assert torch.equal(got, expected)
    # interval 1: every step full, so reuse on changes nothing either
    always_full = BlockReuse(model, CacheConfig(interval=1))
    with torch.no_grad():
        for t in (900, 800):
            got = always_full(x, timestep=torch.tensor([t, t]), class_labels=y).sample
            assert torch.equal(got, model(x, timestep=torch.tensor([t, t]), class_labels=y).sample)
    assert always_full.history == [True, True]


def test_cached_step_equals_a_hand_built_residual_reference():
    # Reference by another mechanism: forward hooks record blocks 1..2's input and output
    # at the full step; at the cached step the blocks still run but hooks overwrite their
    # outputs: block 1 returns its input + (y₂ − x₁) of the full step, block 2 its input.
    model = tiny_pixel_dit(num_layers=4)
    x0, y = _inputs(seed=0)
    x1, _ = _inputs(seed=1)
    t0, t1 = torch.tensor([900, 900]), torch.tensor([880, 880])
    blocks = model.transformer_blocks
    seen = {}
    hooks = [
        blocks[1].register_forward_hook(lambda m, args, out: seen.__setitem__("x1", args[0].clone())),
        blocks[2].register_forward_hook(lambda m, args, out: seen.__setitem__("y2", out.clone())),
    ]
    with torch.no_grad():
        full_reference = model(x0, timestep=t0, class_labels=y).sample
    for hook in hooks:
        hook.remove()
    span = seen["y2"] - seen["x1"]
    hooks = [
        blocks[1].register_forward_hook(lambda m, args, out: args[0] + span),
        blocks[2].register_forward_hook(lambda m, args, out: args[0]),
    ]
    with torch.no_grad():
        cached_reference = model(x1, timestep=t1, class_labels=y).sample
    for hook in hooks:
        hook.remove()

    wrapped = BlockReuse(model, CacheConfig(interval=2, keep_first=1, keep_last=1))
    with torch.no_grad():
        full = wrapped(x0, timestep=t0, class_labels=y).sample
        cached = wrapped(x1, timestep=t1, class_labels=y).sample
    assert wrapped.history == [True, False]
    assert torch.equal(full, full_reference)
    torch.testing.assert_close(cached, cached_reference, rtol=1e-5, atol=1e-6)  # Σ per-block r = span, up to rounding
    with torch.no_grad():
        dense_cached_step = model(x1, timestep=t1, class_labels=y).sample
    assert not torch.allclose(cached, dense_cached_step)  # reuse really changed the step
    # A later timestep that is not lower starts a new trajectory: full again.
    with torch.no_grad():
        wrapped(x0, timestep=t0, class_labels=y)
    assert wrapped.history == [True]


def test_staged_model_recomputes_when_the_stage_network_changes():
    dense = tiny_pixel_dit(num_layers=4)
    keeps = [BlockKeep(heads=(0, 2), units=tuple(range(0, 128, 2))) for _ in range(4)]
    pruned = sliced_model(dense, keeps)
    staged = StagedDiT(pruned, dense, pruned, t_min=300, t_max=600)
    wrapped = BlockReuse(staged, CacheConfig(interval=3))
    x, y = _inputs()
    timesteps = [900, 800, 700, 600, 500, 200, 100]  # early early early middle middle late late
    with torch.no_grad():
        for t in timesteps:
            wrapped(x, timestep=torch.tensor([t, t]), class_labels=y)
    networks = ["pruned" if t > 600 or t < 300 else "dense" for t in timesteps]
    assert wrapped.history == cache_schedule(len(timesteps), 3, networks)
    assert wrapped.history == [True, False, False, True, False, True, True]
    # no patched forward is left behind on any block
    assert all("forward" not in vars(block) for net in (dense, pruned) for block in net.transformer_blocks)


def test_cache_macs_on_a_tiny_model():
    # 4 blocks, first and last always run: a cached step costs 2/4 of a full one.
    config = CacheConfig(interval=2)
    assert list(config.cached_blocks(4)) == [1, 2]
    full = cache_schedule(5, 2)
    assert full == [True, False, True, False, True]
    macs = cached_sampling_macs([100] * 5, full, 2 / 4)
    assert macs == 3 * 100 + 2 * 50
    # stacked: stage networks of 100 and 60 MACs per step; the switch forces a full step
    step_macs = [100, 100, 60, 60, 60]
    full = cache_schedule(5, 2, ["a", "a", "b", "b", "b"])
    assert full == [True, False, True, False, True]
    assert cached_sampling_macs(step_macs, full, 0.5) == 100 + 50 + 60 + 30 + 60


def test_parse_cache_and_bad_values():
    assert parse_cache(None) is None and parse_cache("off") is None
    assert parse_cache("3") == CacheConfig(3) and parse_cache("2,0,2") == CacheConfig(2, 0, 2)
    with pytest.raises(ValueError, match=r"--cache must be INTERVAL.*got 'x'"):
        parse_cache("x")
    with pytest.raises(ValueError, match=r"cache interval must be a whole number in \[1, 1000\], got 0"):
        CacheConfig(interval=0)


def test_match_cache_to_macs_picks_the_closest_setting():
    from mosaic_core.conquer.caching import match_cache_to_macs

    # 6 blocks, 50 steps of 60 MACs, target 2100 (70 %). A step with c of 6 blocks cached
    # costs 60·(6 − c)/6; interval i has ⌈50/i⌉ full steps. Closest by hand:
    # i=3, c=3: 17·60 + 33·30 = 2010 (gap 90); i=2, c=4: 25·60 + 25·20 = 2000 (gap 100);
    # i=5, c=2: 10·60 + 40·40 = 2200 (gap 100); i=4, c=3: 13·60 + 37·30 = 1890.
    config, macs = match_cache_to_macs(6, [60] * 50, 2100)
    assert macs == 2010 and config == CacheConfig(3, 1, 2)


def test_match_cache_within_a_budget_never_goes_over_it():
    from mosaic_core.conquer.caching import match_cache_to_macs

    # the same stack (hand table above): at 2008 the closest is 2010 (i=3, c=3), the closest
    # from below 2000 (i=2, c=4: 25·60 + 25·20); the least any setting costs is i=5, c=4:
    # 10·60 + 40·20 = 1400, so 1399 cannot be met
    assert match_cache_to_macs(6, [60] * 50, 2008)[1] == 2010
    assert match_cache_to_macs(6, [60] * 50, 2008, within=True) == (CacheConfig(2, 1, 1), 2000)
    assert match_cache_to_macs(6, [60] * 50, 1400, within=True) == (CacheConfig(5, 1, 1), 1400)
    assert match_cache_to_macs(6, [60] * 50, 1399, within=True) is None


@pytest.mark.slow
def test_sample_command_with_cache_equals_block_reuse_in_process(tiny_pixel_folder, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    from mosaic_core.conquer.images import load_samples
    from mosaic_core.conquer.sampling import SampleConfig, run_to_end, sample_loaded
    from mosaic_core.models.loading import load_model

    out = tmp_path / "cached.npz"
    command = [
        sys.executable, "-m", "mosaic_core", "sample", "--model", str(tiny_pixel_folder), "--n", "2", "--steps", "4",
        "--cache", "2,0,1", "--device", "cpu", "--out", str(out),
    ]
    done = subprocess.run(command, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    images, _ = load_samples(out)
    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    config = SampleConfig(4, loaded.spec.default_cfg)
    cached = run_to_end(sample_loaded(loaded, [0, 1], config, transformer=BlockReuse(loaded.transformer, CacheConfig(2, 0, 1))))
    dense = run_to_end(sample_loaded(loaded, [0, 1], config))
    np.testing.assert_array_equal(images, cached.images)
    assert not np.array_equal(cached.images, dense.images)
    bad_command = [sys.executable, "-m", "mosaic_core", "sample", "--model", str(tiny_pixel_folder), "--cache", "x", "--out", str(tmp_path / "b.npz")]
    bad = subprocess.run(bad_command, cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--cache must be INTERVAL" in bad.stderr


def test_a_block_whose_output_reuse_cannot_rebuild_is_refused_by_name():
    # a block that returned neither its hidden states nor a joint block's pair was run on
    # every step while the row counted its MACs as saved
    from mosaic_core.conquer.caching import _residual

    hidden = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match=r"block blocks\.3 returns dict, .*DeepCache-style reuse cannot skip it"):
        _residual({"sample": hidden}, (None, hidden), "blocks.3")
    with pytest.raises(ValueError, match="returns a tuple of 3"):
        _residual((hidden, hidden, hidden), (hidden, hidden), "blocks.3")
    ones = torch.ones(2, 4, 8)
    assert torch.equal(_residual(ones, (None, hidden), "b"), ones)
    encoder, image = _residual((None, ones), (torch.zeros(2, 3, 8), hidden), "b")
    assert encoder is None and torch.equal(image, ones)


def test_a_cached_call_computes_its_running_blocks_share_of_the_macs():
    from mosaic_core.conquer.caching import computed_share, match_cache_to_macs

    config = CacheConfig(interval=2, keep_first=1, keep_last=1)
    assert computed_share(config, [1, 3, 3, 1]) == pytest.approx(0.25)  # blocks 1, 2 skipped: 6 of 8 MACs
    assert computed_share(config, [1, 1, 1, 1]) == pytest.approx(0.5)  # equal blocks: blocks run / all
    # two steps, the second cached: with the heavy middle blocks skipped, 1 + 0.25 of two steps' MACs
    setting, macs = match_cache_to_macs(4, [100, 100], 125, macs_by_block=[1, 3, 3, 1])
    assert (setting.interval, list(setting.cached_blocks(4)), macs) == (2, [1, 2], 125)
    _, equal = match_cache_to_macs(4, [100, 100], 125)
    assert equal == 150  # counted as equal blocks the same skip would save only half a step
    with pytest.raises(ValueError, match="must list all 4 blocks"):
        match_cache_to_macs(4, [100, 100], 125, macs_by_block=[1, 3, 3])


def test_block_macs_of_a_dit_add_up_to_the_plans_macs_per_call():
    from mosaic_core.conquer.caching import block_macs
    from mosaic_core.divide.cost import sampling_macs
    from mosaic_core.divide.shapes import TransformerShape

    dense = tiny_pixel_dit(num_layers=3)
    shape = TransformerShape.from_dit_config(dense.config)
    per_block = block_macs(dense, shape)
    assert len(per_block) == 3 and len(set(per_block)) == 1
    assert sum(per_block) == sampling_macs(shape, None, [1, 0, 0])
    keeps = [BlockKeep(heads=(0,), units=tuple(range(10))), BlockKeep(heads=(0, 1, 2, 3), units=tuple(range(128))),
             BlockKeep(heads=(1, 2), units=tuple(range(64)))]
    sliced = block_macs(sliced_model(dense, keeps), shape)
    # per token, D = 32: a head 4·D·8 = 1024 MACs, a unit 2·D = 64; a dense block 4 heads + 128 units = 12288
    assert [m * 12288 for m in sliced] == [per_block[0] * (1024 + 10 * 64), per_block[1] * 12288, per_block[2] * (2048 + 64 * 64)]
