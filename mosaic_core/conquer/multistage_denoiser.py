"""Conquer with K ≥ 2 stages: one denoiser that runs the network of each timestep's stage (docs/method.md §12.5).

`MultiStageDenoiser(networks, partition)` is `StagedDiT` for any number of stages:
`networks[i]` serves stage i of the `StagePartition` (0 = noisiest), and a timestep's
stage comes from the partition's one rule (rounded half up, clipped; eq. 1.5). Like
`StagedDiT` it forwards every argument, splits a mixed batch by stage (stages that are
the same network object share one call) and reads `config`, `dtype`, `device` and any
other attribute from its first network, so a sampler or a diffusers pipeline calls it as
it would the dense model. `StagedDiT` stays the three-stage type that checkpoints hold.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from mosaic_core.divide.multistage import StagePartition


class MultiStageDenoiser(nn.Module):
    """A denoiser with one sub-network per stage of a K-stage partition.

    `stage_calls` records the stage index of every call (a mixed batch adds one entry per
    stage it contains, noisiest first); `reset_stage_calls()` clears it.
    """

    def __init__(self, networks: Sequence[nn.Module], partition: StagePartition) -> None:
        super().__init__()
        networks = list(networks)
        if len(networks) != partition.num_stages:
            raise ValueError(f"the partition has {partition.num_stages} stages but {len(networks)} networks were given")
        self.stage_networks = nn.ModuleList(networks)
        self.partition = partition
        self.stage_calls: list[int] = []

    @property
    def config(self):
        """The dense model's config (the sub-networks share it)."""
        return self.stage_networks[0].config

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype (as `ModelMixin.dtype`)."""
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Parameter device (as `ModelMixin.device`)."""
        return next(self.parameters()).device

    def networks(self) -> tuple[nn.Module, ...]:
        """The stage sub-networks, noisiest first."""
        return tuple(self.stage_networks)

    def reset_stage_calls(self) -> None:
        """Forget the recorded stage calls."""
        self.stage_calls.clear()

    def stage_index(self, timestep) -> torch.Tensor:
        """Stage of each timestep (0 = noisiest; same shape, long)."""
        t = torch.as_tensor(timestep, dtype=torch.float64).cpu().numpy()
        return torch.from_numpy(self.partition.stage_of(t))

    def __getattr__(self, name: str):
        """Attributes a pipeline reads from its denoiser come from the first network."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            networks = self.__dict__.get("_modules", {}).get("stage_networks")
            if networks is None or name.startswith("_"):
                raise
            return getattr(networks[0], name)

    def forward(self, hidden_states: torch.Tensor, timestep=None, *args: Any, return_dict: bool = True, **kwargs: Any):
        """The stage network's forward for these timesteps; a mixed batch is split by stage and put back in order."""
        from mosaic_core.conquer.staged_denoiser import call_denoiser
        from mosaic_core.models.adapters import select_rows

        if timestep is None:
            raise ValueError("MultiStageDenoiser needs a timestep to choose the stage sub-network")
        stage = self.stage_index(timestep.detach().cpu() if torch.is_tensor(timestep) else timestep).reshape(-1)
        batch = hidden_states.shape[0]
        present = sorted(set(stage.tolist()))
        networks = self.networks()
        if len({id(networks[index]) for index in present}) == 1:
            self.stage_calls.extend(present)
            return call_denoiser(networks[present[0]], hidden_states, timestep, args, return_dict, kwargs)
        if stage.numel() != batch:
            raise ValueError(f"timestep must be a scalar or have one entry per sample ({batch}), got {stage.numel()}")
        output, output_type = None, None
        for index in present:
            rows = torch.nonzero(stage == index).flatten()
            self.stage_calls.append(index)
            rows_dev = rows.to(hidden_states.device)
            part = call_denoiser(
                networks[index], hidden_states.index_select(0, rows_dev), select_rows(timestep, rows, batch),
                select_rows(tuple(args), rows, batch), True, select_rows(kwargs, rows, batch),
            )
            output_type = type(part)
            if output is None:
                output = part.sample.new_empty((batch, *part.sample.shape[1:]))
            output[rows_dev] = part.sample
        if not return_dict:
            return (output,)
        return output_type(sample=output)
