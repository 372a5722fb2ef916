"""Sizes bounded against the model before anything is allocated, so a typo like ``r=10**9`` is an error
naming the layer and the bound instead of an attempt to allocate terabytes.

- LoRA's rank: ``r <= min(d_in, d_out)`` of each adapted layer. A larger rank adds parameters but no
  expressive power (``B A`` has rank at most ``min(d_in, d_out)``; Hu et al. 2021, arXiv:2106.09685, Sec. 4).
- Virtual tokens of prompt methods: at most the model's positions (``max_position_embeddings`` /
  ``n_positions``); a model without such a limit gets :data:`MAX_VIRTUAL_TOKENS`. Prompts of an ensemble
  (``num_prompts``): at most :data:`MAX_PROMPTS`.
- Hidden widths a method adds (a bottleneck adapter's ``bottleneck_size``, P-tuning's
  ``encoder_hidden_size``, prefix tuning's ``projection_size``): at most :data:`WIDTH_FACTOR` times the
  model's hidden size (the papers use widths at or below it), or :data:`MAX_WIDTH` without a known one.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.config import ConfigError
from peftkit.layer import innermost

MAX_PROMPTS = 64  # an ensemble of prompts runs every row once per prompt: k x the batch, k x the memory
MAX_VIRTUAL_TOKENS = 8192  # without a position limit: already far beyond the prompt lengths of the papers
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
WIDTH_FIELDS = ("bottleneck_size", "encoder_hidden_size", "projection_size")
WIDTH_FACTOR = 16
MAX_WIDTH = 65536
_HIDDEN_FIELDS = ("hidden_size", "n_embd", "d_model", "dim")


def layer_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(d_in, d_out)`` of a linear-like or embedding layer (its innermost base layer); None if unknown."""
    base = innermost(module)
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    if isinstance(base, Conv1D):  # weight (d_in, d_out)
        return tuple(base.weight.shape)
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return int(base.in_features), int(base.out_features)
    return None


def check_rank(model: nn.Module, paths: list[str], r: int) -> None:
    """Raise :class:`ConfigError` if ``r`` exceeds ``min(d_in, d_out)`` of a layer in ``paths``."""
    for path in paths:
        dims = layer_dims(model.get_submodule(path))
        if dims is not None and r > min(dims):
            raise ConfigError(
                f"`r`={r} is larger than layer {path!r} allows: its weight is {dims[0]} x {dims[1]}, so its "
                f"rank is at most {min(dims)}; use r <= {min(dims)} (or leave this layer out of target_modules)"
            )


def _model_field(model: nn.Module, fields: tuple[str, ...]) -> int | None:
    config = getattr(model, "config", None)
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    for field in fields:
        value = getattr(text, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def max_positions(model: nn.Module) -> int | None:
    return _model_field(model, _POSITION_FIELDS)


def check_widths(model: nn.Module, config: Any) -> None:
    """Raise :class:`ConfigError` if a hidden width the method adds (:data:`WIDTH_FIELDS`) is beyond
    ``WIDTH_FACTOR`` times the model's hidden size (or :data:`MAX_WIDTH` without a known one)."""
    hidden = _model_field(model, _HIDDEN_FIELDS)
    limit = WIDTH_FACTOR * hidden if hidden is not None else MAX_WIDTH
    for field in WIDTH_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value > limit:
            where = f"{WIDTH_FACTOR} x the hidden size {hidden}" if hidden is not None else "peftkit's cap"
            raise ConfigError(f"`{field}`={value} is beyond {where}; allowed: 1 to {limit}")


def check_virtual_tokens(model: nn.Module, config: Any) -> None:
    """Raise :class:`ConfigError` if a prompt method's ``num_virtual_tokens`` exceeds the model's positions
    (or :data:`MAX_VIRTUAL_TOKENS` for a model without a position limit), or an ensemble's ``num_prompts``
    exceeds :data:`MAX_PROMPTS`."""
    k = getattr(config, "num_prompts", None)
    if isinstance(k, int) and k > MAX_PROMPTS:
        raise ConfigError(
            f"`num_prompts`={k} is over peftkit's cap of {MAX_PROMPTS}: each prompt of the ensemble runs "
            f"every row again (the batch and its memory grow {k}-fold); allowed: 1 to {MAX_PROMPTS}"
        )
    n = getattr(config, "num_virtual_tokens", None)
    if not isinstance(n, int):
        return
    limit = max_positions(model)
    if limit is not None and n > limit:
        raise ConfigError(
            f"`num_virtual_tokens`={n} exceeds the {limit} positions of {type(model).__name__}; "
            f"allowed: 1 to {limit} (fewer leave room for the real tokens)"
        )
    if limit is None and n > MAX_VIRTUAL_TOKENS:
        raise ConfigError(
            f"`num_virtual_tokens`={n} is over peftkit's cap of {MAX_VIRTUAL_TOKENS} for a model without a "
            f"position limit; allowed: 1 to {MAX_VIRTUAL_TOKENS}"
        )
