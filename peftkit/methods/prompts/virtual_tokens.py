"""What every virtual-token method shares: finding the input embedding, and extending the model's keyword
arguments over ``n`` virtual tokens placed before the real ones.

The user always speaks about real tokens only: ``attention_mask``, ``position_ids``, ``token_type_ids`` and
``labels`` cover the tokens they passed (plus, while decoding with a cache, the real tokens already decoded).
The model sees ``n`` virtual tokens first, so each tensor grows at the front:

    attention_mask  (B, L) -> (B, n + L)   ones for the virtual tokens (left or right padding alike)
    position_ids    (B, L) -> (B, n + L)   0 .. n-1 for the virtual tokens, real positions shifted by n
                                            (while decoding with a cache: only the shift)
    token_type_ids  (B, L) -> (B, n + L)   segment 0 for the virtual tokens
    labels          (B, L) -> (B, n + L)   -100 (ignored) for the virtual tokens, when labels are per token
                                            of the input (causal LM, token classification); per-sequence
                                            labels and an encoder-decoder's decoder labels are left alone

Shifting positions by ``n`` keeps them equal to what ``generate()`` derives from the extended mask
(``cumsum(mask) - 1``), so a forward pass and ``generate()`` place every token at the same position.

A prompt ensemble of ``k`` prompts runs each example once per prompt in one batch: every batch-shaped tensor
is repeated ``k`` times, prompt-major (rows ``i*B .. (i+1)*B - 1`` carry prompt ``i``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftkit.config import ConfigError
from peftkit.layer import AdapterLayer, wrapper_in_chain

IGNORE_INDEX = -100  # the label value transformers' losses skip
# Keyword arguments with one row per example, repeated for each member of a prompt ensemble.
BATCH_KEYS = (
    "input_ids",
    "inputs_embeds",
    "attention_mask",
    "position_ids",
    "token_type_ids",
    "labels",
    "decoder_input_ids",
    "decoder_inputs_embeds",
    "decoder_attention_mask",
)


def input_embedding_path(model: nn.Module) -> str:
    """Dotted path of ``model.get_input_embeddings()`` (the token embedding the virtual tokens extend)."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if get is not None else None
    if embedding is None:
        raise ConfigError(
            f"{type(model).__name__} has no `get_input_embeddings()`; virtual-token methods need a "
            "transformers model with a token embedding"
        )
    for path, module in model.named_modules():
        if module is embedding:
            return path
    raise ConfigError(f"the input embedding of {type(model).__name__} is not one of its submodules")


def input_embedding_adapter(model: nn.Module, wrapper: type[AdapterLayer], method: str) -> AdapterLayer:
    """The ``wrapper`` holding a prompt method's adapters around the model's input embedding."""
    found = wrapper_in_chain(model.get_input_embeddings(), wrapper)
    if found is None:
        raise ConfigError(f"{type(model).__name__}'s input embedding carries no {method} adapter")
    return found


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def cached_length(kwargs: dict[str, Any]) -> int:
    """Tokens already in the ``past_key_values`` the caller passed (0: this call starts a sequence)."""
    cache = kwargs.get("past_key_values")
    if cache is None:
        return 0
    if isinstance(cache, (tuple, list)):
        raise ConfigError(
            "`past_key_values` as tuples of tensors is gone in transformers 5; pass a Cache "
            "(DynamicCache / EncoderDecoderCache) as returned by the model"
        )
    return int(cache.get_seq_length())


def real_length(kwargs: dict[str, Any]) -> int | None:
    for key in ("input_ids", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[1]
    return None


def extend_over_virtual_tokens(
    model: nn.Module,
    kwargs: dict[str, Any],
    n: int,
    *,
    starts: bool,
    copies: int = 1,
    length: int | None = None,
) -> dict[str, Any]:
    """``kwargs`` with masks, positions, segments and labels extended over ``n`` leading virtual tokens and,
    for an ensemble, every batch-shaped tensor repeated ``copies`` times. ``starts``: this call begins the
    sequence (no cached tokens), so position and segment tensors get entries for the virtual tokens too.
    ``input_ids`` / ``inputs_embeds`` are only repeated; putting the virtual tokens in is the method's job.
    ``length``: the number of real tokens, when ``kwargs`` no longer hold them."""
    kwargs = dict(kwargs)
    length = real_length(kwargs) if length is None else length
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    elif mask is not None:
        raise ConfigError(
            f"`attention_mask` must be 2-D (batch, tokens) with virtual tokens, got shape {tuple(mask.shape)}"
        )
    positions = kwargs.get("position_ids")
    if positions is not None:
        shifted = positions + n
        if starts:
            first = torch.arange(n, device=positions.device, dtype=positions.dtype)
            shifted = torch.cat([first.expand(*positions.shape[:-1], n), shifted], dim=-1)
        kwargs["position_ids"] = shifted
    segments = kwargs.get("token_type_ids")
    if segments is not None and starts:
        kwargs["token_type_ids"] = torch.cat([segments.new_zeros(segments.shape[0], n), segments], dim=1)
    labels = kwargs.get("labels")
    per_token = labels is not None and labels.dim() >= 2 and labels.shape[1] == length
    if per_token and starts and not is_encoder_decoder(model):
        ignored = labels.new_full((labels.shape[0], n, *labels.shape[2:]), IGNORE_INDEX)
        kwargs["labels"] = torch.cat([ignored, labels], dim=1)
    if copies > 1:
        for key in BATCH_KEYS:
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                kwargs[key] = value.repeat(copies, *([1] * (value.dim() - 1)))
    return kwargs


class EncodersAtInputEmbedding(AdapterLayer):
    """Wraps the model's input embedding, leaving its output unchanged, and holds one encoder module per adapter
    (``encoders[name]``). The virtual tokens enter through the method's ``prepare_inputs``, not through this
    forward. Subclasses name their ``method`` (for messages) and build, save and load their encoders."""

    method: str
    adapter_holders = ("encoders",)
    stack_order = 3  # leaves the embedding's output alone: around a LoRA adapter on the embedding

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.encoders = nn.ModuleDict()

    def forward(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        refuse_mixed_batch(self, self.encoders, self.method)
        return self.base_layer(input_ids, *args, **kwargs)


def refuse_mixed_batch(layer: Any, own: Any, method: str) -> None:
    """Virtual tokens enter through the inputs, which a mixed batch (``adapter_names=``) leaves alone: a row
    routed to such an adapter would silently run as the base model, so it is refused."""
    names = sorted(set(layer.routing.names) & set(own)) if layer.routing is not None else []
    if names:
        raise ConfigError(
            f"{method} adapters {names} cannot join a mixed batch (adapter_names=...): their virtual tokens "
            "enter through the inputs, which a mixed batch leaves alone; run them with set_adapter()"
        )


def generation_from_cache(
    model: nn.Module, kwargs: dict[str, Any], n: int, filler: torch.Tensor, make_cache: Callable[[int], Any]
) -> dict[str, Any]:
    """``generate()`` keyword arguments for a decoder whose ``n`` virtual tokens sit in the KV cache.

    ``make_cache(rows)`` builds the cache holding them, one row per sequence generate() decodes. The
    attention mask grows by ``n`` ones in front; generate() then derives every position from it. Given
    ``inputs_embeds``, generate() skips as many leading embeddings as the cache holds, so ``filler`` (n, d)
    is put in front of them (the prompt itself, or anything for prefixes)."""
    if kwargs.get("use_cache") is False:
        raise ConfigError(
            "virtual tokens reach generate() through the KV cache; `use_cache`=False is not supported"
        )
    if cached_length(kwargs) > 0:  # continuing from a cache that already holds the virtual tokens
        return extend_over_virtual_tokens(model, kwargs, n, starts=False)
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    if ids is None and embeds is None:
        raise ConfigError(
            "generate() with virtual tokens needs `input_ids=` (or `inputs_embeds=`) as a keyword argument"
        )
    kwargs = dict(kwargs)
    real = embeds if embeds is not None else ids
    batch, length = real.shape[:2]
    if kwargs.get("attention_mask") is None:
        kwargs["attention_mask"] = torch.ones(batch, length, dtype=torch.long, device=real.device)
    kwargs = extend_over_virtual_tokens(model, kwargs, n, starts=False)
    if embeds is not None:
        kwargs["inputs_embeds"] = torch.cat([filler.expand(batch, -1, -1).to(embeds.dtype), embeds], dim=1)
    kwargs["past_key_values"] = make_cache(batch * rows_per_input(model, kwargs))
    return kwargs


def rows_per_input(model: nn.Module, kwargs: dict[str, Any]) -> int:
    """How many rows generate() makes of each input (beams, returned sequences): the cache must match."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1) or 1)
    returned = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1) or 1)
    return max(beams, returned)
