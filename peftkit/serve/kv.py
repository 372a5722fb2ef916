"""The running batch's KV cache: one row per request, rows joining and leaving between decode steps.

Rows are right-aligned: the batch's window is ``width`` tokens wide and row ``i`` holds its ``length_i``
tokens in the window's last ``length_i`` columns; the columns before them hold stale values that the
attention mask hides. Each layer's keys and values live in one preallocated buffer per layer,
``(row capacity, kv_heads, column capacity, head_dim)``, and the window is a view of it: columns
``[start, end)`` of the first ``rows`` rows. A decode step writes its one new column at ``end`` (every row's
next token lands in the same column, because the rows are right-aligned) and the window grows by one:
no step copies the cache, where a concatenating cache (transformers' ``DynamicCache``) copies all of it
at every step and layer. When the buffer is full the window slides back to column 0, or the buffer doubles:
a copy every so many steps, O(1) per step amortised.

A row joins with the cache of its prefill (rows prefilled together come left-padded alike): its tokens are
written into the window's last columns; a longer prompt widens the window to the left. When rows leave,
the kept rows move up to the front rows and the columns no remaining row uses drop out of the window, so
the width is always the longest remaining row. This is the per-row cache of continuous batching (Yu et al.
2022, Orca) in the dense layout transformers' attention reads, rather than vLLM's paged blocks: on a CPU
or a single device the dense window is what the attention kernels read fastest.

Why stale columns are harmless: the attention mask gives them probability exactly 0, and every value the
buffer ever holds is finite (zeros at allocation, then keys and values the model computed), so they add
exact zeros.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from peftkit.config import ConfigError

HEADROOM = 64  # free columns a new or regrown buffer gets beyond the window (decode steps before a move)


def check_cache(cache) -> None:
    """Refuse caches this layout cannot batch (sliding windows, static or quantized caches)."""
    if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
        kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])})
        raise ConfigError(
            f"peftkit serve batches full-attention dynamic KV caches; this model returns {type(cache).__name__} "
            f"with layers {kinds} (sliding-window or static caches are not supported yet)"
        )


class WindowLayer(DynamicLayer):
    """One model layer's cache as transformers' attention sees it: ``keys`` / ``values`` are the batch's
    window (rows, kv_heads, width, head_dim), views of the :class:`BatchCache`'s buffers; ``update``
    writes the step's new columns into the buffers and returns the window widened by them."""

    def __init__(self, owner: BatchCache, index: int) -> None:
        super().__init__()
        self.owner, self.index = owner, index
        self.is_initialized = True
        self.refresh()

    def refresh(self) -> None:
        owner, i = self.owner, self.index
        self.keys = owner.key_buffers[i][: owner.rows, :, owner.start : owner.end]
        self.values = owner.value_buffers[i][: owner.rows, :, owner.start : owner.end]
        self.dtype, self.device = self.keys.dtype, self.keys.device

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        owner, i = self.owner, self.index
        new = key_states.shape[-2]  # (rows, kv_heads, new, head_dim)
        if owner.end + new > owner.key_buffers[i].shape[2]:
            raise RuntimeError("BatchCache.reserve() was not called before the step")  # a bug, not input
        columns = slice(owner.end, owner.end + new)
        owner.key_buffers[i][: owner.rows, :, columns] = key_states
        owner.value_buffers[i][: owner.rows, :, columns] = value_states
        window = slice(owner.start, owner.end + new)
        return owner.key_buffers[i][: owner.rows, :, window], owner.value_buffers[i][: owner.rows, :, window]


class BatchCache:
    """The KV cache of a decode batch plus each row's length (tokens it holds, virtual tokens included).

    ``cache`` is what the model's forward takes as ``past_key_values`` (None while the batch is empty).
    Call :meth:`step_inputs` before each decode step (it makes room for the step's column) and
    :meth:`advance` after it."""

    def __init__(self, row_capacity: int = 1) -> None:
        self.row_capacity = row_capacity  # rows the first buffers get (the batch's size limit: no regrowth)
        self._clear()

    def _clear(self) -> None:
        self.cache: DynamicCache | None = None
        self.lengths: list[int] = []
        # one per model layer: (row capacity, kv_heads, column capacity, head_dim)
        self.key_buffers: list[torch.Tensor] = []
        self.value_buffers: list[torch.Tensor] = []
        self.start = self.end = 0  # the window's columns

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return max(self.lengths, default=0)

    def join(self, cache: DynamicCache, lengths: list[int]) -> None:
        """Append the rows of ``cache`` (a prefill's, right-aligned: row i's ``lengths[i]`` tokens in its last
        columns) to the batch, widening the window to the left when the new rows are longer."""
        width = max(self.width, cache.get_seq_length())
        old_rows, rows = self.rows, self.rows + len(lengths)
        if not self.key_buffers:
            self._allocate(cache, max(rows, self.row_capacity), width)
        elif rows > self.key_buffers[0].shape[0] or self.end - width < 0:
            capacity = self.key_buffers[0].shape[0]  # rows grow only when they must, by doubling
            self._relayout(capacity if rows <= capacity else max(rows, 2 * capacity), width)
        self.start = self.end - width
        new_width = cache.get_seq_length()
        columns = slice(self.end - new_width, self.end)
        for index, layer in enumerate(cache.layers):  # (new rows, kv_heads, new_width, head_dim)
            self.key_buffers[index][old_rows:rows, :, columns] = layer.keys
            self.value_buffers[index][old_rows:rows, :, columns] = layer.values
        self.lengths += lengths
        self._refresh()

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order, moved to the front rows) and narrow the window to the longest."""
        if not rows:
            self._clear()  # an empty batch lets its buffers go
            return
        if rows != list(range(len(rows))):  # rows that are already the front rows in order stay put
            index = torch.tensor(rows, dtype=torch.long, device=self.key_buffers[0].device)
            window = slice(self.start, self.end)
            for buffer in (*self.key_buffers, *self.value_buffers):
                buffer[: len(rows), :, window] = buffer[index, :, window]  # the gather copies first
        self.lengths = [self.lengths[i] for i in rows]
        self.start = self.end - self.width
        self._refresh()

    def reserve(self, columns: int = 1) -> None:
        """Make room for ``columns`` more columns after the window (slide it back, or grow the buffers)."""
        capacity = self.key_buffers[0].shape[2]
        if self.end + columns <= capacity:
            return
        width = self.end - self.start
        grown = capacity if width + columns + HEADROOM // 2 <= capacity else 2 * (width + columns) + HEADROOM
        self._relayout(self.key_buffers[0].shape[0], width, grown - width)

    def step_inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Make room for the next one-token step; its attention mask (rows, width + 1) and position ids
        (rows, 1)."""
        self.reserve(1)
        width = self.width
        lengths = torch.tensor(self.lengths, dtype=torch.long)
        columns = torch.arange(width + 1)
        mask = (columns[None, :] >= (width - lengths)[:, None]).long()
        return mask.to(device), lengths[:, None].to(device)

    def advance(self) -> None:
        """Every row gained the token of the step just run (written at column ``end`` by the layers)."""
        self.end += 1
        self.lengths = [length + 1 for length in self.lengths]
        self._refresh()

    # --- buffers ------------------------------------------------------------------------------------------
    def _allocate(self, cache: DynamicCache, rows: int, width: int) -> None:
        """Zeroed buffers shaped after the prefill's layers (each layer its own heads, head size, dtype)."""
        self.key_buffers = [_zeros_like(layer.keys, rows, width + HEADROOM) for layer in cache.layers]
        self.value_buffers = [_zeros_like(layer.values, rows, width + HEADROOM) for layer in cache.layers]
        self.start = self.end = width
        self.cache = DynamicCache()
        self.cache.layers = [WindowLayer(self, i) for i in range(len(cache.layers))]

    def _relayout(self, row_capacity: int, width: int, free: int = HEADROOM) -> None:
        """New buffers of ``row_capacity`` rows with the window right-aligned at column ``width`` (its
        current columns copied there) and ``free`` empty columns after it."""
        current = self.end - self.start
        for buffers in (self.key_buffers, self.value_buffers):
            for i, old in enumerate(buffers):
                new = _zeros_like(old, row_capacity, width + free)
                new[: self.rows, :, width - current : width] = old[: self.rows, :, self.start : self.end]
                buffers[i] = new
        self.start, self.end = width - current, width

    def _refresh(self) -> None:
        if self.cache is not None:
            for layer in self.cache.layers:
                layer.refresh()


def _zeros_like(tensor: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    _, heads, _, head_dim = tensor.shape
    return tensor.new_zeros((rows, heads, columns, head_dim))
