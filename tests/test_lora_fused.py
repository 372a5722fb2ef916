"""The fused LoRA node: the same outputs as the unfused layer, the gradients of autograd, taken only when exact."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import LoraConfig, get_peft_model
from peftkit.methods.lora import LoraLinear
from peftkit.methods.lora.fused import FusedLoraLinear, fused_lora_linear
from tests.tiny_models import TINY_MODELS


def _reference(x, x_adapter, weight, bias, A, B, scale, transposed):
    """Plain autograd ops: the computation the node must differentiate."""
    base = x @ weight if transposed else x @ weight.T
    if bias is not None:
        base = base + bias
    return base + scale * (x_adapter @ A.T) @ B.T


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_gradients_match_autograd_in_float64(transposed, with_bias, dropout):
    torch.manual_seed(0)
    tokens, d_in, d_out, r = 6, 5, 4, 3
    x = torch.randn(2, tokens // 2, d_in, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(x.shape) > 0.3).double() / 0.7  # a fixed dropout mask on the adapter's input
    weight = torch.randn((d_in, d_out) if transposed else (d_out, d_in), dtype=torch.float64)
    bias = torch.randn(d_out, dtype=torch.float64, requires_grad=True) if with_bias else None
    A = torch.randn(r, d_in, dtype=torch.float64, requires_grad=True)
    B = torch.randn(d_out, r, dtype=torch.float64, requires_grad=True)

    def fused(x, *rest):
        return fused_lora_linear(x, x * mask if dropout else x, *rest)

    def reference(x, *rest):
        return _reference(x, x * mask if dropout else x, *rest)

    inputs = (x, weight, bias, A, B, 0.7, transposed)
    assert torch.autograd.gradcheck(fused, inputs)
    grad = torch.randn(2, tokens // 2, d_out, dtype=torch.float64)
    leaves = [t for t in (x, bias, A, B) if t is not None]
    got_grads = torch.autograd.grad(fused(*inputs), leaves, grad)
    want_grads = torch.autograd.grad(reference(*inputs), leaves, grad)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _uses_fused_node(output: torch.Tensor) -> bool:
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == FusedLoraLinear.__name__ + "Backward":
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


@pytest.mark.parametrize(("arch", "dropout"), [("bert", 0.0), ("gpt2", 0.0), ("llama", 0.0), ("bert", 0.2)])
def test_a_model_trains_the_same_fused_and_unfused(arch, dropout, monkeypatch):
    tiny = TINY_MODELS[arch]
    batch = tiny.batch()

    def loss_and_grads(fused: bool):
        if not fused:
            monkeypatch.setattr(LoraLinear, "_fusable", lambda self, name, x: False)
        config = LoraConfig(r=4, alpha=8, init="random", target_modules="all-linear", dropout=dropout)
        model = get_peft_model(tiny.build(), config)
        model.train()
        torch.manual_seed(7)  # the same dropout masks: both paths draw them in the same order
        output = tiny.output(model(**batch))  # with autograd, unlike tests.tiny_models.run
        assert _uses_fused_node(output) is fused
        output.float().pow(2).mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        monkeypatch.undo()
        return output.detach(), grads

    fused_out, fused_grads = loss_and_grads(True)
    plain_out, plain_grads = loss_and_grads(False)
    assert torch.equal(fused_out, plain_out)  # the forward runs the same ops
    assert fused_grads.keys() == plain_grads.keys() and any("lora_A" in n for n in fused_grads)
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _frozen_layer(base: nn.Module, **lora) -> LoraLinear:
    base.requires_grad_(False)
    layer = LoraLinear(base)
    layer.add_adapter("a", LoraConfig(r=2, alpha=4, init="random", **lora))
    layer.active_adapter = "a"
    return layer


def test_the_fast_path_is_taken_only_where_it_is_exact():
    x = torch.randn(2, 3, 8)
    assert _uses_fused_node(_frozen_layer(nn.Linear(8, 5))(x))
    assert _uses_fused_node(_frozen_layer(Conv1D(5, 8))(x))
    assert _uses_fused_node(_frozen_layer(nn.Linear(8, 5), dropout=0.1)(x))  # dropout applied before the node
    # a hook on the base layer must still see the call
    hooked = _frozen_layer(nn.Linear(8, 5))
    calls = []
    hooked.base_layer.register_forward_hook(lambda *_: calls.append(1))
    assert not _uses_fused_node(hooked(x)) and calls == [1]
    # a base weight that trains gets its gradient from autograd
    training_base = _frozen_layer(nn.Linear(8, 5))
    training_base.base_layer.weight.requires_grad_(True)
    assert not _uses_fused_node(training_base(x))
    # under autocast the base layer's autocast rules apply
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _uses_fused_node(_frozen_layer(nn.Linear(8, 5))(x))


def test_the_unfused_path_under_autocast_on_a_2d_input():
    # the base output of a 2-D input is not a view, so the in-place add was tried with a bf16 output and an
    # fp32 B: the update must follow autocast's dtype instead
    layer = _frozen_layer(nn.Linear(8, 5))
    x = torch.randn(4, 8)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    expected = layer.base_layer(x) + 2.0 * (x @ A.T @ B.T)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)
