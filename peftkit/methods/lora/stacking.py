"""Stacking several adapters' A and B matrices for a mixed batch (S-LoRA / Punica style batched gather)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

AdapterTensors = tuple[torch.Tensor, torch.Tensor, float]  # A (r, in), B (out, r), scaling


def padded_stack(
    names: Sequence[str],
    tensors_of: Callable[[str], AdapterTensors | None],
    *,
    a_shape: tuple[int],
    b_shape: tuple[int],
    like: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the adapters ``names`` into A (n, r_max, in) and s·B (n, out, r_max), each B scaled by its
    adapter's s so that applying the stack needs no separate scaling pass.

    Ranks are zero-padded to the largest one: the padded rows of A and columns of B contribute exact zeros.
    A name for which ``tensors_of`` returns ``None`` (the base model, or an adapter this layer lacks) gets
    all-zero matrices, so its rows receive no update.
    """
    found = {name: tensors_of(name) for name in names}
    r_max = max(t[0].shape[0] for t in found.values() if t is not None)
    stack_A = like.new_zeros((len(names), r_max, *a_shape))
    stack_B = like.new_zeros((len(names), *b_shape, r_max))
    for i, name in enumerate(names):
        if found[name] is None:
            continue
        weight_A, weight_B, scaling = found[name]
        rank = weight_A.shape[0]
        stack_A[i, :rank] = weight_A
        stack_B[i, :, :rank] = weight_B * scaling
    return stack_A, stack_B
