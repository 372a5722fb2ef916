"""Where a model's prefixes go and how they get there: the shape of each attention layer's keys and values, and
the route by which each stack's self-attention receives them.

Shapes come from the architecture table (:func:`peftkit.architectures.attention_layout`). Routes (how the
learned keys and values reach one stack's self-attention):
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

from torch import nn

from peftkit.architectures import AttentionLayout, attention_layout
from peftkit.config import ConfigError

# Encoder stacks whose self-attention takes no cache, by transformers `model_type`: the peftkit mechanism that
# reaches it (the layer counts and shapes come from the architecture table).
ENCODER_ROUTES = {
    "t5": "t5",
    "mt5": "t5",
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
    """Shapes and route of one model's prefixes: ``attention`` (layers, cache heads, head size per stack, from
    the architecture table), ``route`` (how the only or encoder stack's self-attention gets its prefix; an
    encoder-decoder's decoder always reads a cache) and ``cross`` (an encoder-decoder)."""

    attention: AttentionLayout
    route: str
    cross: bool = False

    def shape(self, n: int, encoder: bool = False) -> tuple[int, ...]:
        """A prefix tensor's shape: (layers, 2 [keys, values], heads, n, head_dim)."""
        return self.attention.shape(n, encoder=encoder)


def prefix_layout(model: nn.Module) -> PrefixLayout:
    """The model's :class:`PrefixLayout`; raises :class:`ConfigError` for a model prefixes cannot reach."""
    attention = attention_layout(model)  # raises for a model without a transformers config
    model_type = getattr(model.config, "model_type", None)
    if getattr(model.config, "is_encoder_decoder", False):
        return PrefixLayout(attention, _known_route(model, model_type), cross=True)
    backbone = getattr(model, "base_model", model)  # transformers: the model without its task head
    reads_cache = "past_key_values" in inspect.signature(backbone.forward).parameters
    return PrefixLayout(attention, "cache" if reads_cache else _known_route(model, model_type))


def _known_route(model: nn.Module, model_type: str | None) -> str:
    route = ENCODER_ROUTES.get(model_type)
    if route is None:
        raise ConfigError(
            f"prefix tuning / P-tuning v2 cannot reach the self-attention of {type(model).__name__} "
            f"(model_type {model_type!r}): its (encoder) stack reads no `past_key_values` and peftkit knows no "
            "other way into its attention layers. Prompt tuning or P-tuning work on it (they enter through the "
            "input embedding)"
        )
    implementation = getattr(model.config, "_attn_implementation", None)
    if route == "interface" and implementation not in INTERFACE_IMPLEMENTATIONS:
        raise ConfigError(
            f"prefix tuning on {type(model).__name__} puts its prefix into the {INTERFACE_IMPLEMENTATIONS} "
            f"attention functions; this model uses attn_implementation={implementation!r}. Load it with "
            "attn_implementation='sdpa' (or 'eager')"
        )
    return route
