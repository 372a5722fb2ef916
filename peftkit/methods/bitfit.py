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
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from peftkit.config import AdapterConfig, ConfigError, as_name_tuple, register_config
from peftkit.layer import base_parameter_names
from peftkit.methods import in_place_method

# Role -> patterns of bias parameter names across BERT-style, GPT-2, LLaMA-style, T5 and DistilBERT models.
ROLE_PATTERNS: dict[str, str] = {
    "query": r"\.(query|q_proj|q_lin|q)\.bias$",
    "key": r"\.(key|k_proj|k_lin|k)\.bias$",
    "value": r"\.(value|v_proj|v_lin|v)\.bias$",
    "qkv": r"\.(c_attn|qkv_proj|query_key_value)\.bias$",  # fused projections (GPT-2)
    "attention_output": r"(attention\.output\.dense|attn\.c_proj|o_proj|out_lin|\.o)\.bias$",
    "ffn_in": r"(intermediate\.dense|mlp\.c_fc|up_proj|gate_proj|lin1|\.wi(_0|_1)?)\.bias$",
    "ffn_out": r"(layer\.\d+\.output\.dense|mlp\.c_proj|down_proj|lin2|\.wo)\.bias$",
    "layernorm": r"(LayerNorm|layer_norm|layernorm|ln_\d|ln_f|norm\d?|_norm)\.bias$",
}


@register_config
@dataclass(frozen=True)
class BitFitConfig(AdapterConfig):
    """Fields:
    roles: which biases train (``None``: every bias of the model). Allowed roles: see ``ROLE_PATTERNS``.
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
        unknown = sorted(set(self.roles or ()) - set(ROLE_PATTERNS))
        if unknown:
            raise ConfigError(f"`roles` has unknown entries {unknown}; allowed: {sorted(ROLE_PATTERNS)}")


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
    chosen = [name for name in biases if any(re.search(ROLE_PATTERNS[role], name) for role in config.roles)]
    empty = [role for role in config.roles if not any(re.search(ROLE_PATTERNS[role], n) for n in biases)]
    if empty:
        found = sorted(
            {role for role, pattern in ROLE_PATTERNS.items() if any(re.search(pattern, n) for n in biases)}
        )
        raise ConfigError(f"`roles` {empty} match no bias of {type(model).__name__}; roles present: {found}")
    return chosen


in_place_method("bitfit", BitFitConfig, bias_names, "PEFTKIT_BITFIT")
