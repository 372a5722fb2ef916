"""A LoRA linear layer's forward and backward as one autograd node, for the common case: a frozen plain base.

``y = x W^T + b + s · (x A^T) B^T`` with ``W`` frozen. Left to autograd (four nodes: the base linear, ``A``,
``B``, the add), the backward pays for two things it does not need:

- the gradient reaching ``x`` from the base path (``g W``) and from the adapter path (``(s g B) A``) are two
  (tokens x in) tensors that autograd then adds: one more temporary and one more pass over it;
- the scale ``s`` is applied where autograd put it, not where it is cheapest.

Here, with ``h = x A^T`` (tokens x r) kept from the forward and ``g`` the output's gradient:

- ``g_h = s · g B``            (tokens x r: scaled where it is thin)
- ``∂x = g W + g_h A``        (the second product accumulated into the first in place: one addmm_)
- ``∂A = g_h^T x``,  ``∂B = g^T (s · h)``,  ``∂b = Σ_tokens g`` (only when the bias trains)

With LoRA's input dropout (``dropout_p > 0``) the node draws the mask itself (the same random numbers as
``nn.Dropout``, :mod:`peftkit.methods.lora.dropout`) and keeps ``x`` and the boolean mask instead of the
dropped-out copy ``x'`` and its float mask, recomputing ``x' = x · mask / (1 - p)`` for ``∂A`` and carrying
``g_h A`` back through the mask to ``∂x``.

The forward runs exactly the ops of the unfused path, so outputs are bitwise the same; gradients agree up to
float rounding (tested against autograd in float64). What is saved for the backward is ``x`` (shared with
the other layers reading it), the thin ``h`` and, with dropout, a one-byte mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftkit.methods.lora.dropout import dropout_with_mask, keep_multiplier


def fused_lora_linear(
    x: torch.Tensor,
    x_adapter: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_A: torch.Tensor,
    weight_B: torch.Tensor,
    scale: float,
    transposed: bool,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``y = base(x) + s · (x' A^T) B^T`` for a frozen base weight, any number of leading dimensions.

    ``x_adapter`` (``x'``) is the adapter's input: ``x`` itself, or ``dropout(x)`` computed by the caller,
    whose own backward autograd then applies (only when it *is* ``x`` are the two input gradients accumulated
    in one pass). ``dropout_p`` in (0, 1), with ``x_adapter`` being ``x``: the node applies ``nn.Dropout(p)``
    to the adapter's input itself, keeping a boolean mask rather than the dropped-out input.
    ``transposed``: the weight is (in, out), as transformers' ``Conv1D`` stores it (GPT-2); otherwise (out, in)
    as ``nn.Linear``. The node works on (tokens, features) matrices, so its output is not a view and later
    in-place ops on it stay legal."""
    out_features = weight.shape[1] if transposed else weight.shape[0]
    flat = x.reshape(-1, x.shape[-1])
    # the shared input goes in once: torch.compile (dynamo) cannot trace a node given one tensor twice
    flat_adapter = None if x_adapter is x else x_adapter.reshape(-1, x_adapter.shape[-1])
    if dropout_p and flat_adapter is not None:
        raise ValueError("fused_lora_linear: pass x itself as x_adapter when the node applies the dropout")
    result = FusedLoraLinear.apply(
        flat, flat_adapter, weight, bias, weight_A, weight_B, scale, transposed, float(dropout_p)
    )
    return result.view((*x.shape[:-1], out_features))


class FusedLoraLinear(torch.autograd.Function):
    """The node behind :func:`fused_lora_linear`, on (tokens, in) inputs; ``x_adapter`` is ``None`` when the
    adapter reads ``x`` itself (``dropout_p > 0``: ``dropout(x)``, drawn here)."""

    @staticmethod
    def forward(
        ctx, x, x_adapter, weight, bias, weight_A, weight_B, scale: float, transposed: bool, dropout_p
    ):
        ctx.shared_input = x_adapter is None
        keep = None
        if dropout_p:
            x_adapter, keep = dropout_with_mask(x, dropout_p)  # freed after the forward: `keep` recreates it
        x_adapter = x if x_adapter is None else x_adapter
        if transposed:  # Conv1D.forward, op for op
            result = torch.addmm(bias, x, weight) if bias is not None else x @ weight
        else:
            result = F.linear(x, weight, bias)
        hidden = F.linear(x_adapter, weight_A)  # (tokens, r)
        result.addmm_(hidden, weight_B.T, alpha=scale)
        ctx.save_for_backward(x if dropout_p else x_adapter, keep, weight, weight_A, weight_B, hidden)
        ctx.scale, ctx.transposed, ctx.has_bias, ctx.dropout_p = (
            scale,
            transposed,
            bias is not None,
            dropout_p,
        )
        return result

    @staticmethod
    def backward(ctx, grad):  # grad: (tokens, out)
        adapter_input, keep, weight, weight_A, weight_B, hidden = (
            ctx.saved_tensors
        )  # with dropout: x, its mask
        scale, p = ctx.scale, ctx.dropout_p
        needs = ctx.needs_input_grad
        grad_hidden = (grad @ weight_B).mul_(scale)  # (tokens, r)
        grad_x = grad_x_adapter = grad_bias = grad_A = grad_B = None
        multiplier = keep_multiplier(keep, p, adapter_input.dtype) if p else None  # (tokens, in)
        if needs[0]:
            grad_x = grad @ (weight.T if ctx.transposed else weight)  # (tokens, in)
            if p:  # the adapter's share goes back through the dropout mask
                grad_x.addcmul_(grad_hidden @ weight_A, multiplier)
            elif ctx.shared_input:
                grad_x.addmm_(grad_hidden, weight_A)
        if needs[1] and not ctx.shared_input:
            grad_x_adapter = grad_hidden @ weight_A
        if needs[3] and ctx.has_bias:
            grad_bias = grad.sum(0)
        if needs[4]:
            if p:  # dropout(x) again, bit for bit
                adapter_input = adapter_input * multiplier
            grad_A = grad_hidden.T @ adapter_input  # (r, in)
        if needs[5]:
            grad_B = grad.T @ (hidden * scale)  # (out, r)
        return grad_x, grad_x_adapter, None, grad_bias, grad_A, grad_B, None, None, None
