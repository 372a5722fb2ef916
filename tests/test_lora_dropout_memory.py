"""LoRA's input dropout keeps ``x`` and a boolean mask for the backward pass, not the dropped-out copy.

Every path a LoRA linear layer runs in training (the fused node on ``nn.Linear`` and ``Conv1D``, the unfused
loop on a trained, hooked or 4-bit base and with several adapters, under autocast) must give what the plain
computation ``base(x) + s · (dropout(x) A^T) B^T`` gives, with ``nn.Dropout``'s very masks for the same seed,
and the gradients autograd computes for it; eval mode and merged adapters draw nothing.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import LoraConfig, QuantizationConfig, get_peft_model
from peftkit.methods.lora import LoraLinear
from peftkit.methods.lora import dropout as lora_dropout
from peftkit.methods.lora import linear as lora_linear
from peftkit.methods.lora.dropout import DropoutLinear, dropout_with_mask
from peftkit.methods.lora.fused import fused_lora_linear
from tests.tiny_models import TINY_MODELS

P = 0.3


def _adapted(base: nn.Module, names=("a",), train_base=False) -> LoraLinear:
    base.requires_grad_(train_base)
    if type(base).__name__ == "Linear4bit":
        from peftkit.methods.lora.quantized import LoraLinear4bit as wrapper
    else:
        wrapper = LoraLinear
    layer = wrapper(base)
    for i, name in enumerate(names):
        torch.manual_seed(10 + i)
        layer.add_adapter(name, LoraConfig(r=3, alpha=6, init="random", dropout=P))
    layer.active_adapters = tuple(names)
    return layer.train()


def _reference(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """The plain computation, each active adapter's dropout drawn by ``F.dropout`` in order."""
    result = layer.base_layer(x)
    for name in layer.running_adapters():
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
        result = result + layer.scaling[name] * (F.dropout(x.to(A.dtype), P, training=True) @ A.T) @ B.T
    return result


def _quantized_linear():
    pytest.importorskip("bitsandbytes")
    from peftkit.quantization import quantize_linear

    return quantize_linear(nn.Linear(12, 7), QuantizationConfig())


def _hooked_linear():
    linear = nn.Linear(12, 7)
    linear.register_forward_hook(lambda *_: None)  # the unfused path: the hook must see the call
    return linear


CASES = {
    "linear (fused node)": (lambda: nn.Linear(12, 7), {}),
    "conv1d (fused node, fan_in_fan_out)": (lambda: Conv1D(7, 12), {}),
    "trained base (unfused)": (lambda: nn.Linear(12, 7), {"train_base": True}),
    "hooked base (unfused)": (_hooked_linear, {}),
    "two adapters (unfused)": (lambda: nn.Linear(12, 7), {"names": ("a", "b")}),
    "linear4bit (QLoRA)": (_quantized_linear, {}),
}


@pytest.mark.parametrize("case", CASES)
def test_training_matches_the_plain_computation_with_nn_dropouts_masks(case):
    make_base, options = CASES[case]
    torch.manual_seed(0)
    layer = _adapted(make_base(), **options)
    x = torch.randn(2, 5, 12, requires_grad=True)
    trained = [x, *(p for p in layer.parameters() if p.requires_grad)]

    torch.manual_seed(1)
    got = layer(x)
    state_after = torch.get_rng_state()
    grad = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, trained, grad)

    torch.manual_seed(1)
    want = _reference(layer, x)
    assert torch.equal(state_after, torch.get_rng_state())  # as many random numbers drawn
    want_grads = torch.autograd.grad(want, trained, grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # another mask would be far off
    assert len(got_grads) == len(trained) >= 3
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


def test_the_mask_and_output_are_those_of_f_dropout():
    x = torch.randn(4, 33, 17)
    torch.manual_seed(3)
    want = F.dropout(x, P, training=True)
    state = torch.get_rng_state()
    torch.manual_seed(3)
    dropped, keep = dropout_with_mask(x, P)
    assert torch.equal(dropped, want) and torch.equal(torch.get_rng_state(), state)
    assert keep.dtype == torch.bool and torch.equal(keep, want != 0)


def _seeded(function, *inputs):
    with torch.random.fork_rng():
        torch.manual_seed(5)  # one mask for every evaluation gradcheck makes
        return function(*inputs)


@pytest.mark.parametrize("transposed", [False, True])
def test_the_nodes_backward_is_the_derivative_in_float64(transposed):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn((5, 4) if transposed else (4, 5), dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def fused(x, bias, A, B):
        return fused_lora_linear(x, x, weight, bias, A, B, 0.7, transposed, dropout_p=0.4)

    assert torch.autograd.gradcheck(lambda *t: _seeded(fused, *t), (x, bias, A, B))
    assert torch.autograd.gradcheck(lambda *t: _seeded(DropoutLinear.apply, *t, 0.4), (x, A))


def _saved_storages(step) -> list[tuple[torch.dtype, int]]:
    """(dtype, element count) of each distinct storage autograd saves while ``step()`` runs."""
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = (tensor.dtype, storage.nbytes() // tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return list(seen.values())


@pytest.mark.parametrize("hook_base", [False, True], ids=["fused", "unfused"])
def test_layers_reading_one_input_keep_it_once_and_a_boolean_mask_each(hook_base):
    # a block's q, k and v projections: one input, three adapted layers with dropout
    x = torch.randn(4, 16, 24, requires_grad=True)
    layers = [_adapted(nn.Linear(24, n)) for n in (24, 8, 8)]
    if hook_base:  # the unfused path
        for layer in layers:
            layer.base_layer.register_forward_hook(lambda *_: None)
    saved = _saved_storages(lambda: [layer(x) for layer in layers])
    input_sized = sorted(str(dtype) for dtype, count in saved if count == x.numel())
    assert input_sized == ["torch.bool"] * 3 + ["torch.float32"]  # x itself, three masks
    # what autograd keeps for nn.Dropout followed by the adapter (the path taken when the dropout module is
    # hooked): every layer its float mask and its dropped-out input
    for layer in layers:
        layer.lora_dropout["a"].register_forward_hook(lambda *_: None)
    saved = _saved_storages(lambda: [layer(x) for layer in layers])
    assert sum(count == x.numel() and dtype == torch.float32 for dtype, count in saved) >= 6


@pytest.mark.parametrize("merge", [False, True], ids=["eval", "merged"])
def test_eval_mode_and_merged_adapters_draw_no_mask(merge):
    torch.manual_seed(0)
    layer = _adapted(nn.Linear(12, 7))
    x = torch.randn(3, 12)
    A, B, s = layer.lora_A["a"].weight, layer.lora_B["a"].weight, layer.scaling["a"]
    want = layer.base_layer(x) + s * (x @ A.T) @ B.T
    if merge:
        layer.merge("a")
    else:
        layer.eval()
    state = torch.get_rng_state()
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.get_rng_state(), state)


def test_under_autocast_the_gradients_are_those_of_the_plain_ops():
    torch.manual_seed(0)
    layer = _adapted(_hooked_linear())  # the unfused path, which autocast takes
    x = torch.randn(2, 5, 12, requires_grad=True)
    trained = [x, layer.lora_A["a"].weight, layer.lora_B["a"].weight]

    def run():
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        return out, torch.autograd.grad(out.float().square().sum(), trained)

    got, got_grads = run()
    layer.lora_dropout["a"].register_forward_hook(lambda *_: None)  # nn.Dropout and autograd, as before
    want, want_grads = run()
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    for got_grad, want_grad in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_model_step_is_what_it_was_with_nn_dropout(arch, monkeypatch):
    tiny = TINY_MODELS[arch]
    batch = tiny.batch()

    def loss_and_grads():
        model = get_peft_model(
            tiny.build(), LoraConfig(r=4, alpha=8, init="random", target_modules="all-linear", dropout=P)
        )
        model.train()
        torch.manual_seed(7)
        loss = tiny.output(model(**batch)).float().pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = loss_and_grads()

    def old_way(module, x):  # call nn.Dropout itself and let autograd keep what it keeps
        return 0.0 if type(module) is nn.Identity else None

    monkeypatch.setattr(lora_linear, "dropout_probability", old_way)
    monkeypatch.setattr(lora_dropout, "dropout_probability", old_way)
    old_loss, old_grads = loss_and_grads()
    assert torch.equal(loss, old_loss)  # the same masks, the same forward ops
    assert grads.keys() == old_grads.keys() and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, old_grads[name], rtol=1e-4, atol=1e-6, msg=name)
