"""Honest parameter and storage accounting.

- ``trainable``: parameters that will receive gradients now (the active adapter's, unless loaded for
  inference only).
- ``base``: parameters of the base model, counted once (adapter matrices and the per-adapter copies of
  ``modules_to_save`` are not part of it).
- ``adapter``: what the active adapter stores: its tensors, i.e. exactly what ``save_pretrained`` writes.
- ``adapter_bytes``: the same in bytes, at the tensors' own dtypes (the file adds only a small header).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from peftkit.layer import added_parameter_ids

if TYPE_CHECKING:
    from peftkit.model import PeftModel


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
        return (
            f"trainable params: {self.trainable:,} || base params: {self.base:,} || "
            f"trainable%: {self.trainable_percent:.4f} || adapter: {self.adapter:,} params, "
            f"{format_bytes(self.adapter_bytes)}"
        )


def count_parameters(model: PeftModel) -> ParameterCount:
    added = added_parameter_ids(model.base_model)  # trained base biases stay part of the base model
    unique = {id(p): p for p in model.base_model.parameters()}  # tied weights counted once
    base = sum(logical_numel(p) for i, p in unique.items() if i not in added)
    trainable = sum(p.numel() for p in unique.values() if p.requires_grad)
    tensors = {k: t for name in model.active_adapters for k, t in model.adapter_state_dict(name).items()}
    return ParameterCount(
        trainable=trainable,
        base=base,
        adapter=sum(t.numel() for t in tensors.values()),
        adapter_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
    )


def base_weight_bytes(model: nn.Module) -> int:
    """Bytes the base model's own weights hold in memory, from its actual tensors (packed 4-bit codes and
    their scales for a quantized layer), without the adapters' tensors and trained module copies."""
    from peftkit.quantization import storage_report

    added = added_parameter_ids(model)
    added_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) in added)
    return storage_report(model).total_bytes - added_bytes


def logical_numel(parameter) -> int:
    """Parameters a tensor stands for: a 4-bit weight is stored packed, two values a byte, and its
    quantization state knows the real shape."""
    state = getattr(parameter, "quant_state", None)
    return state.shape.numel() if state is not None else parameter.numel()


def format_bytes(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
