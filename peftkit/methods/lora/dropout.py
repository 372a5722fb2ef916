"""LoRA's input dropout, kept for the backward pass as the input itself and a boolean mask.

``h = dropout(x) A^T`` left to autograd keeps, for every adapted layer, the dropped-out copy of its input (for
``∂A``) and the float mask it was multiplied by (for ``∂x``): two (tokens x in) float tensors per layer. The
layers reading one input (a block's q, k and v projections; gate and up) each keep their own. Here the
backward keeps ``x``, which the graph usually holds anyway and the layers share, and a one-byte boolean mask
per layer; it recomputes ``dropout(x) = x · mask / (1 - p)`` when it needs it. With float32 inputs that is
5 bytes per element of a layer's input instead of 8, and the shared input counted once.

Same random numbers as ``torch.nn.functional.dropout``: :func:`dropout_with_mask` draws the mask as ATen's
dropout does on the device (``bernoulli_(1 - p)`` of the input's shape on the CPU, ``native_dropout`` on
CUDA and XPU), so the same seed gives the same masks, outputs and generator state as ``nn.Dropout``
(tested on the CPU), and runs stay reproducible across the change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_NATIVE_DROPOUT_DEVICES = ("cuda", "xpu")  # where ATen's dropout is `native_dropout` (its fused kernel)


def dropout_probability(module: nn.Module, x: torch.Tensor) -> float | None:
    """What LoRA's dropout module ``module`` does to ``x`` now: 0.0 for nothing (``nn.Identity``, eval mode,
    an empty input), ``p`` in (0, 1) for a plain ``nn.Dropout`` in training mode that :func:`dropout_with_mask`
    reproduces on ``x``'s device, None when the module must be called as it is (a hook on it, another module
    type, ``p == 1``, another device, under ``torch.compile``, whose own partitioner decides what to keep)."""
    if type(module) is nn.Identity:
        return 0.0
    if type(module) is not nn.Dropout or module._forward_hooks or module._forward_pre_hooks:
        return None
    if not module.training or module.p == 0 or x.numel() == 0:  # F.dropout returns x itself, draws nothing
        return 0.0
    if module.p >= 1 or x.device.type not in ("cpu", *_NATIVE_DROPOUT_DEVICES):
        return None
    if torch.compiler.is_compiling() or not x.is_floating_point():
        return None
    return float(module.p)


def dropout_with_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dropout(x), keep)``: ``F.dropout(x, p, training=True)`` and its boolean keep-mask (``x``'s shape),
    drawn from the default generator exactly as ``F.dropout`` draws it. ``0 < p < 1``."""
    if x.device.type in _NATIVE_DROPOUT_DEVICES:
        return torch.native_dropout(x, p, True)
    keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)  # the draws of ATen's CPU dropout
    return x * keep_multiplier(keep, p, x.dtype), keep


def keep_multiplier(keep: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """``keep / (1 - p)`` in ``dtype`` (``keep``'s shape): ``dropout(x) = x · multiplier``, and the gradient
    reaching ``x`` is the one reaching ``dropout(x)`` times it. Bit for bit the multiplier of ATen's CPU
    dropout (its 0/1 draws divided by ``1 - p``), made in one pass from the boolean mask."""
    return keep * torch.ones((), dtype=dtype, device=keep.device).div_(1 - p)


class DropoutLinear(torch.autograd.Function):
    """``h = dropout(x.to(A.dtype)) A^T`` (tokens x r) keeping ``x`` and the boolean mask for the backward.

    The unfused path's adapter input (several adapters, a quantized or hooked base layer, autocast): autograd
    would keep the float mask and the dropped-out input of every layer. Under autocast the product runs in
    autocast's dtype as ``F.linear`` would, and the backward repeats it under the same autocast state, so the
    gradients are those autograd computes for the plain ops (up to float rounding).
    """

    @staticmethod
    def forward(ctx, x, weight_A, p: float):
        dropped, keep = dropout_with_mask(x.to(weight_A.dtype), p)
        hidden = F.linear(dropped, weight_A)  # (..., r)
        ctx.save_for_backward(x, keep, weight_A)
        ctx.p = p
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return hidden

    @staticmethod
    def backward(ctx, grad_hidden):  # (..., r)
        x, keep, weight_A = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        multiplier = keep_multiplier(keep, ctx.p, weight_A.dtype)  # (..., in)
        grad_x = grad_A = None
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            if ctx.needs_input_grad[0]:
                grad_dropped = (grad_hidden @ weight_A).to(weight_A.dtype)  # (..., in)
                grad_x = grad_dropped.mul_(multiplier).to(x.dtype)
            if ctx.needs_input_grad[1]:
                dropped = x.to(weight_A.dtype) * multiplier  # the forward's dropout(x), bit for bit
                flat = grad_hidden.reshape(-1, grad_hidden.shape[-1])
                grad_A = (flat.T @ dropped.reshape(-1, dropped.shape[-1])).to(weight_A.dtype)  # (r, in)
        return grad_x, grad_A, None


def dropout_linear(x: torch.Tensor, weight_A: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``F.linear(module(x.to(A.dtype)), A)`` (shape ``(..., r)``), through :class:`DropoutLinear` when
    ``module`` is a dropout it reproduces (:func:`dropout_probability`), else through ``module`` itself."""
    p = dropout_probability(module, x)
    x_adapter = x.to(weight_A.dtype) if x.dtype != weight_A.dtype else x
    if p == 0.0:
        return F.linear(x_adapter, weight_A)
    if p is None or not torch.is_grad_enabled():
        return F.linear(module(x_adapter), weight_A)
    return DropoutLinear.apply(x, weight_A, p)
