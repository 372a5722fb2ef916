"""LoRA around a 4-bit linear layer (bitsandbytes ``Linear4bit``): QLoRA's layer.

Importing this module registers the wrapper; :mod:`peftkit.methods.lora.method` does so the first time it
meets such a layer, so plain LoRA never imports bitsandbytes.
"""

from __future__ import annotations

import torch
from bitsandbytes.nn import Linear4bit
from torch import nn

from peftkit.layer import innermost
from peftkit.methods.lora.linear import LoraLinear
from peftkit.methods.lora.method import WRAPPERS
from peftkit.quantization import dequantize_linear, dequantize_weight, requantize_


class LoraLinear4bit(LoraLinear):
    """``h = dequant(W_nf4) x + b + s · B A dropout(x)`` (Dettmers et al. 2023, eq. 5).

    The base weight stays 4-bit and frozen; bitsandbytes de-quantizes it to its compute dtype for the
    matmul. ``A`` and ``B`` live in the config's ``adapter_dtype``, by default float32
    (:func:`peftkit.layer.adapter_dtype`), and the update is computed in that dtype.

    Merging cannot add ``ΔW`` to 4-bit codes exactly, so:

    - ``merge`` (``merge_adapter()``) stores ``quant(dequant(W) + ΔW)``, which adds a re-quantization error
      to the merged output, and keeps the original 4-bit weight, so ``unmerge`` restores it bit for bit;
    - unloading with merge (``merge_and_unload()``) returns a full-precision ``nn.Linear`` holding
      ``dequant(W) + ΔW`` in the weight's original dtype: it computes what the adapted 4-bit layer computes up
      to float rounding (re-quantize the result with :func:`peftkit.quantize_model` if wanted, at the cost
      of a new quantization error).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self._unmerged_weight: nn.Parameter | None = None  # the 4-bit weight as it was before merging
        # bitsandbytes' 4-bit matmul returns a view made inside its autograd node (3-D inputs with a bias),
        # which autograd refuses to see modified in place
        self.adds_in_place = False

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return self.scaling[name] * (B @ A)  # (out, in), in fp32 whatever the adapter dtype

    def merge(self, name: str) -> None:
        if name in self.merged_adapters:
            return
        layer = innermost(self.base_layer)
        if self._unmerged_weight is None:
            self._unmerged_weight = layer.weight
        weight = dequantize_weight(layer)
        merged = (weight.float() + self.delta_weight(name).to(weight.device)).to(weight.dtype)
        requantize_(layer, merged)
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if self._unmerged_weight is not None:
            layer = innermost(self.base_layer)
            layer.weight = self._unmerged_weight
            layer.quant_state = self._unmerged_weight.quant_state
            self._unmerged_weight = None
        self.merged_adapters.clear()

    def unloaded(self, merge: bool) -> nn.Module:
        names = list(self.merged_adapters)
        if merge:
            names += self.running_adapters()
        self.unmerge()
        if not merge or not names:
            return self.base()
        if self.base_layer is not innermost(self.base_layer):
            raise NotImplementedError(
                "merging LoRA into a 4-bit layer that another adapter wraps is not supported; "
                "unload that adapter first"
            )
        plain = dequantize_linear(self.base_layer)
        with torch.no_grad():
            delta = sum(self.delta_weight(n) for n in names)
            plain.weight.copy_((plain.weight.float() + delta.to(plain.weight.device)).to(plain.weight.dtype))
        return plain


WRAPPERS[Linear4bit] = LoraLinear4bit
