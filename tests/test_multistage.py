"""K ≥ 2 stages (docs/method.md §12.2–12.5): partition, division, allocation, denoiser and pruning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_pixel_dit
from mosaic_core.divide.allocation import allocate_sparsity
from mosaic_core.divide.multistage import (
    StagePartition,
    allocate_k_stages,
    divide_k_stages,
    k_stage_macs,
)
from mosaic_core.divide.plan import build_plan
from mosaic_core.divide.stages import stage_of_timesteps
from mosaic_core.models.registry import resolve_model

MODEL = "digits-dit"


@pytest.fixture(scope="module")
def spec():
    return resolve_model(MODEL)


@pytest.fixture(scope="module")
def plan(spec):
    return build_plan(spec, sparsity=0.3)


@pytest.mark.parametrize("cuts", [(500,), (0, 1000), (103, 569), (10, 10, 400, 999), (1, 2, 3, 4, 5, 998)])
def test_a_partition_covers_every_timestep_once_and_stage_of_agrees(cuts):
    partition = StagePartition(1000, cuts)
    assert partition.num_stages == len(cuts) + 1
    covered = np.concatenate([partition.indices(stage) for stage in range(partition.num_stages)])
    np.testing.assert_array_equal(np.sort(covered), np.arange(1000))
    # every timestep's stage by a loop over the ranges (a different rule from the search)
    expected = np.empty(1000, dtype=np.int64)
    for stage, bounds in enumerate(partition.ranges):
        if bounds is not None:
            expected[bounds[0] : bounds[1] + 1] = stage
    np.testing.assert_array_equal(partition.stage_of(np.arange(1000)), expected)
    assert partition.ranges[0] is None or partition.ranges[0][1] == 999  # stage 0 is the noisiest


def test_three_stage_partition_is_the_three_stage_rule(plan):
    partition = StagePartition.from_bounds(plan.bounds)
    assert partition.ranges == plan.bounds.ranges
    t = np.concatenate([np.arange(1000), np.linspace(-3, 1003, 997), [102.5, 568.5, 568.49]])
    np.testing.assert_array_equal(partition.stage_of(t), stage_of_timesteps(t, plan.bounds.middle, 1000))
    assert partition.count_steps(plan.timesteps) == plan.step_counts


@pytest.mark.parametrize("cuts", [(600, 100), (-1,), (1001,), (), (1.5,), (True,)])
def test_bad_cuts_are_refused(cuts):
    with pytest.raises(ValueError, match=r"stage cuts must be .* got|a partition needs 1 to 63 cuts"):
        StagePartition(1000, cuts)


@pytest.mark.parametrize("target", [0.0, 0.1, 0.3, 0.5, 0.8])
@pytest.mark.parametrize("M", [0.3, 0.55, 0.8])
def test_three_stages_allocate_as_the_three_stage_engine(spec, target, M):
    """K = 3 on eq. 1.4's stages: the K-stage rule gives `allocate_sparsity`'s allocation and the plan's MACs."""
    plan = build_plan(spec, sparsity=target, M=M)
    partition = StagePartition.from_bounds(plan.bounds)
    got = allocate_k_stages(plan.curve(), partition, plan.step_counts, target, spec.shape)
    reference = allocate_sparsity(plan.curve(), plan.bounds, plan.step_counts, target, spec.shape)
    assert (got.requested, got.achieved, got.heads_kept, got.units_kept) == (
        reference.requested, reference.achieved, reference.heads_kept, reference.units_kept,
    )
    assert got.peak_capped == reference.middle_capped and got.peak_stage == 1
    assert k_stage_macs(spec.shape, got) == plan.macs_staged


def test_divide_k_stages_keeps_the_middle_and_splits_the_ends(plan):
    curve = plan.curve()
    assert divide_k_stages(curve, 3).ranges == plan.bounds.ranges
    assert divide_k_stages(curve, 2).ranges == ((569, 999), (0, 568))
    # K = 4: the one extra stage goes to the wider end (early, 431 timesteps vs late's 103),
    # split in two halves of 215 and 216: by hand, 569 + 431 // 2 = 784.
    assert divide_k_stages(curve, 4).ranges == ((784, 999), (569, 783), (103, 568), (0, 102))
    for K in range(4, 9):
        partition = divide_k_stages(curve, K)
        assert partition.num_stages == K and (103, 568) in partition.ranges
        assert all(r is not None for r in partition.ranges)
    with pytest.raises(ValueError, match=r"number of stages must be a whole number in \[2, 64\], got 1"):
        divide_k_stages(curve, 1)


@pytest.mark.parametrize("K", [2, 4, 5, 6])
@pytest.mark.parametrize("target", [0.3, 0.5])
def test_k_stage_allocation_keeps_the_budget_and_the_fragile_stage_lightest(spec, plan, K, target):
    partition = divide_k_stages(plan.curve(), K)
    counts = partition.count_steps(plan.timesteps)
    allocation = allocate_k_stages(plan.curve(), partition, counts, target, spec.shape)
    assert sum(n * s for n, s in zip(counts, allocation.requested)) / sum(counts) == pytest.approx(target, abs=1e-12)
    assert allocation.overall_achieved == pytest.approx(target, abs=0.01)
    peak = allocation.peak_stage
    assert partition.ranges[peak][0] <= int(np.argmax(plan.curve().score)) <= partition.ranges[peak][1]
    assert all(allocation.achieved[peak] <= a for i, a in enumerate(allocation.achieved) if counts[i] > 0)
    dense = k_stage_macs(spec.shape, allocate_k_stages(plan.curve(), partition, counts, 0.0, spec.shape))
    assert dense == plan.macs_dense
    assert k_stage_macs(spec.shape, allocation) == pytest.approx((1 - allocation.overall_achieved) * dense, rel=1e-9)


def test_k_stage_allocation_refuses_mismatched_counts(spec, plan):
    partition = divide_k_stages(plan.curve(), 4)
    with pytest.raises(ValueError, match=r"step_counts must be 4 whole numbers"):
        allocate_k_stages(plan.curve(), partition, (25, 25), 0.3, spec.shape)


def test_the_k_stage_denoiser_runs_each_timesteps_network():
    """Four different random networks: each row of a mixed batch comes from its stage's network."""
    from mosaic_core.conquer.multistage_denoiser import MultiStageDenoiser

    networks = [tiny_pixel_dit(seed=seed) for seed in range(4)]
    partition = StagePartition(1000, (100, 400, 700))  # stages: [700, 999], [400, 699], [100, 399], [0, 99]
    staged = MultiStageDenoiser(networks, partition)
    torch.manual_seed(0)
    x = torch.randn(6, 1, 8, 8)
    t = torch.tensor([999, 650, 399.6, 99.4, 100, 0])  # 399.6 rounds to 400 (stage 1); 99.4 to 99 (stage 3)
    labels = torch.arange(6) % 10
    with torch.no_grad():
        got = staged(x, t, class_labels=labels).sample
        for row, stage in enumerate([0, 1, 1, 3, 2, 3]):
            alone = networks[stage](x[row : row + 1], t[row : row + 1], class_labels=labels[row : row + 1]).sample
            torch.testing.assert_close(got[row : row + 1], alone, rtol=1e-5, atol=1e-6)
    assert staged.stage_calls == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="the partition has 4 stages but 3 networks"):
        MultiStageDenoiser(networks[:3], partition)


def test_one_network_in_every_stage_is_bit_identical_to_it():
    from mosaic_core.conquer.multistage_denoiser import MultiStageDenoiser

    dense = tiny_pixel_dit()
    staged = MultiStageDenoiser([dense] * 5, StagePartition(1000, (10, 20, 500, 900)))
    x, t, labels = torch.randn(4, 1, 8, 8), torch.tensor([5, 15, 600, 950]), torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        assert torch.equal(staged(x, t, class_labels=labels).sample, dense(x, t, class_labels=labels).sample)
    assert staged.config is dense.config


@pytest.mark.slow
def test_pruning_four_stages_of_a_tiny_model(tiny_pixel_folder):
    """Every stage with steps gets its own network of the allocated width; sampling runs through all of them."""
    from mosaic_core.conquer.sampling import SampleConfig, sample_loaded
    from mosaic_core.jobs import run_to_end
    from mosaic_core.models.loading import load_model
    from mosaic_core.prune.calibration import CalibrationConfig
    from mosaic_core.prune.multistage_pruning import prune_k_stages
    from mosaic_core.prune.stage_pruning import PruneConfig
    from mosaic_core.prune.surgery import block_sizes

    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    plan = build_plan(loaded.spec, num_inference_steps=10, sparsity=0.4)
    partition = divide_k_stages(plan.curve(), 4)
    counts = partition.count_steps(plan.timesteps)
    allocation = allocate_k_stages(plan.curve(), partition, counts, 0.4, loaded.spec.shape)
    config = PruneConfig(CalibrationConfig(size=16, batch_size=8, source="samples", sample_steps=4))
    staged = run_to_end(prune_k_stages(loaded, partition, allocation, config))
    for stage, network in enumerate(staged.networks()):
        heads, _, units = block_sizes(network.transformer_blocks[0])
        if counts[stage] == 0 or allocation.achieved[stage] == 0:
            assert network is loaded.transformer
        else:
            assert (heads, units) == (allocation.heads_kept[stage], allocation.units_kept[stage])
    result = run_to_end(sample_loaded(loaded, [1, 2], SampleConfig(10, 1.5, "ddim", 0), transformer=staged))
    assert np.isfinite(result.images).all()
    assert sorted(set(staged.stage_calls)) == [i for i in range(4) if counts[i] > 0]


def test_three_measured_stages_prune_as_the_three_stage_engine(tiny_pixel_folder):
    """K = 3 on eq. 1.4's stages with the measured rule: the same removals, sparsities and sampled images as
    `prune_steps` (an independent path: plan, `measured_stages`, `build_staged`); a checkpoint record is refused."""
    from mosaic_core.conquer.sampling import SampleConfig, sample_loaded
    from mosaic_core.jobs import run_to_end
    from mosaic_core.models.loading import load_model
    from mosaic_core.prune.calibration import CalibrationConfig
    from mosaic_core.prune.multistage_pruning import prune_k_stages
    from mosaic_core.prune.stage_pruning import PruneConfig, prune_steps

    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    plan = build_plan(loaded.spec, num_inference_steps=10, sparsity=0.4)
    partition = StagePartition.from_bounds(plan.bounds)
    allocation = allocate_k_stages(plan.curve(), partition, plan.step_counts, 0.4, loaded.spec.shape)
    config = PruneConfig(CalibrationConfig(size=16, batch_size=8, source="samples", sample_steps=4), allocation="measured")
    analyses, chosen = {}, []
    staged = run_to_end(prune_k_stages(loaded, partition, allocation, config, analyses=analyses, measured=chosen))
    reference = run_to_end(prune_steps(loaded, plan, config, analyses=analyses))
    assert [dict(r) for r in chosen[0].removals] == [dict(r) for r in reference.measured.removals]
    assert chosen[0].sparsity == pytest.approx(reference.measured.sparsity) and chosen[0].error == pytest.approx(reference.measured.error)
    assert any(chosen[0].sparsity) and chosen[0].sparsity != chosen[0].paper_sparsity  # the rule moved something
    labels, sample = [1, 2], SampleConfig(10, 1.5, "ddim", 0)
    images = run_to_end(sample_loaded(loaded, labels, sample, transformer=staged)).images
    expected = run_to_end(sample_loaded(loaded, labels, sample, transformer=reference.staged)).images
    assert np.array_equal(images, expected)
    with pytest.raises(ValueError, match="stores the paper's counts"):
        run_to_end(prune_k_stages(loaded, partition, allocation, config, analyses=analyses, record=[]))
