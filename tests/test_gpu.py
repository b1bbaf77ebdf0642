"""The GPU path: device/dtype checks (everywhere) and CUDA equivalences (`gpu` marker: CUDA only).

The `gpu` tests skip only where CUDA is absent. They compare the CUDA result with the CPU
result of the same tiny real model (fp32 within float tolerance, fp16/bf16 finite and close
at their precision) and check that timings wait for the GPU (against CUDA events).
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mosaic_core.models.loading import load_model, resolve_device, resolve_dtype
from conftest import run_cli

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ----- checks that run everywhere ------------------------------------------------------


def test_dtype_names_and_aliases():
    cpu = torch.device("cpu")
    for names, dtype in ((("fp32", "float32", "FP32"), torch.float32), (("bf16", "bfloat16"), torch.bfloat16)):
        for name in names:
            assert resolve_dtype(name, cpu) is dtype
    assert resolve_dtype("fp16", torch.device("cuda")) is torch.float16  # checked by name only: no CUDA needed
    assert resolve_dtype(None, cpu) is torch.float32 and resolve_dtype(None, torch.device("cuda")) is torch.float16
    with pytest.raises(ValueError, match=r"unknown dtype 'int8': choose one of fp32, fp16, bf16, float32"):
        resolve_dtype("int8", cpu)


def test_fp16_on_cpu_is_refused_with_what_to_do():
    for name in ("fp16", "float16", torch.float16):
        with pytest.raises(ValueError, match=r"fp16 on the CPU is refused .*use --dtype fp32 or bf16"):
            resolve_dtype(name, torch.device("cpu"))


def test_unsupported_devices_are_one_clear_error():
    for device in ("tpu", "mps", "xla:0", "gpu", "banana"):
        with pytest.raises(ValueError, match=rf"unsupported device '{device}': choose cpu, cuda or cuda:N"):
            resolve_device(device)
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
        with pytest.raises(ValueError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ValueError, match=r"device 'cuda' asked for, but CUDA is not available here .*use --device cpu"):
            resolve_device("cuda")


def test_kept_widths_round_to_gpu_tiles_by_default_only_on_cuda():
    import argparse

    from mosaic_core.commands.prune import add_prune_arguments, prune_config_from_args
    from mosaic_core.conquer.tune import _candidate_config
    from mosaic_core.models.registry import resolve_model
    from mosaic_core.prune.stage_pruning import default_unit_multiple

    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device objects need no GPU
    assert default_unit_multiple(cuda, "measured", 4608) == 64 and default_unit_multiple("cuda:1", "measured", 768) == 64
    assert default_unit_multiple(cpu, "measured", 4608) == 1
    assert default_unit_multiple(cuda, "per-stage", 4608) == 1  # the paper's allocation cannot round
    assert default_unit_multiple(cuda, "measured", 96) == 1 and default_unit_multiple(cuda, "measured", 4600) == 1
    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    spec = resolve_model("facebook/DiT-XL-2-256")

    def config(argv, device):
        return prune_config_from_args(parser.parse_args(argv), spec, device)

    assert config([], cuda).unit_multiple == 64 and config([], cpu).unit_multiple == 1
    assert config(["--unit-multiple", "1"], cuda).unit_multiple == 1  # asked for: kept
    assert config(["--unit-multiple", "16"], cpu).unit_multiple == 16
    assert config(["--allocation", "paper"], cuda).unit_multiple == 1
    # the tuner's paper candidates drop the rounding instead of failing PruneConfig's check
    rounded = config([], cuda)
    assert _candidate_config(rounded, "per-stage", False).unit_multiple == 1
    assert _candidate_config(rounded, "measured", True).unit_multiple == 64


def test_bad_device_or_dtype_stops_sample_before_loading(tmp_path):
    # A folder with no weights at all: the device/dtype error must come first (nothing is loaded).
    (tmp_path / "model").mkdir()
    bad = [("--device", "tpu"), ("--dtype", "fp16")]
    if not torch.cuda.is_available():
        bad.append(("--device", "cuda"))
    for option, value in bad:
        done = run_cli("sample", "--model", "digits-dit", "--n", "2", "--device", "cpu", option, value,
                       "--out", str(tmp_path / "x.npz"))
        assert done.returncode == 2, (option, value, done.stderr[-1000:])
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
        assert value in done.stderr
        assert not (tmp_path / "x.npz").exists()


def test_hessian_sums_stay_with_the_activations_on_cpu(tiny_pixel_folder):
    from mosaic_core.prune.hessian import hessian_device, prunable_layers

    loaded = load_model(str(tiny_pixel_folder), device="cpu")
    assert hessian_device(loaded.transformer, prunable_layers(loaded.transformer), memory_budget=0) is None


# ----- CUDA ------------------------------------------------------------------------------


def _prune(folder, device: str):
    from mosaic_core.divide.plan import build_plan
    from mosaic_core.jobs import run_to_end
    from mosaic_core.prune.calibration import CalibrationConfig
    from mosaic_core.prune.stage_pruning import PruneConfig, prune_steps

    loaded = load_model(str(folder), device=device, dtype="fp32")
    plan = build_plan(loaded.spec, num_inference_steps=6, sparsity=0.4)
    config = PruneConfig(CalibrationConfig(size=16, batch_size=8, source="samples", sample_steps=4))
    return loaded, run_to_end(prune_steps(loaded, plan, config))


@pytest.mark.gpu
@needs_cuda
def test_staged_model_on_cuda_equals_cpu(tiny_pixel_folder):
    cpu_loaded, cpu = _prune(tiny_pixel_folder, "cpu")
    gpu_loaded, gpu = _prune(tiny_pixel_folder, "cuda")
    for stage_cpu, stage_gpu in zip(cpu.stage_networks, gpu.stage_networks):
        assert (stage_cpu is None) == (stage_gpu is None)
        if stage_cpu is not None:
            assert [k.to_dict() for k in stage_gpu[0]] == [k.to_dict() for k in stage_cpu[0]]  # same kept groups
            for name, weight in stage_cpu[1].items():
                torch.testing.assert_close(stage_gpu[1][name].cpu(), weight, rtol=1e-4, atol=1e-5)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=generator)
    t, y = torch.tensor([10, 300, 600, 900]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        out_cpu = cpu.staged(x, timestep=t, class_labels=y).sample
        out_gpu = gpu.staged(x.cuda(), timestep=t.cuda(), class_labels=y.cuda()).sample.cpu()
        dense_gpu = gpu_loaded.transformer(x.cuda(), timestep=t.cuda(), class_labels=y.cuda()).sample.cpu()
    torch.testing.assert_close(out_gpu, out_cpu, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out_gpu, dense_gpu)  # the staged model is not the dense one


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype, tolerance", [("fp16", 0.05), ("bf16", 0.2)])  # mean |Δ| relative to mean |x|
def test_half_precision_sampling_is_finite_and_close_to_fp32(tiny_pixel_folder, dtype, tolerance):
    from mosaic_core.conquer.sampling import SampleConfig, run_to_end, sample_loaded

    config = SampleConfig(num_inference_steps=8, guidance_scale=1.5)
    labels = np.arange(6) % 10
    latents = {}
    for name in ("fp32", dtype):
        loaded = load_model(str(tiny_pixel_folder), device="cuda", dtype=name)
        events = []
        run_to_end(sample_loaded(loaded, labels, config), events.append)
        latents[name] = events[-1].latents.float().cpu()
        assert torch.isfinite(latents[name]).all(), name
    difference = (latents[dtype] - latents["fp32"]).abs().mean()
    assert difference <= tolerance * latents["fp32"].abs().mean()  # the same samples, at half precision


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype, tolerance", [("fp32", 1e-4), ("fp16", 0.05)])  # mean |Δ| relative to mean |x|
def test_dropped_steps_on_cuda_match_the_cpu(tiny_pixel_folder, dtype, tolerance):
    """The DDIM jump mixes the scheduler's CPU ᾱ with CUDA tensors of the model's dtype: the same samples as on the CPU."""
    from mosaic_core.conquer.sampling import SampleConfig, run_to_end, sample_loaded

    config = SampleConfig(num_inference_steps=10, guidance_scale=1.5, drop_steps=3)
    labels = np.arange(4) % 10
    latents = {}
    for device, name in (("cpu", "fp32"), ("cuda", dtype)):
        events = []
        run_to_end(sample_loaded(load_model(str(tiny_pixel_folder), device=device, dtype=name), labels, config), events.append)
        assert len(events) == 7
        latents[device] = events[-1].latents.float().cpu()
    assert torch.isfinite(latents["cuda"]).all()
    assert (latents["cuda"] - latents["cpu"]).abs().mean() <= tolerance * latents["cpu"].abs().mean()


@pytest.mark.gpu
@needs_cuda
def test_timings_wait_for_the_gpu():
    from mosaic_core.conquer.bench import time_calls

    class Heavy(torch.nn.Module):
        """Enough matmuls that the kernels run far longer than their launch."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4096, 4096, device="cuda") / 64)

        def forward(self, x, timestep=None, class_labels=None):
            for _ in range(20):
                x = torch.tanh(x @ self.weight)
            return x

    model = Heavy()
    x = torch.randn(4096, 4096, device="cuda")
    inputs = (x, torch.zeros(1, device="cuda"), torch.zeros(1, device="cuda"))
    time_calls(model, inputs, 1)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    end.record()
    torch.cuda.synchronize()
    event_seconds = start.elapsed_time(end) / 1000 / 3
    measured = time_calls(model, inputs, 3)
    # Unsynchronised host timing would see only the launches (microseconds, far below the events).
    assert measured >= 0.5 * event_seconds


@pytest.mark.gpu
@needs_cuda
def test_hessian_sums_fall_back_to_cpu_over_budget_with_the_same_result(tiny_pixel_folder):
    from mosaic_core.jobs import run_to_end
    from mosaic_core.prune.hessian import hessian_device, hessian_steps, prunable_layers

    loaded = load_model(str(tiny_pixel_folder), device="cuda", dtype="fp32")
    layers = prunable_layers(loaded.transformer)
    assert hessian_device(loaded.transformer, layers, memory_budget=0) == torch.device("cpu")
    assert hessian_device(loaded.transformer, layers, memory_budget=1 << 40) is None
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(4, 1, 8, 8, generator=generator).cuda(), torch.tensor([5, 50, 500, 900]).cuda(), torch.arange(4).cuda())
        for _ in range(3)
    ]
    on_device = run_to_end(hessian_steps(loaded.transformer, batches, memory_budget=1 << 40))
    on_cpu = run_to_end(hessian_steps(loaded.transformer, batches, memory_budget=0))
    for name, hessian in on_device.items():
        assert hessian.device.type == "cuda" and on_cpu[name].device.type == "cpu"
        torch.testing.assert_close(on_cpu[name], hessian.cpu(), rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
@needs_cuda
def test_random_weights_bench_reports_peak_memory_on_cuda():
    from mosaic_core.conquer.bench import RandomBenchConfig, random_bench_steps
    from mosaic_core.jobs import run_to_end
    from mosaic_core.models.registry import resolve_model

    spec = resolve_model("digits-dit")
    result = run_to_end(random_bench_steps(spec, RandomBenchConfig(sparsities=(0.5,), repeats=2, calls=2, batch=8), "cuda"))
    timing = result.timings[0]
    for network in (timing.dense, *[s for s in timing.stages if s is not None]):
        assert network.peak_memory is not None and network.peak_memory >= 4 * network.params  # fp32 weights are resident
        assert all(s > 0 for s in network.seconds)
    assert result.statistic == "median"


# ----- ZeroGPU ---------------------------------------------------------------------------


def test_zerogpu_decorator_is_a_no_op_without_spaces(monkeypatch):
    from ui import zerogpu

    monkeypatch.setitem(sys.modules, "spaces", None)  # `import spaces` fails, as on any machine without it
    assert not zerogpu.on_zerogpu()

    def prune(x):
        return x + 1

    for kind in zerogpu.DURATIONS:
        assert zerogpu.gpu_bound(kind)(prune) is prune  # the very same function, not a wrapper
    assert zerogpu.gpu_bound("compare", duration=30)(prune)(1) == 2
    with pytest.raises(ValueError, match="unknown GPU-bound call 'sample': choose one of prune, compare, trace"):
        zerogpu.gpu_bound("sample")
    assert zerogpu.DURATIONS["prune"] > zerogpu.DURATIONS["compare"] > zerogpu.DURATIONS["trace"]
