"""What peftkit knows about one transformer architecture: where the layers adapter methods use sit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Architecture:
    """Positions in one architecture's blocks, as regex fragments matched at the end of a dotted path.

    ``scope`` is a fragment every position lies under (the text model of a multimodal model). ``cache_heads``
    reads the heads of the KV cache from the config when the standard ``num_key_value_heads`` does not say it
    (Falcon); ``attention_layers`` the number of attention calls per forward pass when it is not
    ``num_hidden_layers`` (ALBERT). ``note`` says why a position is absent (ALBERT shares one block).
    """

    name: str
    lora: tuple[str, ...] | str
    attention_output: str
    ffn_input: str
    ffn_output: str
    blocks: str | None
    query: str | None = None
    key: str | None = None
    value: str | None = None
    qkv: str | None = None
    scope: str = ""
    cache_heads: Callable[[Any], int] | None = None
    attention_layers: Callable[[Any], int] | None = None
    note: str = ""

    def pattern(self, *positions: str) -> str | None:
        """A whole-path regex matching any of ``positions`` (``None`` if one of them is absent here).

        ``kv`` stands for the keys and values: the separate projections, or the fused one.
        """
        fragments = []
        for position in positions:
            if position == "kv":
                fragments += [self.key, self.value] if self.qkv is None else [self.qkv]
            else:
                fragments.append(getattr(self, position))
        if any(f is None for f in fragments):
            return None
        scope = rf"(?:.*\.)?{self.scope}\." if self.scope else ""
        return rf"{scope}(?:.*\.)?(?:{'|'.join(fragments)})"

    def ia3_targets(self) -> tuple[str, str]:
        """IA3's defaults: (target_modules, feedforward_modules) as whole-path regexes."""
        return self.pattern("kv", "ffn_output"), self.pattern("ffn_output")
