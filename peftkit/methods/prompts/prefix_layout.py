"""Where a model's prefixes go and how they get there: the shape of each attention layer's keys and values, and
the route by which each stack's self-attention receives them.

Routes (how the learned keys and values reach one stack's self-attention):
- ``cache``: the model's forward reads ``past_key_values`` for that stack (every decoder; BERT-style encoders;
  an encoder-decoder's decoder, self- and cross-attention). The prefix is a filled KV cache.
- ``t5``: T5's encoder stack drops any cache it is given, but its attention modules read one; each gets it
  through a pre-hook while the encoder runs.
- ``interface``: the forward takes no cache, but every attention layer calls transformers' attention interface
  (``ALL_ATTENTION_FUNCTIONS``): DistilBERT, ALBERT, ModernBERT, BART's encoder. The prefix is put in front
  of the keys and values passed to that function.
- ``deberta``: DeBERTa-v2's disentangled attention, which neither reads a cache nor uses the interface: the
  prefix enters as ``n`` extra key/value positions 0 .. n-1 in front of the real tokens (n .. n+L-1), with
  DeBERTa's own relative-position terms, through hooks on its projections.

Anything else is refused when the adapter is applied, naming prompt tuning and P-tuning, which reach every
model through its input embedding.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import nn

from peftkit.config import ConfigError

# Encoder stacks whose self-attention takes no cache, by transformers `model_type`: their route, and for
# ALBERT (one block shared by every layer) how many attention calls a forward pass makes.
ENCODER_ROUTES = {
    "t5": "t5",
    "mt5": "t5",
    "umt5": "t5",
    "bart": "interface",
    "mbart": "interface",
    "distilbert": "interface",
    "albert": "interface",
    "modernbert": "interface",
    "deberta-v2": "deberta",
}
INTERFACE_IMPLEMENTATIONS = ("sdpa", "eager")  # the attention functions the interface route wraps


@dataclass(frozen=True)
class PrefixLayout:
    """Shapes and routes of one model's prefixes.

    ``layers`` / ``heads``: the (decoder or only) stack's attention layers and the heads of its KV cache;
    ``encoder_layers`` / ``encoder_heads``: an encoder-decoder's encoder (0 otherwise); ``route``: how the
    (only or encoder) stack's self-attention gets its prefix; an encoder-decoder's decoder always reads a cache.
    """

    layers: int
    heads: int
    head_dim: int
    route: str
    cross: bool = False
    encoder_layers: int = 0
    encoder_heads: int = 0
    encoder_head_dim: int = 0

    def shape(self, n: int, encoder: bool = False) -> tuple[int, ...]:
        """A prefix tensor's shape: (layers, 2 [keys, values], heads, n, head_dim)."""
        if encoder:
            return (self.encoder_layers, 2, self.encoder_heads, n, self.encoder_head_dim)
        return (self.layers, 2, self.heads, n, self.head_dim)


def prefix_layout(model: nn.Module) -> PrefixLayout:
    """The model's :class:`PrefixLayout`; raises :class:`ConfigError` for a model prefixes cannot reach."""
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(f"{type(model).__name__} has no transformers config; prefix tuning needs one")
    model_type = getattr(config, "model_type", None)
    heads = _first(config, "decoder_attention_heads", "num_attention_heads")
    head_dim = _head_dim(config, heads)
    if getattr(config, "is_encoder_decoder", False):
        encoder_heads = _first(config, "encoder_attention_heads", "num_attention_heads")
        return PrefixLayout(
            layers=_first(config, "num_decoder_layers", "decoder_layers", "num_hidden_layers"),
            heads=heads,
            head_dim=head_dim,
            route=_known_route(model, model_type),
            cross=True,
            encoder_layers=_first(config, "encoder_layers", "num_layers", "num_hidden_layers"),
            encoder_heads=encoder_heads,
            encoder_head_dim=_head_dim(config, encoder_heads),
        )
    backbone = getattr(model, "base_model", model)  # transformers: the model without its task head
    reads_cache = "past_key_values" in inspect.signature(backbone.forward).parameters
    route = "cache" if reads_cache else _known_route(model, model_type)
    layers = _first(config, "num_hidden_layers")
    if model_type == "albert":  # each of the layers runs every block of its group once
        layers *= getattr(config, "inner_group_num", 1)
    return PrefixLayout(layers=layers, heads=_cache_heads(config, heads), head_dim=head_dim, route=route)


def _head_dim(config: Any, heads: int) -> int:
    return _first(config, "head_dim", "d_kv", default=None) or _first(config, "hidden_size") // heads


def _cache_heads(config: Any, heads: int) -> int:
    """Heads of the KV cache: the key/value heads (grouped or multi-query attention), except where the model
    broadcasts them to every head before caching (Falcon's new decoder layout)."""
    if config.model_type == "falcon":
        if getattr(config, "new_decoder_architecture", False):
            return heads
        return 1 if getattr(config, "multi_query", False) else heads
    return _first(config, "num_key_value_heads", default=heads)


def _known_route(model: nn.Module, model_type: str | None) -> str:
    route = ENCODER_ROUTES.get(model_type)
    if route is None:
        raise ConfigError(
            f"prefix tuning / P-tuning v2 cannot reach the attention of {type(model).__name__} (model_type "
            f"{model_type!r}): its forward takes no `past_key_values` and peftkit knows no other way into its "
            "attention layers. Prompt tuning or P-tuning work on it (they enter through the input embedding)"
        )
    implementation = getattr(model.config, "_attn_implementation", None)
    if route == "interface" and implementation not in INTERFACE_IMPLEMENTATIONS:
        raise ConfigError(
            f"prefix tuning on {type(model).__name__} puts its prefix into the {INTERFACE_IMPLEMENTATIONS} "
            f"attention functions; this model uses attn_implementation={implementation!r}. Load it with "
            "attn_implementation='sdpa' (or 'eager')"
        )
    return route


def _first(config: Any, *attributes: str, **fallback: Any) -> Any:
    """The first of ``attributes`` the config sets (transformers' ``attribute_map`` spellings included)."""
    for attribute in attributes:
        value = getattr(config, attribute, None)
        if value is not None:
            return value
    if "default" in fallback:
        return fallback["default"]
    raise ConfigError(f"{type(config).__name__} sets none of {list(attributes)}")
