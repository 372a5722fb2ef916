"""The shape of a model's keys and values: what a prefix of virtual tokens (prefix tuning, P-tuning v2) or a
filled KV cache must match."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from peftkit.architectures.table import TABLE
from peftkit.config import ConfigError


@dataclass(frozen=True)
class AttentionLayout:
    """Per stack: attention layers (one KV-cache entry each), heads, heads of the KV cache and head size.

    ``layers`` / ``heads`` / ``kv_heads`` / ``head_dim``: the decoder's (or the only stack's); ``kv_heads`` is
    fewer than ``heads`` with grouped-query or multi-query attention. ``encoder_*``: an encoder-decoder's
    encoder (0 otherwise).
    """

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    encoder_layers: int = 0
    encoder_heads: int = 0
    encoder_head_dim: int = 0

    def shape(self, n: int, encoder: bool = False) -> tuple[int, int, int, int, int]:
        """A prefix of ``n`` positions: (layers, 2 [keys, values], kv heads, n, head_dim)."""
        if encoder:
            return (self.encoder_layers, 2, self.encoder_heads, n, self.encoder_head_dim)
        return (self.layers, 2, self.kv_heads, n, self.head_dim)


def attention_layout(model: nn.Module) -> AttentionLayout:
    """The :class:`AttentionLayout` of ``model``, read from its (text) config with the rules of its architecture
    entry (Falcon's cache heads, ALBERT's shared blocks run several times per layer).

    Raises :class:`ConfigError` when the model has no transformers config or the config lacks a size.
    """
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(
            f"{type(model).__name__} has no transformers config; its attention layout is unknown"
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    arch = TABLE.get(config.model_type) or TABLE.get(getattr(text, "model_type", None))
    heads = _first(text, "decoder_attention_heads", "num_attention_heads")
    if arch is not None and arch.cache_heads is not None:
        kv_heads = arch.cache_heads(text)
    else:
        kv_heads = _first(text, "num_key_value_heads", default=heads)
    if getattr(text, "is_encoder_decoder", False):
        encoder_heads = _first(text, "encoder_attention_heads", "num_attention_heads")
        return AttentionLayout(
            layers=_first(text, "num_decoder_layers", "decoder_layers", "num_hidden_layers"),
            heads=heads,
            kv_heads=kv_heads,
            head_dim=_head_dim(text, heads),
            encoder_layers=_first(text, "encoder_layers", "num_layers", "num_hidden_layers"),
            encoder_heads=encoder_heads,
            encoder_head_dim=_head_dim(text, encoder_heads),
        )
    layers = arch.attention_layers(text) if arch is not None and arch.attention_layers else None
    layers = layers or _first(text, "num_hidden_layers")
    return AttentionLayout(layers=layers, heads=heads, kv_heads=kv_heads, head_dim=_head_dim(text, heads))


def _head_dim(config: Any, heads: int) -> int:
    return _first(config, "head_dim", "d_kv", default=None) or _first(config, "hidden_size") // heads


def _first(config: Any, *attributes: str, **fallback: Any) -> Any:
    """The first of ``attributes`` the config sets (transformers' ``attribute_map`` spellings included)."""
    for attribute in attributes:
        value = getattr(config, attribute, None)
        if value is not None:
            return value
    if "default" in fallback:
        return fallback["default"]
    raise ConfigError(f"{type(config).__name__} sets none of {list(attributes)}")
