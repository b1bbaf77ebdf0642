"""Several processes, one result: work sharded by index, sums and outputs combined.

`accelerate launch` (or `torchrun`) starts N copies of a command; each learns its rank from
the environment (RANK, WORLD_SIZE, LOCAL_RANK). The commands then split their work **by
index**, never by re-seeding, so that the union of the shards is exactly the work one
process does:

| work                    | unit            | process r takes        | combined by                      |
|-------------------------|-----------------|------------------------|----------------------------------|
| calibration (Hessians)  | batch k         | k ≡ r (mod N)          | all-reduce of ΣXᵀX and n         |
| sampling                | batch k         | k ≡ r (mod N)          | gathered on rank 0 by batch index |
| evaluation (features)   | batch k         | k ≡ r (mod N)          | gathered on rank 0 by batch index |

Every random draw is a function of the global index (image i's noise is seeded with
(seed, i), calibration draws happen for the whole set before sharding), so sharding
changes nothing but the order of float64 additions. Only rank 0 writes files, prints
tables and shows progress bars.

On CPU use gloo (accelerate's multi-CPU state); on GPUs NCCL, one device per process
(`cuda` means `cuda:LOCAL_RANK`). With one process every function here is the identity
and nothing of `torch.distributed` is touched.

    accelerate launch --multi_gpu --num_processes 2 -m mosaic_core prune --sparsity 0.3 --out out/p
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch


def _world_size_from_environment() -> int:
    """WORLD_SIZE as set by `accelerate launch` / `torchrun` (1 when absent)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


@dataclass(frozen=True)
class Processes:
    """This process's place among the launched ones: `index` in [0, `count`)."""

    index: int = 0
    count: int = 1
    local_index: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files, prints and shows progress."""
        return self.index == 0

    @property
    def distributed(self) -> bool:
        """Whether collectives are needed (more than one process)."""
        return self.count > 1

    def owns(self, batch_index: int) -> bool:
        """Whether batch `batch_index` is this process's (round-robin: k ≡ index mod count)."""
        return batch_index % self.count == self.index

    def shard(self, num_batches: int) -> list[int]:
        """The batch indices of this process among `num_batches`, in increasing order."""
        return list(range(self.index, int(num_batches), self.count))

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of `tensor` over all processes (every process gets it)."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        work = tensor.to(_collective_device(), copy=True)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(tensor.device)

    def all_gather(self, value: Any) -> list[Any]:
        """Every process's `value` (picklable), in rank order, on every process."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.count
        dist.all_gather_object(values, value)
        return values

    def gather_to_main(self, value: Any) -> list[Any] | None:
        """Every process's `value` in rank order on rank 0; None on the others."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values: list[Any] | None = [None] * self.count if self.is_main else None
        dist.gather_object(value, values, dst=0)
        return values

    def barrier(self) -> None:
        """Wait until every process arrives here."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def to_dict(self) -> dict:
        return {"index": self.index, "count": self.count}


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors, gloo CPU ones."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_CURRENT: Processes | None = None


def current_processes(device: str | torch.device | None = None) -> Processes:
    """This process's `Processes`, joining the launched group once (identity for one process).

    `device` says which backend to join with: a CPU device (or no CUDA) → gloo; else NCCL.
    """
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    if _world_size_from_environment() == 1:
        _CURRENT = Processes()
        return _CURRENT
    from accelerate import PartialState

    on_cpu = not torch.cuda.is_available() or (device is not None and str(device).startswith("cpu"))
    state = PartialState(cpu=on_cpu)
    _CURRENT = Processes(index=state.process_index, count=state.num_processes, local_index=state.local_process_index)
    return _CURRENT


def finish_processes(succeeded: bool) -> None:
    """Leave the launched group cleanly: wait for every process, then destroy the group.

    Without this a process that returns early (ranks other than 0 skip writing) exits
    while rank 0 still holds the group open, and the C++ side of gloo can abort it at
    exit ("terminate called without an active exception", SIGABRT) although its work is
    done. After a failure there is no barrier (the others may never arrive), only the
    teardown; a second call is a no-op.
    """
    global _CURRENT
    processes, _CURRENT = _CURRENT, None
    if processes is None or not processes.distributed:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        if succeeded:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def process_device(device: str | torch.device | None, processes: Processes) -> str | torch.device | None:
    """`cuda` without an index means this process's own GPU (`cuda:LOCAL_RANK`) when launched."""
    if processes.distributed and device is not None and str(device) == "cuda":
        return f"cuda:{processes.local_index}"
    return device


def batch_ranges(num_items: int, batch_size: int) -> list[tuple[int, int]]:
    """Global batches [start, stop) of `batch_size` items (the last may be short)."""
    if int(batch_size) < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size!r}")
    return [(start, min(start + batch_size, num_items)) for start in range(0, int(num_items), int(batch_size))]


def in_batch_order(gathered: Sequence[Sequence[tuple[int, Any]]]) -> list[Any]:
    """Flatten per-process lists of (batch index, value) into values ordered by batch index."""
    pairs = [pair for part in gathered for pair in part]
    indices = [index for index, _ in pairs]
    if len(set(indices)) != len(indices):
        raise RuntimeError(f"a batch was computed twice: {sorted(indices)}")
    return [value for _, value in sorted(pairs, key=lambda pair: pair[0])]
