"""The adaLN conditioning of a whole trajectory, computed once before the first step.

A class-conditioned DiT modulates every block from (t, y) alone: block ℓ's adaLN-Zero runs
its own timestep + label embedding e_ℓ = emb_ℓ(t, y) and a linear m_ℓ = W_ℓ·SiLU(e_ℓ) + b_ℓ,
split into six shift/scale/gate vectors (diffusers' `AdaLayerNormZero`); the final layer
embeds (t, y) once more with block 0's embedder. None of it depends on the latents, and a
sampler knows every timestep and label in advance, so the work of all N steps can run as
one batched call per block instead of N small ones (docs/method.md §9, eq. 9.2).

The values are the same as the per-call ones (the same modules on the same inputs; rows of a
batched linear are independent). What changes is time: on a CPU the per-block embedding
and modulation of a call is small GEMMs and many tiny kernels, 7–11 % of a digits-dit call
at 16 rows (more at fewer rows) and none of it prunable. Removing it from every call
shortens the dense and the pruned networks alike, so a pruned network's measured speed-up
comes closer to its MACs ratio.

`TrajectoryConditioning(model, call_timesteps, class_labels)` finds every `AdaLayerNormZero`
with its own embedder in `model` (all stage networks of a staged denoiser; a module shared
by networks is computed once); `precompute()` fills the table. Inside `with`, a module
answers a call from the table only when the call's timestep is one of the table's own
tensors (`call_timesteps[i]`, by identity, so no value is read back from a GPU): any other
call (another sampler in another thread, a staged denoiser's mixed batch, a caller that
builds its own timestep) runs the module's own forward. Tables active at once (threads,
nested samplers) are kept in one registry per module and each removes only itself, so
leaving them in any order restores every module. Other families (SD3's and Flux's adaLN
take a text-dependent embedding; PixArt computes its one `adaln_single` per call already)
find no such module and run unchanged.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import torch
from torch import nn


def _ada_norms(model: nn.Module) -> list[nn.Module]:
    """Every diffusers `AdaLayerNormZero` with its own (timestep, label) embedder, once each."""
    try:
        from diffusers.models.normalization import AdaLayerNormZero
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return []
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        if isinstance(module, AdaLayerNormZero) and getattr(module, "emb", None) is not None:
            found.setdefault(id(module), module)
    return list(found.values())


_LOCK = threading.Lock()
_ACTIVE: dict[int, list["TrajectoryConditioning"]] = {}  # id(AdaLayerNormZero) -> tables active on it


def _lookup(norm: nn.Module, timestep: Any) -> tuple["TrajectoryConditioning", int] | None:
    for table in tuple(_ACTIVE.get(id(norm), ())):
        step = table.step_of(timestep)
        if step is not None:
            return table, step
    return None


def _norm_forward(norm: nn.Module, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    found = None if emb is not None else _lookup(norm, timestep)
    if found is None:
        return type(norm).forward(norm, x, timestep, class_labels, hidden_dtype=hidden_dtype, emb=emb)
    table, step = found
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = table.modulation[id(norm)][step].chunk(6, dim=1)
    x = norm.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _emb_forward(norm: nn.Module, timestep, class_labels=None, hidden_dtype=None):
    # DiT's final layer embeds (t, y) with block 0's embedder directly.
    found = _lookup(norm, timestep)
    if found is None:
        return type(norm.emb).forward(norm.emb, timestep, class_labels, hidden_dtype=hidden_dtype)
    table, step = found
    return table.embeddings[id(norm)][step]


class TrajectoryConditioning:
    """Per-step adaLN modulation of every class-conditioned adaLN-Zero block, for one trajectory.

    `call_timesteps`: S×R, the timestep tensor of each of the S calls (model units; call i
    must hand the network `call_timesteps[i]` itself); `class_labels`: the R labels of every
    call (guidance's [cond, null] rows included).
    """

    def __init__(self, model: nn.Module, call_timesteps: torch.Tensor, class_labels: torch.Tensor) -> None:
        if call_timesteps.dim() != 2 or class_labels.dim() != 1 or call_timesteps.shape[1] != class_labels.shape[0]:
            raise ValueError(
                "need timesteps of shape steps×rows and one label per row, "
                f"got {tuple(call_timesteps.shape)} and {tuple(class_labels.shape)}"
            )
        self.norms = _ada_norms(model)
        self.timesteps = call_timesteps
        self.call_timesteps = list(call_timesteps.unbind(0))  # the tensors the calls pass, looked up by identity
        self._steps = {id(t): i for i, t in enumerate(self.call_timesteps)}
        self.class_labels = class_labels
        self.steps, self.rows = int(call_timesteps.shape[0]), int(call_timesteps.shape[1])
        self.embeddings: dict[int, torch.Tensor] = {}  # id(norm) -> S×R×D   emb_ℓ(t, y)
        self.modulation: dict[int, torch.Tensor] = {}  # id(norm) -> S×R×6D  W_ℓ·SiLU(e_ℓ) + b_ℓ

    def __bool__(self) -> bool:
        """Whether the model has anything to precompute."""
        return bool(self.norms)

    def step_of(self, timestep: Any) -> int | None:
        """Which call `timestep` is (by identity), or None when it is not one of this table's."""
        step = self._steps.get(id(timestep))
        if step is None or self.call_timesteps[step] is not timestep or not self.modulation:
            return None
        return step

    @torch.no_grad()
    def precompute(self) -> None:
        """One batched embedding + modulation call per module over all S·R rows."""
        flat_t = self.timesteps.reshape(-1)
        flat_y = self.class_labels.repeat(self.steps)
        for norm in self.norms:
            weight = norm.linear.weight
            emb = norm.emb(flat_t.to(weight.device), flat_y.to(weight.device), hidden_dtype=weight.dtype)
            self.embeddings[id(norm)] = emb.reshape(self.steps, self.rows, -1)
            self.modulation[id(norm)] = norm.linear(norm.silu(emb)).reshape(self.steps, self.rows, -1)

    def __enter__(self) -> "TrajectoryConditioning":
        with _LOCK:
            for norm in self.norms:
                tables = _ACTIVE.setdefault(id(norm), [])
                if not tables:  # the first table on this module installs the dispatchers
                    norm.forward = functools.partial(_norm_forward, norm)
                    norm.emb.forward = functools.partial(_emb_forward, norm)
                tables.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        with _LOCK:
            for norm in self.norms:
                tables = _ACTIVE.get(id(norm), [])
                if self in tables:
                    tables.remove(self)
                if not tables:  # the last one out restores the class's forward
                    _ACTIVE.pop(id(norm), None)
                    norm.__dict__.pop("forward", None)
                    norm.emb.__dict__.pop("forward", None)
