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

The forward runs exactly the ops of the unfused path, so outputs are bitwise the same; gradients agree up to
float rounding (tested against autograd in float64). What is saved for the backward is what autograd saves:
``x`` and the thin ``h``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_lora_linear(
    x: torch.Tensor,
    x_adapter: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    weight_A: torch.Tensor,
    weight_B: torch.Tensor,
    scale: float,
    transposed: bool,
) -> torch.Tensor:
    """``y = base(x) + s · (x' A^T) B^T`` for a frozen base weight, any number of leading dimensions.

    ``x_adapter`` (``x'``) is the adapter's input: ``x`` itself, or ``dropout(x)``, whose own backward autograd
    then applies (only when it *is* ``x`` are the two input gradients accumulated in one pass).
    ``transposed``: the weight is (in, out), as transformers' ``Conv1D`` stores it (GPT-2); otherwise (out, in)
    as ``nn.Linear``. The node works on (tokens, features) matrices, so its output is not a view and later
    in-place ops on it stay legal."""
    out_features = weight.shape[1] if transposed else weight.shape[0]
    flat = x.reshape(-1, x.shape[-1])
    # the shared input goes in once: torch.compile (dynamo) cannot trace a node given one tensor twice
    flat_adapter = None if x_adapter is x else x_adapter.reshape(-1, x_adapter.shape[-1])
    result = FusedLoraLinear.apply(flat, flat_adapter, weight, bias, weight_A, weight_B, scale, transposed)
    return result.view((*x.shape[:-1], out_features))


class FusedLoraLinear(torch.autograd.Function):
    """The node behind :func:`fused_lora_linear`, on (tokens, in) inputs; ``x_adapter`` is ``None`` when the
    adapter reads ``x`` itself."""

    @staticmethod
    def forward(ctx, x, x_adapter, weight, bias, weight_A, weight_B, scale: float, transposed: bool):
        ctx.shared_input = x_adapter is None
        x_adapter = x if x_adapter is None else x_adapter
        if transposed:  # Conv1D.forward, op for op
            result = torch.addmm(bias, x, weight) if bias is not None else x @ weight
        else:
            result = F.linear(x, weight, bias)
        hidden = F.linear(x_adapter, weight_A)  # (tokens, r)
        result.addmm_(hidden, weight_B.T, alpha=scale)
        ctx.save_for_backward(x_adapter, weight, weight_A, weight_B, hidden)
        ctx.scale, ctx.transposed, ctx.has_bias = scale, transposed, bias is not None
        return result

    @staticmethod
    def backward(ctx, grad):  # grad: (tokens, out)
        x_adapter, weight, weight_A, weight_B, hidden = ctx.saved_tensors
        scale = ctx.scale
        needs = ctx.needs_input_grad
        grad_hidden = (grad @ weight_B).mul_(scale)  # (tokens, r)
        grad_x = grad_x_adapter = grad_bias = grad_A = grad_B = None
        if needs[0]:
            grad_x = grad @ (weight.T if ctx.transposed else weight)  # (tokens, in)
            if ctx.shared_input:
                grad_x.addmm_(grad_hidden, weight_A)
        if needs[1] and not ctx.shared_input:
            grad_x_adapter = grad_hidden @ weight_A
        if needs[3] and ctx.has_bias:
            grad_bias = grad.sum(0)
        if needs[4]:
            grad_A = grad_hidden.T @ x_adapter  # (r, in)
        if needs[5]:
            grad_B = grad.T @ (hidden * scale)  # (out, r)
        return grad_x, grad_x_adapter, None, grad_bias, grad_A, grad_B, None, None
