"""Honest parameter and storage accounting.

- ``trainable``: parameters that will receive gradients now (the active adapter's, unless loaded for
  inference only).
- ``base``: parameters of the base model, counted once (adapter matrices and the per-adapter copies of
  ``modules_to_save`` are not part of it).
- ``adapter``: what the active adapter stores: its tensors, i.e. exactly what ``save_pretrained`` writes.
- ``adapter_bytes``: the same in bytes, at the tensors' own dtypes (the file adds only a small header).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from peftkit.layer import added_parameter_ids
from peftkit.quantization import storage_report


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    base: int
    adapter: int
    adapter_bytes: int

    @property
    def trainable_percent(self) -> float:
        """Trainable parameters as a percentage of the base model's."""
        return 100.0 * self.trainable / self.base if self.base else 0.0

    def summary(self) -> str:
        """One line in Hugging Face PEFT's ``print_trainable_parameters`` form, with the adapter's size."""
        return (
            f"trainable params: {self.trainable:,} || base params: {self.base:,} || "
            f"trainable%: {self.trainable_percent:.4f} || adapter: {self.adapter:,} params, "
            f"{format_bytes(self.adapter_bytes)}"
        )


def count_parameters(base_model: nn.Module, adapter_tensors: Mapping[str, torch.Tensor]) -> ParameterCount:
    """What trains, what the base holds and what the adapter stores.

    ``base_model`` is the model with its adapter layers in place (``PeftModel.base_model``);
    ``adapter_tensors`` are the active adapters' tensors as saved (``PeftModel.adapter_state_dict`` of each;
    empty for none). Tied weights count once; a 4-bit weight counts the values it stands for. Counts are in
    parameters (elements), ``adapter_bytes`` in bytes at the tensors' own dtypes."""
    added = added_parameter_ids(base_model)  # trained base biases stay part of the base model
    unique = {id(p): p for p in base_model.parameters()}  # tied weights counted once
    base = sum(logical_numel(p) for i, p in unique.items() if i not in added)
    trainable = sum(p.numel() for p in unique.values() if p.requires_grad)
    return ParameterCount(
        trainable=trainable,
        base=base,
        adapter=sum(t.numel() for t in adapter_tensors.values()),
        adapter_bytes=sum(t.numel() * t.element_size() for t in adapter_tensors.values()),
    )


def base_weight_bytes(model: nn.Module) -> int:
    """Bytes the base model's own weights hold in memory, from its actual tensors (packed 4-bit codes and
    their scales for a quantized layer), without the adapters' tensors and trained module copies."""
    added = added_parameter_ids(model)
    added_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) in added)
    return storage_report(model).total_bytes - added_bytes


def logical_numel(parameter) -> int:
    """Parameters a tensor stands for: a 4-bit weight is stored packed, two values a byte, and its
    quantization state knows the real shape."""
    state = getattr(parameter, "quant_state", None)
    return state.shape.numel() if state is not None else parameter.numel()


def format_bytes(size: int) -> str:
    """``size`` bytes in binary units, e.g. 1.3 MiB (B below 1 KiB, then KiB, MiB, GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
