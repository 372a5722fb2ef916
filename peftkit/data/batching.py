"""Less padding in training batches: length-grouped example order, and packing several examples into a row.

Both are pure functions of their inputs, so a run is reproducible from its seed and resumable from any step.

- :class:`StepOrder` says which examples each optimizer step takes. Without lengths every epoch is a seeded
  permutation (the order peftkit has always used). With lengths, every epoch is cut into mega-batches of
  ``group_batches`` global batches from a seeded permutation; each mega-batch is sorted by length and cut
  into global batches, and the global batches are shuffled: examples of similar length share a batch, the
  batches still come in random order (the scheme of transformers' ``LengthGroupedSampler`` and of
  fairseq's bucketing). With class labels (sequence classification) the sort keeps every batch's label mix:
  each label's examples are sorted by length on their own and the mega-batch is ordered by each example's
  rank within its label, so a batch takes the same length band of every label, in the labels' proportions.
  Where a text's length goes with its label (long spam, short ham), plain sorting would make batches of
  mostly one label; this way a batch's labels are as mixed as a random batch's, and only the padding goes.
- :func:`pack_batch` lays a right-padded causal-LM batch out as fewer, fuller rows, several examples per
  row, each keeping its own positions (``position_ids`` restart at 0) and its own attention (a block-diagonal
  causal mask): the model computes for each example exactly what it computes for it alone, and the label
  that would cross from one example into the next is ignored. The loss over the batch is unchanged; only
  the padding goes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from peftkit.data.core import DataError

IGNORE_INDEX = -100

__all__ = ["StepOrder", "pack_batch", "pack_rows"]


@dataclass(frozen=True)
class StepOrder:
    """The examples of each optimizer step, as a pure function of ``(seed, step)``.

    ``size`` examples, ``global_batch`` of them per step (batch x processes x accumulation); ``lengths``
    (one per example, e.g. tokens) turns on length grouping, ``group_batches`` global batches per sorted
    mega-batch; ``labels`` (one class per example, with ``lengths``) keeps each batch's label mix while
    grouping (see the module's docstring). An epoch is ``size // global_batch`` steps; the examples left
    over are not used that epoch.
    """

    size: int
    global_batch: int
    seed: int
    lengths: Sequence[int] | None = None
    group_batches: int = 32
    labels: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.global_batch < 1 or self.group_batches < 1:
            raise DataError(
                f"`global_batch` and `group_batches` must be positive, got {self.global_batch}, "
                f"{self.group_batches}"
            )
        if self.size < self.global_batch:
            raise DataError(f"{self.size} examples are fewer than one batch of {self.global_batch}")
        if self.lengths is not None and len(self.lengths) != self.size:
            raise DataError(f"got {len(self.lengths)} lengths for {self.size} examples")
        if self.labels is not None and (self.lengths is None or len(self.labels) != self.size):
            raise DataError(
                f"`labels` go with `lengths`, one per example: got {len(self.labels)} for {self.size}"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.size // self.global_batch

    def epoch(self, epoch: int) -> list[int]:
        """Every example index once, in the order epoch ``epoch`` takes them."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.lengths is None:
            return order
        mega = self.global_batch * self.group_batches
        batches: list[list[int]] = []
        leftover: list[int] = []
        for start in range(0, self.size, mega):
            group = self._by_length(order[start : start + mega])
            full = len(group) - len(group) % self.global_batch
            batches += [group[i : i + self.global_batch] for i in range(0, full, self.global_batch)]
            leftover += group[full:]
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return [i for b in shuffled for i in batches[b]] + leftover

    def _by_length(self, group: list[int]) -> list[int]:
        """``group`` longest first; with labels, by each example's length rank within its own label (ties keep
        the group's seeded order), so that every cut of the result holds the labels in the group's shares."""
        longest_first = sorted(group, key=lambda i: -self.lengths[i])  # stable: ties keep order
        if self.labels is None:
            return longest_first
        members: dict[int, list[int]] = {}
        for i in longest_first:
            members.setdefault(self.labels[i], []).append(i)
        quantile = {i: (rank + 0.5) / len(same) for same in members.values() for rank, i in enumerate(same)}
        return sorted(group, key=lambda i: quantile[i])

    def step_rows(self, step: int) -> list[int]:
        """The ``global_batch`` example indices of optimizer step ``step`` (0-based, counting across epochs)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        return self.epoch(epoch)[position * self.global_batch : (position + 1) * self.global_batch]


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Examples (by index) grouped into rows of at most ``capacity`` tokens: first fit, longest first.

    Deterministic; every example appears once, rows keep their examples in index order. Raises
    :class:`~peftkit.data.core.DataError` for an example longer than ``capacity``.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[index] > capacity:
            raise DataError(f"example {index} has {lengths[index]} tokens, more than a row of {capacity}")
        row = next((r for r, space in enumerate(free) if space >= lengths[index]), None)
        if row is None:
            rows.append([])
            free.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        free[row] -= lengths[index]
    return [sorted(r) for r in rows]


def pack_batch(batch: dict[str, torch.Tensor], capacity: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """A right-padded causal-LM batch (``input_ids``, ``attention_mask``, ``labels``: ``(rows, seq)``) packed
    into rows of at most ``capacity`` tokens.

    Returns ``input_ids``, ``labels``, ``position_ids`` ``(packed_rows, width)`` and ``attention_mask``
    ``(packed_rows, 1, width, width)``: an additive float mask (0 where a token may attend, the dtype's
    minimum elsewhere) that is causal within each example and closed between examples; transformers uses a
    4-D mask as given, with eager and SDPA attention alike. Each example's first label becomes -100: in the
    packed row the causal shift would score the previous example's last token on it. Padding tokens attend
    only to themselves (no empty softmax rows) and carry label -100.
    """
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    rows = pack_rows(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=batch["input_ids"].dtype)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=batch["labels"].dtype)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)  # which example each token belongs to
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            input_ids[r, at : at + n] = batch["input_ids"][i, :n]
            labels[r, at : at + n] = batch["labels"][i, :n]
            labels[r, at] = IGNORE_INDEX
            position_ids[r, at : at + n] = torch.arange(n)
            segment[r, at : at + n] = i
            at += n
    return {
        "input_ids": input_ids,
        "attention_mask": _block_causal_mask(segment),
        "position_ids": position_ids,
        "labels": labels,
    }


def _block_causal_mask(segment: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(rows, 1, width, width)`` additive mask from ``segment`` ``(rows, width)`` (-1: padding)."""
    width = segment.shape[1]
    same = segment[:, :, None] == segment[:, None, :]  # (rows, width, width)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = same & causal & (segment[:, :, None] >= 0)
    allowed |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty softmax row
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
