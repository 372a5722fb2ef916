"""One process or several (``torchrun`` / ``accelerate launch``): rank, world size, and the few collective
operations the loop needs. On CPU the gloo backend is used."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_environment() -> Distributed:
        """Join the process group when a launcher set WORLD_SIZE > 1 (torchrun and accelerate both do)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return Distributed()
        if not dist.is_initialized():
            # collectives on CPU tensors go through gloo, on CUDA tensors through NCCL (where there is CUDA)
            dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size())

    def barrier(self) -> None:
        """Wait for every process (nothing to wait for with one)."""
        if self.world_size > 1:
            dist.barrier()

    def broadcast(self, value):
        """Rank 0's value, on every rank (a decision such as early stopping must be the same everywhere)."""
        if self.world_size == 1:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the processes (a step's loss: each process saw its share of the
        global batch, so the mean is the loss of the whole batch, as one process would log it)."""
        if self.world_size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total)
        return total.item() / self.world_size

    def shutdown(self) -> None:
        """Leave the process group, if one was joined."""
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def gradient_sync(trained: torch.nn.Module, final: bool) -> contextlib.AbstractContextManager:
    """The context of one micro-batch's backward pass: gradients are averaged across processes only in the
    ``final`` micro-batch of an optimizer step (DDP's ``no_sync`` before it; FSDP keeps them unreduced);
    one process: nothing to do."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(trained, FSDPModule):
        trained.set_requires_gradient_sync(final)
    elif isinstance(trained, DistributedDataParallel) and not final:
        return trained.no_sync()
    return contextlib.nullcontext()
