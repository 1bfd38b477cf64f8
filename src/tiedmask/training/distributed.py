"""Data-parallel training across processes (torchrun + DistributedDataParallel).

`tiedmask train` becomes data-parallel when started by torchrun (WORLD_SIZE > 1). The batch
size stays the *global* batch: every process draws the same shuffled, augmented global batch
and keeps its slice, so a run on N processes computes the same steps as a run on one (up to
the order of floating-point sums), and a recipe's hyper-parameters do not depend on N.
BatchNorm statistics are per process during a step (as with plain DDP) and averaged before
evaluation; each process evaluates a slice of the test set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's slice of a global batch (the batch size is a multiple of world)."""
        if not self.enabled:
            return batch
        per = len(batch) // self.world
        return batch[self.rank * per:(self.rank + 1) * per]

    def sum(self, *values: float) -> list[float]:
        """Sum scalars over processes (identity on one process)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def from_main(self, value: float) -> float:
        """Rank 0's value on every process (so that time-driven decisions agree)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(t, 0)
        return float(t.item())

    def average_buffers(self, model: torch.nn.Module) -> None:
        """Average floating-point buffers (BatchNorm running statistics) over processes."""
        if not self.enabled:
            return
        for buf in model.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf)
                buf.div_(self.world)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup(device_type: str, batch_size: int) -> Dist:
    """Join the process group that torchrun describes in the environment (or stay single)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if batch_size % world:
        raise ConfigError(f"batch_size {batch_size} is the global batch and must be divisible by "
                          f"the {world} processes; choose a multiple of {world}")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    return Dist(rank=dist.get_rank(), world=world, local_rank=local_rank)


def teardown(ctx: Dist) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
