"""Which training examples each optimizer step and each process sees: small pure functions.

Data order is a pure function of (seed, epoch): every epoch is a seeded permutation of the training set, and
optimizer step ``s`` of an epoch consumes the next ``batch_size x world_size x gradient_accumulation``
examples, rank ``r`` taking its slice of each micro-batch. A resumed run, or ``N`` processes with batch ``b``
instead of one with batch ``N·b``, therefore sees exactly the same examples in the same order.

A batch sampler is anything with ``rows(step) -> list[int]`` (the global batch of an optimizer step, as row
indices of the training split); :class:`SeededPermutation` is the default. A sampler that groups examples of
similar length plugs in at the same place (``TrainingRun.sampler``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from peftkit.config import ConfigError


def global_batch_size(batch_size: int, world_size: int, accumulation: int) -> int:
    """Examples per optimizer step over all processes and micro-batches."""
    return batch_size * world_size * accumulation


def steps_per_epoch(examples: int, global_batch: int) -> int:
    """Whole optimizer steps in one pass over ``examples``; the remainder of an epoch is left out.

    Raises ConfigError when the split is smaller than one global batch."""
    steps = examples // global_batch
    if steps == 0:
        raise ConfigError(
            f"the training split has {examples} examples, fewer than one batch of {global_batch}"
        )
    return steps


def total_steps(max_steps: int | None, epochs: float, per_epoch: int) -> int:
    """``max_steps`` when set, else ``epochs`` (possibly fractional) passes, rounded up to a whole step."""
    return max_steps or math.ceil(epochs * per_epoch)


def micro_batch_rows(
    step_rows: list[int], micro: int, batch_size: int, world_size: int, rank: int
) -> list[int]:
    """This process's rows of micro-batch ``micro`` of an optimizer step's ``step_rows``."""
    width = batch_size * world_size
    rows = step_rows[micro * width :][:width]
    return rows[rank * batch_size : (rank + 1) * batch_size]


class BatchSampler(Protocol):
    def rows(self, step: int) -> list[int]:
        """Row indices of the training split that optimizer step ``step`` (0-based) consumes."""
        ...


@dataclass(frozen=True)
class SeededPermutation:
    """Each epoch a permutation of the ``examples`` rows seeded by ``seed + epoch``, cut into global batches."""

    seed: int
    examples: int
    global_batch: int

    def rows(self, step: int) -> list[int]:
        epoch, position = divmod(step, steps_per_epoch(self.examples, self.global_batch))
        order = torch.randperm(self.examples, generator=torch.Generator().manual_seed(self.seed + epoch))
        return order[position * self.global_batch : (position + 1) * self.global_batch].tolist()
