"""One table of what peftkit knows about each transformers architecture, and the one lookup every method uses.

An :class:`Architecture` names, as regular-expression fragments matched at the end of a module's dotted path,
the layers of one transformer block that adapter methods care about: the attention projections (separate
query / key / value, or one fused projection), the attention output projection, the feed-forward
sub-layer's first layer(s) (whose input is the sub-layer's input) and its output layer, and the
``nn.ModuleList`` of blocks. Every method derives its defaults from these positions:

- LoRA: ``lora`` (written as Hugging Face PEFT writes them in ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``;
  a test keeps the two equal wherever both have an entry);
- IA3 (Liu et al. 2022): keys and values (or the fused projection) and the feed-forward output layer, which
  rescales its input;
- bottleneck adapters: attention output and feed-forward output (serial); feed-forward input and output
  (parallel, He et al. 2021);
- BitFit roles (Ben Zaken et al. 2021): the biases of each position;
- layer tuning: the block lists; prefix tuning: :func:`attention_layout`.

:func:`architecture` looks a model up by ``config.model_type``; a model type without an entry (or whose
modules do not carry the entry's names) is matched structurally against the layouts of the table
(``q_proj``/``k_proj``/``v_proj``/``o_proj`` + ``gate_proj``/``up_proj``/``down_proj``, ``fc1``/``fc2``,
fused ``query_key_value``, ...), taking the first whose positions the method needs all exist in the model.
Otherwise a :class:`~peftkit.config.ConfigError` names what is missing and what to pass instead.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from peftkit.architectures.layout import Architecture
from peftkit.architectures.table import LAYOUTS, TABLE
from peftkit.config import ConfigError
from peftkit.layer import AdapterLayer

POSITION_NAMES = {
    "query": "query projection",
    "key": "key projection",
    "value": "value projection",
    "qkv": "fused query/key/value projection",
    "attention_output": "attention output projection",
    "ffn_input": "feed-forward input layer",
    "ffn_output": "feed-forward output layer",
    "blocks": "list of transformer blocks",
}


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _matches(pattern: str | Sequence[str] | None, names: Sequence[str]) -> bool:
    """Whether a regex, or every entry of a list of suffix names, matches some module path."""
    if pattern is None:
        return False
    if isinstance(pattern, str):
        compiled = re.compile(pattern)
        return any(compiled.fullmatch(n) for n in names)
    return all(any(n == key or n.endswith("." + key) for n in names) for key in pattern)


def _has(arch: Architecture, needs: Sequence[str], names: Sequence[str]) -> bool:
    return all(_matches(arch.lora if need == "lora" else arch.pattern(need), names) for need in needs)


def architecture(model: nn.Module, needs: Sequence[str], purpose: str, remedy: str) -> Architecture:
    """The architecture entry of ``model`` that has every position in ``needs``.

    ``needs``: position names (``query``, ``key``, ``value``, ``kv``, ``attention_output``, ``ffn_input``,
    ``ffn_output``, ``blocks``) or ``lora`` (the LoRA default targets). The entry of ``config.model_type`` is
    used when the model's modules carry its names; otherwise the first layout of the table whose positions all
    match the model's module paths (a structural match, so unknown model types with standard names work).

    Raises :class:`ConfigError` naming ``purpose``, the positions not found and ``remedy`` (what to pass).
    """
    names = [n for n, _ in model.named_modules() if n]
    model_type = _model_type(model)
    own = TABLE.get(model_type)
    if own is not None and _has(own, needs, names):
        return own
    if own is not None and any(need not in ("lora", "kv") and own.pattern(need) is None for need in needs):
        # the architecture has no such position (its note says why): no other layout may stand in for it
        raise ConfigError(f"{purpose}: {own.note or f'{model_type!r} has no such layers'}; pass {remedy}")
    for candidate in LAYOUTS:
        if _has(candidate, needs, names):
            return candidate
    wanted = ", ".join(POSITION_NAMES.get(n, "LoRA default targets") for n in needs if n != "kv")
    if "kv" in needs:
        wanted = ", ".join(filter(None, ["key and value projections", wanted]))
    raise ConfigError(
        f"{purpose}: model type {model_type!r} has no entry in peftkit's architecture table and none of its "
        f"known layouts matches this model's modules (looked for the {wanted}); pass {remedy}. "
        f"Linear layers in this model: {sample(linear_leaf_names(model))}"
    )


def block_lists(model: nn.Module) -> list[str]:
    """Dotted paths of the model's ``nn.ModuleList``s of transformer blocks (every stack: an encoder-decoder
    has two). From the table when it knows the model type, else found structurally: the outermost
    ``nn.ModuleList``s of two or more modules of one class, outside adapter layers.

    Raises :class:`ConfigError` when the architecture has no distinct blocks (ALBERT) or none are found.
    """
    remedy = "name it with `block_lists` (the dotted path of each nn.ModuleList of transformer blocks)"
    own = TABLE.get(_model_type(model))
    if own is not None and own.blocks is None:
        raise ConfigError(
            f"no list of repeated blocks found in {type(model).__name__}: {own.note}; {remedy} to train them anyway"
        )
    modules = dict(model.named_modules())
    if own is not None:
        pattern = re.compile(own.pattern("blocks"))
        found = [p for p, m in modules.items() if isinstance(m, nn.ModuleList) and pattern.fullmatch(p)]
        if found:
            return found
    found, adapters = [], []
    for path, module in modules.items():
        if isinstance(module, AdapterLayer):
            adapters.append(path)
        if any(path.startswith(p + ".") for p in found + adapters):
            continue
        if isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1:
            found.append(path)
    if not found:
        raise ConfigError(f"no list of repeated blocks found in {type(model).__name__}; {remedy}")
    return found


def linear_leaf_names(model: nn.Module) -> list[str]:
    """Distinct last path segments of the model's linear layers: the names a user writes in a config."""
    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and isinstance(m, nn.Linear)}
        | {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    )


def known_model_types() -> list[str]:
    return sorted(TABLE)


def sample(items: Sequence[str], limit: int = 20) -> str:
    """The first ``limit`` items joined for an error message, and how many more there are."""
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
