"""Refit: the pruned layers' weights and biases fit to the pruned network's own inputs [ours].

OBS (obs.py) solves each layer on the *dense* network's inputs: it keeps W·x close for
the x the dense model produces. Inside a pruned network the inputs of block i are not
those x: every earlier block lost groups too, and its error arrives with them. The refit
solves each output projection again, on the inputs the pruned network really produces,
towards the output the dense layer gives on its own inputs:

    min over W', b'   Σ_k ‖ W' x̃_k + b' − (W x_k + b) ‖²  +  γ·mean(diag H̃)·‖W'‖²          (3.14)

x_k is the dense layer's input, x̃_k the pruned layer's input (its kept columns) on the
same calibration token; H̃ = Σ x̃ x̃ᵀ. With x̃ extended by a constant 1 (the bias),
A = Σ [x̃;1][x̃;1]ᵀ and R = Σ [x̃;1] yᵀ with y = W x + b the dense layer's output (read
from the dense model's own forward), the solution is

    [W' b']ᵀ = (A + γ·mean(diag H̃)·I′)⁻¹ R                                                 (3.15)

(I′: the identity without the bias entry, so the bias is not shrunk). A layer's error is
corrected where it is made (upstream pruning), and the bias absorbs the mean shift that
a column-only update cannot. All layers of a network are refit from one calibration pass
(each on the inputs of the un-refit network); a second pass or a layer-by-layer order
measured no better on digits-dit (docs/method.md §3.13).

Every sliced single-module layer (DiT, PixArt, UNet blocks) is refit, also one that kept all
its groups: its inputs still changed upstream. A layer whose groups span two modules (joint
attention, fused projections) keeps its OBS weights, and a module the pruned network shares
with the dense model (a UNet cross-attention kept whole) is never touched.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

from mosaic_core.jobs import Cancelled

REFIT_DAMPING = 1e-3  # γ of eq. 3.14 (measured on digits-dit, docs/method.md §3.13)
REFIT_ROWS = 32  # calibration rows per model call: bounds the dense outputs held between the two calls


def refit_targets(dense: torch.nn.Module, pruned: torch.nn.Module) -> list[str]:
    """Module names the refit solves: single-module prunable layers the pruned network sliced."""
    from mosaic_core.prune.hessian import prunable_layers

    dense_modules = dict(dense.named_modules())
    pruned_modules = dict(pruned.named_modules())
    names = []
    for layer in prunable_layers(dense):
        if len(layer.parts) != 1 or layer.parts[0].module != layer.name:
            continue  # groups across two modules (joint attention, fused projections): OBS weights stay
        module = pruned_modules.get(layer.name)
        if module is None or module is dense_modules[layer.name]:
            continue  # the dense model's own module (not sliced): never written
        names.append(layer.name)
    return names


def _micro_batches(batches: Iterable, rows: int) -> Iterator:
    from mosaic_core.models.adapters.base import select_rows

    for x_t, timestep, condition in batches:
        n = x_t.shape[0]
        for start in range(0, n, rows):
            index = torch.arange(start, min(start + rows, n))
            yield x_t[start : start + rows], timestep[start : start + rows], select_rows(condition, index, n)


def refit_weights(
    dense: torch.nn.Module,
    pruned: torch.nn.Module,
    batches: Iterable,
    *,
    damping: float = REFIT_DAMPING,
    should_stop: Callable[[], bool] | None = None,
    rows: int = REFIT_ROWS,
) -> dict[str, torch.Tensor]:
    """Refit every `refit_targets` layer of `pruned` on calibration `batches` (x_t, τ, condition).

    Returns {name: W' (out × kept), name + ".bias": b'} (the bias only where the dense layer
    has one), in the layers' dtype; `pruned` itself is not changed (`sliced_model` builds
    with them).
    """
    from mosaic_core.prune.hessian import run_calibration_batch

    if not 0.0 < damping <= 1.0:
        raise ValueError(f"refit damping must be in (0, 1], got {damping}")
    names = refit_targets(dense, pruned)
    if not names:
        return {}
    dense_modules = dict(dense.named_modules())
    pruned_modules = dict(pruned.named_modules())
    held: dict[str, torch.Tensor] = {}
    sums: dict[str, list[torch.Tensor]] = {}  # name -> [A, R]

    def keep_dense(name):
        def hook(module, args, output):  # the target: the dense layer's output on its own input
            held[name] = output.reshape(-1, output.shape[-1])
        return hook

    def accumulate(name):
        def hook(module, args):
            y = held.pop(name).float()
            xp = args[0].reshape(-1, args[0].shape[-1]).float()
            if dense_modules[name].bias is not None:
                xp = torch.cat([xp, xp.new_ones(xp.shape[0], 1)], dim=1)
            a, r = (xp.T @ xp).double(), (xp.T @ y).double()  # float32 per call, float64 over calls
            if name in sums:
                sums[name][0] += a
                sums[name][1] += r
            else:
                sums[name] = [a, r]
        return hook

    handles = [dense_modules[n].register_forward_hook(keep_dense(n)) for n in names]
    handles += [pruned_modules[n].register_forward_pre_hook(accumulate(n)) for n in names]
    try:
        for x_t, timestep, condition in _micro_batches(batches, rows):
            if should_stop is not None and should_stop():
                raise Cancelled("refit cancelled")
            run_calibration_batch(dense, x_t, timestep, condition)  # holds each target output
            run_calibration_batch(pruned, x_t, timestep, condition)  # sums A and R against it
            held.clear()
    finally:
        for handle in handles:
            handle.remove()
    solved = {}
    for name in names:
        if name not in sums:
            continue
        a, rhs = sums[name]
        bias = dense_modules[name].bias
        kept = a.shape[0] - (bias is not None)
        scale = torch.diagonal(a)[:kept].mean()
        if not scale > 0:
            continue  # no signal at this layer's inputs: nothing to fit, OBS weights stay
        ridge = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
        ridge[:kept] = damping * scale
        solution = torch.linalg.solve(a + torch.diag(ridge), rhs)  # (kept [+1]) × out
        dtype = pruned_modules[name].weight.dtype
        solved[name] = solution[:kept].T.contiguous().to(dtype)
        if bias is not None:
            solved[name + ".bias"] = solution[kept].contiguous().to(dtype)
    return solved
