"""4-bit layers on the meta device: storage from the formula, the training step from a stand-in matmul.

``quantize_model`` on a meta model swaps in bitsandbytes' ``Linear4bit`` layers but cannot quantize data
that is not there: the weight stays a full-shape meta tensor. Its memory is therefore computed
(:func:`~peftkit.planning.sizes.nf4_weight_bytes`), and its forward, which needs a real quantization state,
is replaced during a trace by :class:`_DequantizeLinear`, which allocates what bitsandbytes' ``MatMul4Bit``
allocates: a de-quantized weight in the compute dtype for the duration of the matmul, in the forward and
again in the backward, and nothing saved for the backward but the packed weight it already holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.planning.sizes import nf4_weight_bytes
from peftkit.quantization import is_quantized_linear


def quantized_weight_ids(model: nn.Module) -> dict[int, int]:
    """``id(weight) -> bytes as stored in 4 bit`` for every 4-bit linear layer of ``model``."""
    found = {}
    for module in model.modules():
        if is_quantized_linear(module):
            weight = module.weight
            found[id(weight)] = nf4_weight_bytes(
                module.in_features * module.out_features,
                blocksize=getattr(weight, "blocksize", None) or 64,
                double_quant=bool(getattr(weight, "compress_statistics", True)),
            )
    return found


class _DequantizeLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        weight = _dequantized(layer, x.dtype)  # (out, in), freed after the matmul
        return F.linear(x, weight, layer.bias)

    @staticmethod
    def backward(ctx, grad):
        weight = _dequantized(ctx.layer, grad.dtype)
        return grad @ weight, None  # (..., in)


def _dequantized(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(layer.out_features, layer.in_features, dtype=dtype, device=layer.weight.device)


@contextlib.contextmanager
def stand_in_matmuls(model: nn.Module) -> Iterator[None]:
    """Inside the block, every 4-bit layer of ``model`` runs :class:`_DequantizeLinear` (meta tensors)."""
    layers = [m for m in model.modules() if is_quantized_linear(m)]
    for layer in layers:
        compute = getattr(layer, "compute_dtype", None)
        layer.forward = lambda x, layer=layer, dtype=compute: _DequantizeLinear.apply(
            x.to(dtype) if dtype is not None else x, layer
        )
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
