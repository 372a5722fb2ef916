"""BitFit (Ben Zaken et al. 2021, arXiv:2106.10199): train only the bias terms (plus the task head).

A transformer block's biases sit in the attention projections (query, key, value, output), the two
feed-forward layers and the LayerNorms. BitFit freezes every weight matrix and trains those vectors, about
0.1% of BERT-base's parameters. The paper found the query bias and the first feed-forward bias change most,
so ``roles`` can select a subset by what a bias belongs to.

The biases are base-model parameters trained in place; peftkit keeps them per adapter (see
:mod:`peftkit.parameter_bank`), so switching or disabling the adapter restores the base model's biases.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from peftkit.architectures import architecture
from peftkit.config import AdapterConfig, ConfigError, as_name_tuple, register_config
from peftkit.layer import base_parameter_names
from peftkit.method_spec import declare_method
from peftkit.methods.registry import in_place_method

# Role -> the architecture position whose biases it names (see peftkit.architectures); the norms are found
# by their class, on every model.
ROLE_POSITIONS: dict[str, str | None] = {
    "query": "query",
    "key": "key",
    "value": "value",
    "qkv": "qkv",  # fused projections (GPT-2, BLOOM, Falcon, Phi-3, ModernBERT)
    "attention_output": "attention_output",
    "ffn_in": "ffn_input",
    "ffn_out": "ffn_output",
    "layernorm": None,
}


@register_config
@dataclass(frozen=True)
class BitFitConfig(AdapterConfig):
    """Fields:
    roles: which biases train (``None``: every bias of the model). Allowed roles: see ``ROLE_POSITIONS``.
    modules_to_save: modules trained in full next to the biases (a fresh task head).
    """

    method: ClassVar[str] = "bitfit"

    roles: tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self._set("roles", as_name_tuple("roles", self.roles, allow_string=False))
        self._set(
            "modules_to_save", as_name_tuple("modules_to_save", self.modules_to_save, allow_string=False)
        )
        unknown = sorted(set(self.roles or ()) - set(ROLE_POSITIONS))
        if unknown:
            raise ConfigError(f"`roles` has unknown entries {unknown}; allowed: {sorted(ROLE_POSITIONS)}")


def bias_names(model: nn.Module, config: BitFitConfig) -> list[str]:
    """The bias parameters BitFit trains, or a clear error when the model has none of them."""
    biases = [name for name in base_parameter_names(model) if name == "bias" or name.endswith(".bias")]
    if not biases:
        raise ConfigError(
            f"{type(model).__name__} has no bias parameters (LLaMA- and T5-style models are built without "
            "them), so BitFit would train nothing; use LoRA or IA3 on this model"
        )
    if config.roles is None:
        return biases
    roles = _role_matchers(model, config.roles)
    chosen = [name for name in biases if any(matches(name) for matches in roles.values())]
    empty = [role for role, matches in roles.items() if not any(matches(n) for n in biases)]
    if empty:
        present = _role_matchers(model, tuple(ROLE_POSITIONS))
        found = sorted(role for role, matches in present.items() if any(matches(n) for n in biases))
        raise ConfigError(f"`roles` {empty} match no bias of {type(model).__name__}; roles present: {found}")
    return chosen


def _role_matchers(model: nn.Module, roles: tuple[str, ...]) -> dict[str, Callable[[str], bool]]:
    """role -> whether a bias parameter name belongs to it, from the model's architecture entry."""
    modules = dict(model.named_modules())
    norms = {path for path, module in modules.items() if "norm" in type(module).__name__.lower()}
    arch = None
    if any(ROLE_POSITIONS[role] is not None for role in roles):
        arch = architecture(
            model,
            ("attention_output", "ffn_output"),
            purpose="BitFit `roles` need to know this model's layers",
            remedy="`roles`=None (every bias) and `modules_to_save` for whole modules",
        )

    def owner(name: str) -> str:  # the module a bias belongs to (names come without adapter wrappers)
        return name.removesuffix(".bias")

    matchers: dict[str, Callable[[str], bool]] = {}
    for role in roles:
        position = ROLE_POSITIONS[role]
        if position is None:
            matchers[role] = lambda name: owner(name) in norms
        elif (pattern := arch.pattern(position)) is None:
            matchers[role] = lambda name: False
        else:
            matchers[role] = lambda name, regex=re.compile(pattern): regex.fullmatch(owner(name)) is not None
    return matchers


in_place_method("bitfit", BitFitConfig, bias_names, "PEFTKIT_BITFIT")


declare_method(
    "bitfit",
    "only the bias terms train (Ben Zaken et al. 2021)",
    learning_rate=2e-3,
    build=lambda o, heads: BitFitConfig(modules_to_save=heads or None),
)
