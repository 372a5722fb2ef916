"""What peftkit knows about transformers architectures: one table (:mod:`.table`) and one lookup (:mod:`.lookup`).

Open :mod:`peftkit.architectures.table` to add or correct a model type; every method reads it through
:func:`architecture` (default targets, bottleneck positions, BitFit roles, block lists) and
:func:`attention_layout` (the shape of keys and values, for prefixes).
"""

from peftkit.architectures.attention import AttentionLayout, attention_layout
from peftkit.architectures.layout import Architecture
from peftkit.architectures.lookup import (
    architecture,
    block_lists,
    known_model_types,
    linear_leaf_names,
    sample,
)
from peftkit.architectures.table import LAYOUTS, TABLE

__all__ = [
    "LAYOUTS",
    "TABLE",
    "Architecture",
    "AttentionLayout",
    "architecture",
    "attention_layout",
    "block_lists",
    "known_model_types",
    "linear_leaf_names",
    "sample",
]
