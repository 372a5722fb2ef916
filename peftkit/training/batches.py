"""Which training examples each optimizer step and each process sees: small pure functions.

Data order is a pure function of (seed, epoch): every epoch is a seeded permutation of the training set, and
optimizer step ``s`` of an epoch consumes the next ``batch_size x world_size x gradient_accumulation``
examples, rank ``r`` taking its slice of each micro-batch. A resumed run, or ``N`` processes with batch ``b``
instead of one with batch ``N·b``, therefore sees exactly the same examples in the same order.

A batch sampler is anything with ``step_rows(step) -> list[int]`` (the global batch of an optimizer step, as
row indices of the training split); :class:`peftkit.data.batching.StepOrder` without lengths is the default,
and with lengths it groups examples of similar length (``TrainingRun.sampler``).
"""

from __future__ import annotations

import math
from typing import Protocol

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
    """Which examples each optimizer step takes (:class:`peftkit.data.batching.StepOrder` is one)."""

    def step_rows(self, step: int) -> list[int]:
        """Row indices of the training split that optimizer step ``step`` (0-based) consumes."""
        ...
