"""Prefixes for self-attention that reads no ``past_key_values``: the ``t5``, ``interface`` and ``deberta``
routes of :mod:`.prefix_layout`, each in effect for one forward pass of one stack (a :class:`PrefixCall`).

Every route gives layer ``l`` of the stack the keys ``P_K^l`` and values ``P_V^l`` (heads, n, head_dim) in
front of its own, attended by every query:

    softmax(q [P_K^l ; K]^T / sqrt(d) + bias) [P_V^l ; V]

- ``t5``: each encoder self-attention module gets a cache holding its layer's prefix through a forward
  pre-hook, and its ``mask`` extended over it; T5's relative position bias then places the real tokens
  after the ``n`` prefix positions, as in its decoder.
- ``interface``: while the call is open the model's ``_attn_implementation`` names a wrapper of the same
  attention function (``peftkit_prefix_sdpa`` / ``peftkit_prefix_eager``, registered with transformers'
  ``AttentionInterface``), which puts the next layer's prefix in front of the keys and values it is handed
  and extends the 4-D mask over it. Layers are counted in call order, so ALBERT's one shared block gets one
  prefix per depth. Positions stay the user's (0 .. L-1): prefixes carry none (rotary models rotate only
  the real keys, as with a cache).
- ``deberta``: hooks on each DisentangledSelfAttention make it compute over ``n + L`` positions: its query
  projection gets ``n`` zero rows (their outputs are dropped), its key and value projections get the
  prefix, the mask and DeBERTa's relative positions are rebuilt for ``n + L`` positions (prefix at 0 .. n-1,
  real tokens at n .. n+L-1), and the output keeps the real tokens' rows: DeBERTa's own code computes the
  content and relative-position terms for the prefix columns.

After the pass the call checks that every layer took its prefix exactly once (no layer silently skipped).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from peftkit.config import ConfigError

WRAPPED = ("sdpa", "eager")
_OPEN: ContextVar[PrefixCall | None] = ContextVar("peftkit_prefix_call", default=None)


class PrefixCall:
    """``prefix`` (layers, 2, heads, n, head_dim) in the self-attention of ``stack`` (the model, or an
    encoder-decoder's encoder) by ``route``, between :meth:`open` and :meth:`close`."""

    def __init__(self, model: nn.Module, stack: nn.Module, route: str, prefix: torch.Tensor) -> None:
        self.model, self.stack, self.route, self.prefix = model, stack, route, prefix
        self.used = 0  # layers that took their prefix
        self.current: dict[str, Any] | None = None  # the DeBERTa layer running now
        self._undo: list[Callable[[], None]] = []
        self._token = None

    def open(self) -> None:
        self._token = _OPEN.set(self)
        {"t5": self._open_t5, "interface": self._open_interface, "deberta": self._open_deberta}[self.route]()

    def close(self, completed: bool) -> None:
        """Undo the hooks; when the pass ``completed``, check that every layer took its prefix once."""
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        _OPEN.reset(self._token)
        if completed and self.used != self.prefix.shape[0]:
            raise ConfigError(
                f"prefix tuning: {type(self.model).__name__} ran {self.used} self-attention layers with a "
                f"prefix, the adapter has {self.prefix.shape[0]}; its attention does not take the prefix as "
                "expected (is another attention implementation or model code in use?)"
            )

    def next_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next layer's (keys, values), each (heads, n, head_dim)."""
        if self.used >= self.prefix.shape[0]:
            raise ConfigError(
                f"prefix tuning: {type(self.model).__name__} runs more self-attention layers than the "
                f"{self.prefix.shape[0]} its prefix was built for"
            )
        keys, values = self.prefix[self.used]
        self.used += 1
        return keys, values

    # --- t5 ------------------------------------------------------------------------------------------------
    def _open_t5(self) -> None:
        attentions = [
            m
            for m in self.stack.modules()
            if getattr(m, "is_decoder", True) is False and hasattr(m, "layer_idx")
        ]
        for module in attentions:
            handle = module.register_forward_pre_hook(self._t5_layer, with_kwargs=True)
            self._undo.append(handle.remove)

    def _t5_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.next_layer()  # counts the layer; its prefix is in the cache, under its layer_idx
        if self.current is None:  # one cache for the pass, filled at the first layer (the batch is known)
            batch = (args[0] if args else kwargs["hidden_states"]).shape[0]
            cache = DynamicCache(config=self.model.config)
            for index, (keys, values) in enumerate(self.prefix):  # (heads, n, head_dim) each
                cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), index)
            self.current = {"cache": cache}
        kwargs["past_key_values"] = self.current["cache"]
        if kwargs.get("mask") is not None:  # (batch, 1, queries, keys): bool "may attend" or additive float
            kwargs["mask"] = extend_mask(kwargs["mask"], self.prefix.shape[3])
        return args, kwargs

    # --- interface -----------------------------------------------------------------------------------------
    def _open_interface(self) -> None:
        config = self.model.config
        original = config._attn_implementation
        config._attn_implementation = f"peftkit_prefix_{original}"
        self._undo.append(lambda: setattr(config, "_attn_implementation", original))

    # --- deberta -------------------------------------------------------------------------------------------
    def _open_deberta(self) -> None:
        for attention in self.stack.modules():
            if not hasattr(attention, "disentangled_attention_bias"):
                continue
            hooks = [
                attention.register_forward_pre_hook(self._deberta_enter, with_kwargs=True),
                attention.register_forward_hook(self._deberta_exit),
            ] + [
                getattr(attention, f"{role}_proj").register_forward_hook(self._deberta_projection(role))
                for role in ("query", "key", "value")
            ]
            self._undo += [hook.remove for hook in hooks]

    def _deberta_enter(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments
        keys, values = self.next_layer()  # (heads, n, head_dim)
        n = keys.shape[1]
        hidden = given["hidden_states"]
        queries = given["query_states"] if given["query_states"] is not None else hidden
        rows = {"query": keys.new_zeros(keys.shape), "key": keys, "value": values}
        self.current = {"n": n, "hidden": hidden, "queries": queries, "rows": rows}
        mask = given["attention_mask"]  # (batch, 1, queries, keys)
        extended = mask.new_ones(*mask.shape[:-2], n + mask.shape[-2], n + mask.shape[-1])
        extended[..., n:, n:] = mask
        given["attention_mask"] = extended
        if getattr(module, "relative_attention", False):
            build = sys.modules[type(module).__module__].build_relative_position
            given["relative_pos"] = build(
                queries.new_empty(n + queries.shape[1], 0),
                hidden.new_empty(n + hidden.shape[1], 0),
                bucket_size=module.position_buckets,
                max_position=module.max_relative_positions,
            )
        return (), dict(given)

    def _deberta_projection(self, role: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            current = self.current
            source = None if current is None else current["queries" if role == "query" else "hidden"]
            if source is None or inputs[0] is not source:  # e.g. the relative embeddings DeBERTa projects too
                return None
            rows = current["rows"][role]  # (heads, n, head_dim) -> (n, heads * head_dim), the layout it views
            rows = rows.permute(1, 0, 2).reshape(rows.shape[1], -1).to(output.dtype)
            return torch.cat([rows.expand(output.shape[0], -1, -1), output], dim=1)

        return hook

    def _deberta_exit(self, module: nn.Module, args: tuple, output: tuple) -> tuple:
        n, self.current = self.current["n"], None
        context, probabilities = output  # (batch, n + L, d), (batch, heads, n + L, n + L) or None
        return context[:, n:], None if probabilities is None else probabilities[..., n:, :]


def extend_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """A 4-D attention mask (batch, heads, queries, keys) with ``n`` leading key columns every query attends:
    True for a boolean mask, 0 for an additive one. None (attend everywhere) stays None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ConfigError(
            f"prefix tuning extends 4-D attention masks; got {type(mask).__name__} of shape "
            f"{getattr(mask, 'shape', None)} (load the model with attn_implementation='sdpa' or 'eager')"
        )
    shape = (*mask.shape[:-1], n)
    attend = mask.new_ones(shape) if mask.dtype == torch.bool else mask.new_zeros(shape)
    return torch.cat([attend, mask], dim=-1)


def _prefixed(original: str) -> Callable:
    """The attention function ``original`` with the open call's next prefix in front of keys and values."""

    def attention(module, query, key, value, attention_mask, **kwargs):  # key, value: (B, heads, L, head_dim)
        inner = (
            sys.modules[type(module).__module__].eager_attention_forward
            if original == "eager"
            else ALL_ATTENTION_FUNCTIONS[original]
        )
        call = _OPEN.get()
        if call is not None and call.route == "interface":
            keys, values = call.next_layer()
            batch = key.shape[0]
            key = torch.cat([keys.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
            value = torch.cat([values.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
            attention_mask = extend_mask(attention_mask, keys.shape[1])
        return inner(module, query, key, value, attention_mask, **kwargs)

    return attention


for _name in WRAPPED:
    AttentionInterface.register(f"peftkit_prefix_{_name}", _prefixed(_name))
    ALL_MASK_ATTENTION_FUNCTIONS.register(f"peftkit_prefix_{_name}", ALL_MASK_ATTENTION_FUNCTIONS[_name])
