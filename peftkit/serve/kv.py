"""The running batch's KV cache: one row per request, rows joining and leaving between decode steps.

Rows are right-aligned: the batch cache is ``width`` tokens wide and row ``i`` holds its ``length_i`` tokens
in the last ``length_i`` columns; the columns before them are padding that the attention mask hides. A row
joins with the cache of its prefill (rows prefilled together come left-padded alike): the narrower side is
padded on the left and the rows are appended. When rows leave, the columns no remaining row uses are cut off, so the width is always the longest
remaining row. This is the per-row cache of continuous batching (Yu et al. 2022, Orca) kept in the dense
layout transformers' models read, rather than paged blocks (vLLM): on a CPU the copies it costs when a row
joins are small next to a decode step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from peftkit.config import ConfigError


def check_cache(cache) -> None:
    """Refuse caches this layout cannot batch (sliding windows, static or quantized caches)."""
    if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
        kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])})
        raise ConfigError(
            f"peftkit serve batches full-attention dynamic KV caches; this model returns {type(cache).__name__} "
            f"with layers {kinds} (sliding-window or static caches are not supported yet)"
        )


class BatchCache:
    """The KV cache of a decode batch plus each row's length (tokens it holds, virtual tokens included)."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.lengths: list[int] = []

    @property
    def width(self) -> int:
        return max(self.lengths, default=0)

    def join(self, cache: DynamicCache, lengths: list[int]) -> None:
        """Append the rows of ``cache`` (a prefill's, right-aligned: row i's ``lengths[i]`` tokens in its last
        columns), padding the narrower side on the left to a common width."""
        width = max(self.width, cache.get_seq_length())
        parts = [cache] if self.cache is None else [self.cache, cache]
        for index, layer in enumerate(parts[0].layers):
            keys = [_pad_left(part.layers[index].keys, width) for part in parts]
            values = [_pad_left(part.layers[index].values, width) for part in parts]
            layer.keys, layer.values = torch.cat(keys), torch.cat(values)  # (rows, heads, width, head_dim)
        self.cache = parts[0]
        self.lengths += lengths

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order) and cut the columns no kept row uses."""
        if not rows:
            self.cache, self.lengths = None, []
            return
        old_width = self.width
        self.lengths = [self.lengths[i] for i in rows]
        drop = old_width - self.width
        index = torch.tensor(rows, dtype=torch.long)
        for layer in self.cache.layers:
            layer.keys = layer.keys[index.to(layer.keys.device), :, drop:]
            layer.values = layer.values[index.to(layer.values.device), :, drop:]

    def step_inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention mask (rows, width + 1) and position ids (rows, 1) of the next one-token step."""
        width = self.width
        lengths = torch.tensor(self.lengths, dtype=torch.long)
        columns = torch.arange(width + 1)
        mask = (columns[None, :] >= (width - lengths)[:, None]).long()
        return mask.to(device), lengths[:, None].to(device)

    def advance(self) -> None:
        """Every row gained the token of the step just run."""
        self.lengths = [length + 1 for length in self.lengths]


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - tensor.shape[-2]
    return tensor if missing == 0 else F.pad(tensor, (0, 0, missing, 0))
