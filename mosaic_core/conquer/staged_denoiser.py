"""Conquer: one denoiser that switches stage sub-networks by timestep (docs/method.md §4).

`StagedDiT` holds the early, middle and late sub-networks (from `surgery.sliced_model`,
sharing every unpruned module with the dense model) and the inclusive middle-stage
bounds [t_min, t_max] in model timesteps:

    τ > t_max → early (noisiest),   t_min ≤ τ ≤ t_max → middle,   τ < t_min → late.

A family whose network receives the timestep scaled (`FamilyAdapter.timestep_scale`; a
flow-matching model fed σ = t/1000 instead of t = σ·1000) gives that scale: the received
value is divided by it before the stage is chosen, so bounds stay in t units.

Fractional timesteps (DPM-Solver, Euler) are rounded half up to the nearest integer
first, by the one rule of `divide.stages.stage_of_timesteps`. It forwards every argument
of the call to the stage's network and returns what that network returns, and reads
`config`, `dtype`, `device` and any other attribute from the dense-shaped middle network,
so it is a drop-in for any family's denoiser: DiTPipeline's `transformer`,
StableDiffusionXLPipeline's `unet` (which also reads e.g. `add_embedding`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mosaic_core.divide.stages import STAGE_NAMES as STAGES
from mosaic_core.divide.stages import stage_of_timesteps

__all__ = ["STAGES", "StagedDiT", "StagedDenoiser", "MemoryLedger", "memory_ledger", "param_count", "param_bytes"]



def _unique_parameters(modules: list[nn.Module]) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for parameter in module.parameters():
            seen.setdefault(id(parameter), parameter)
    return list(seen.values())


def param_count(module: nn.Module) -> int:
    """Number of parameters of `module`, each shared parameter counted once."""
    return sum(p.numel() for p in _unique_parameters([module]))


def param_bytes(*modules: nn.Module) -> int:
    """Bytes of the distinct parameter storages used by `modules` together (sharing counted once)."""
    storages: dict[tuple[str, int], int] = {}
    for parameter in _unique_parameters(list(modules)):
        if parameter.numel() == 0:
            continue
        storage = parameter.untyped_storage()
        storages[(str(parameter.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


class StagedDiT(nn.Module):
    """A denoiser that runs the early/middle/late sub-network of each timestep (any family).

    `stage_calls` records the stage names of every call (a mixed batch adds one entry per
    stage it contains, in early, middle, late order); `reset_stage_calls()` clears it.
    A mixed batch runs each stage's network on its own rows; stages that are the same
    network object share one call, so with the dense model in every stage the output is
    bit-identical to the dense model's.
    """

    def __init__(
        self,
        early: nn.Module,
        middle: nn.Module,
        late: nn.Module,
        t_min: int,
        t_max: int,
        num_train_timesteps: int | None = None,
        timestep_scale: float | None = None,
    ) -> None:
        super().__init__()
        if int(t_min) != t_min or int(t_max) != t_max or not 0 <= t_min <= t_max:
            raise ValueError(f"middle stage bounds must be integers with 0 <= t_min <= t_max, got ({t_min}, {t_max})")
        self.early = early
        self.middle = middle
        self.late = late
        self.t_min = int(t_min)
        self.t_max = int(t_max)
        self.num_train_timesteps = None if num_train_timesteps is None else int(num_train_timesteps)
        if timestep_scale is None:  # the family's own (Flux: 1/1000), read from the networks' class
            from mosaic_core.models.samplers import denoiser_timestep_scale

            timestep_scale = denoiser_timestep_scale(middle)
        if isinstance(timestep_scale, bool) or not (isinstance(timestep_scale, (int, float)) and timestep_scale > 0):
            raise ValueError(f"timestep_scale must be a positive number, got {timestep_scale!r}")
        self.timestep_scale = float(timestep_scale)  # the network receives t · scale; stages are in t
        self.stage_calls: list[str] = []

    # --- what a diffusers pipeline reads from a transformer -------------------------------
    @property
    def config(self):
        """The dense model's config (the sub-networks share it)."""
        return self.middle.config

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype (as `ModelMixin.dtype`)."""
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Parameter device (as `ModelMixin.device`)."""
        return next(self.parameters()).device

    def networks(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(early, middle, late) sub-networks."""
        return (self.early, self.middle, self.late)

    def reset_stage_calls(self) -> None:
        """Forget the recorded stage calls."""
        self.stage_calls.clear()

    def stage_index(self, timestep: torch.Tensor | float | int) -> torch.Tensor:
        """Stage of each timestep the network receives (t · timestep_scale): 0 early, 1 middle, 2 late."""
        t = torch.as_tensor(timestep, dtype=torch.float64).cpu().numpy() / self.timestep_scale  # back to t units
        return torch.from_numpy(stage_of_timesteps(t, (self.t_min, self.t_max), self.num_train_timesteps))

    def __getattr__(self, name: str):
        """Attributes a pipeline reads from its denoiser (e.g. `add_embedding`) come from `middle`."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            middle = self.__dict__.get("_modules", {}).get("middle")
            if middle is None or name.startswith("_"):
                raise
            return getattr(middle, name)

    def forward(self, hidden_states: torch.Tensor, timestep=None, *args: Any, return_dict: bool = True, **kwargs: Any):
        """The stage network's forward for these timesteps; every argument is passed through.

        A mixed batch (timesteps of several stages) is split: each stage's network runs on
        its rows (every tensor argument whose first dimension is the batch is sliced,
        also inside dicts such as `added_cond_kwargs`), and the rows are put back in order.
        """
        from mosaic_core.models.adapters import select_rows

        if timestep is None:
            raise ValueError("StagedDiT needs a timestep to choose the stage sub-network")
        stage = self.stage_index(timestep.detach().cpu() if torch.is_tensor(timestep) else timestep).reshape(-1)
        batch = hidden_states.shape[0]
        present = sorted(set(stage.tolist()))  # stage indices in this call, early first
        networks = {id(self.networks()[index]) for index in present}
        if len(networks) == 1:
            # 1. One network for the whole call (the sampler case, or stages that share a
            #    network): pass everything through unchanged, as the dense model would run.
            self.stage_calls.extend(STAGES[index] for index in present)
            return call_denoiser(self.networks()[present[0]], hidden_states, timestep, args, return_dict, kwargs)
        # 2. Mixed batch: run each stage on its rows, then put the rows back in order.
        if stage.numel() != batch:
            raise ValueError(f"timestep must be a scalar or have one entry per sample ({batch}), got {stage.numel()}")
        output, output_type = None, None
        for index, network in enumerate(self.networks()):
            rows = torch.nonzero(stage == index).flatten()
            if rows.numel() == 0:
                continue
            self.stage_calls.append(STAGES[index])
            rows_dev = rows.to(hidden_states.device)
            part = call_denoiser(
                network, hidden_states.index_select(0, rows_dev), select_rows(timestep, rows, batch),
                select_rows(tuple(args), rows, batch), True, select_rows(kwargs, rows, batch),
            )
            output_type = type(part)
            sample = part.sample
            if output is None:
                output = sample.new_empty((batch, *sample.shape[1:]))
            output[rows_dev] = sample
        if not return_dict:
            return (output,)
        return output_type(sample=output)


def call_denoiser(network: nn.Module, hidden_states, timestep, args: tuple, return_dict: bool, kwargs: dict):
    """network(hidden_states, timestep, …): the timestep by keyword unless more positional
    arguments follow it (a transformer whose forward has `timestep` after the text inputs).
    Every wrapper that passes a call on (staged, K-stage, block reuse) goes through here."""
    if args:
        return network(hidden_states, timestep, *args, return_dict=return_dict, **kwargs)
    return network(hidden_states, timestep=timestep, return_dict=return_dict, **kwargs)


def distinct_networks(denoiser: nn.Module) -> list[nn.Module]:
    """The networks a denoiser runs, each once: a staged denoiser's `networks()` (stages may
    share one), or the denoiser itself."""
    networks = getattr(denoiser, "networks", None)
    found = list(networks()) if callable(networks) else [denoiser]
    unique: dict[int, nn.Module] = {}
    for network in found:
        unique.setdefault(id(network), network)
    return list(unique.values())


class DenoiserWrapper(nn.Module):
    """Base of a module that wraps a denoiser held as its submodule `denoiser` (the name
    `adapters.base.denoiser_adapter` unwraps): attributes it lacks come from that denoiser,
    as a pipeline reads config, dtype, device and more from its denoiser."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            denoiser = self.__dict__.get("_modules", {}).get("denoiser")
            if denoiser is None or name.startswith("_"):
                raise
            return getattr(denoiser, name)


StagedDenoiser = StagedDiT  # the family-neutral name; StagedDiT stays for existing callers


@dataclass(frozen=True)
class MemoryLedger:
    """Parameter memory of the dense model and of the staged model with and without sharing.

    `staged_bytes` counts each storage once across the three sub-networks;
    `naive_bytes` is what three independent copies would take. `stage_params` are the
    (early, middle, late) parameter counts of each sub-network on its own.
    """

    dense_bytes: int
    staged_bytes: int
    naive_bytes: int
    stage_params: tuple[int, int, int]

    @property
    def staged_over_dense(self) -> float:
        """staged_bytes / dense_bytes (1.0 = no extra memory for staging)."""
        return self.staged_bytes / self.dense_bytes

    @property
    def naive_over_dense(self) -> float:
        """naive_bytes / dense_bytes (≈ 3 minus the pruning of the three copies)."""
        return self.naive_bytes / self.dense_bytes


def memory_ledger(dense_model: nn.Module, staged: StagedDiT) -> MemoryLedger:
    """Dense, staged (shared storages once) and naive (three copies) parameter bytes."""
    networks = staged.networks()
    return MemoryLedger(
        dense_bytes=param_bytes(dense_model),
        staged_bytes=param_bytes(*networks),
        naive_bytes=sum(param_bytes(network) for network in networks),
        stage_params=tuple(param_count(network) for network in networks),  # type: ignore[arg-type]
    )
