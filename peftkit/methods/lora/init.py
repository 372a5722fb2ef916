"""LoRA initialisers, keyed by the config's ``init``: each sets A and B of one new adapter in place.

For linear layers the update ``B A`` starts at zero by zeroing B (Hu et al. 2021); for embeddings, as in HF
PEFT, A is zeroed and B drawn from N(0, 1), because A is indexed by token like an embedding table.
``random`` leaves both non-zero, so a fresh adapter changes the output (for tests and analysis).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

Initialiser = Callable[[torch.Tensor, torch.Tensor, int], None]  # (A, B, r)


def _kaiming(weight: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's own initialisation


def _linear_default(weight_A, weight_B, r):
    _kaiming(weight_A)
    nn.init.zeros_(weight_B)


def _linear_gaussian(weight_A, weight_B, r):
    nn.init.normal_(weight_A, std=1 / r)
    nn.init.zeros_(weight_B)


def _linear_random(weight_A, weight_B, r):
    _kaiming(weight_A)
    _kaiming(weight_B)


def _embedding_zero_A(weight_A, weight_B, r):
    nn.init.zeros_(weight_A)
    nn.init.normal_(weight_B)


def _embedding_random(weight_A, weight_B, r):
    nn.init.normal_(weight_A)
    nn.init.normal_(weight_B)


LINEAR_INITIALISERS: dict[str, Initialiser] = {
    "default": _linear_default,
    "gaussian": _linear_gaussian,
    "random": _linear_random,
}
EMBEDDING_INITIALISERS: dict[str, Initialiser] = {
    "default": _embedding_zero_A,
    "gaussian": _embedding_zero_A,
    "random": _embedding_random,
}


def initialise(
    table: dict[str, Initialiser], weight_A: torch.Tensor, weight_B: torch.Tensor, init: str, r: int
):
    with torch.no_grad():
        table[init](weight_A, weight_B, r)
