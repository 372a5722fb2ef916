"""LoRA computes W0 x + s·B A x, merges exactly into the weights, and unloads to the untouched base."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import LoraConfig, get_peft_model
from peftkit.methods.lora import LoraEmbedding, LoraLinear
from tests.tiny_models import TINY_MODELS, run


def _config(tiny, **overrides):
    return LoraConfig(r=4, alpha=8, init="random", target_modules=tiny.targets, **overrides)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_linear_output_is_W0x_plus_scaled_BAx(use_rslora):
    base = nn.Linear(12, 7)
    layer = LoraLinear(base)
    layer.add_adapter("a", LoraConfig(r=3, alpha=5, init="random", use_rslora=use_rslora))
    layer.active_adapter = "a"
    x = torch.randn(2, 5, 12)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    scale = 5 / (math.sqrt(3) if use_rslora else 3)
    expected = x @ base.weight.T + base.bias + scale * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_conv1d_weight_is_transposed_and_merge_respects_it():
    base = Conv1D(7, 12)  # (nf=out, nx=in): weight (12, 7)
    with torch.no_grad():
        base.bias.normal_()
    layer = LoraLinear(base)
    layer.add_adapter("a", LoraConfig(r=2, alpha=4, init="random"))
    layer.active_adapter = "a"
    x = torch.randn(3, 12)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    expected = x @ base.weight + base.bias + 2.0 * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    layer.merge("a")
    torch.testing.assert_close(x @ base.weight + base.bias, expected, rtol=1e-5, atol=1e-6)


def test_embedding_output_is_E0_plus_scaled_BA_lookup():
    base = nn.Embedding(20, 6)
    layer = LoraEmbedding(base)
    layer.add_adapter("a", LoraConfig(r=3, alpha=6, init="random"))
    layer.active_adapter = "a"
    tokens = torch.tensor([[1, 5, 19], [0, 0, 7]])
    A, B = layer.lora_embedding_A["a"], layer.lora_embedding_B["a"]  # (r, vocab), (dim, r)
    expected = base.weight[tokens] + 2.0 * (A.T[tokens] @ B.T)
    torch.testing.assert_close(layer(tokens), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_fresh_adapter_leaves_the_output_unchanged(tiny, init):
    reference = run(tiny.build(), tiny, tiny.batch())
    model = get_peft_model(tiny.build(), LoraConfig(r=4, init=init, target_modules=tiny.targets))
    assert torch.equal(run(model, tiny, tiny.batch()), reference)


def test_merged_equals_unmerged_equals_merge_and_unload(tiny):
    batch = tiny.batch()
    model = get_peft_model(tiny.build(), _config(tiny))
    unmerged = run(model, tiny, batch)
    assert not torch.allclose(unmerged, run(tiny.build(), tiny, batch)), (
        "a random adapter must change the output"
    )
    model.merge_adapter()
    torch.testing.assert_close(run(model, tiny, batch), unmerged, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(run(model, tiny, batch), unmerged, rtol=1e-5, atol=1e-5)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, (LoraLinear, LoraEmbedding)) for m in plain.modules())
    torch.testing.assert_close(run(plain, tiny, batch), unmerged, rtol=1e-5, atol=1e-5)


def test_unload_and_disable_reproduce_the_base_exactly(tiny):
    batch = tiny.batch()
    reference = run(tiny.build(), tiny, batch)
    model = get_peft_model(tiny.build(), _config(tiny))
    with model.disable_adapter():
        assert torch.equal(run(model, tiny, batch), reference)
    assert not torch.equal(run(model, tiny, batch), reference)
    plain = model.unload()
    assert torch.equal(run(plain, tiny, batch), reference)
    pristine = tiny.build()
    assert plain.state_dict().keys() == pristine.state_dict().keys()
    assert all(torch.equal(v, pristine.state_dict()[k]) for k, v in plain.state_dict().items())


def test_embedding_and_linear_targets_merge_together():
    tiny = TINY_MODELS["llama"]
    config = LoraConfig(r=4, init="random", target_modules=["embed_tokens", "q_proj", "down_proj"])
    model = get_peft_model(tiny.build(), config)
    assert isinstance(model.base_model.model.embed_tokens, LoraEmbedding)
    out = run(model, tiny, tiny.batch())
    torch.testing.assert_close(run(model.merge_and_unload(), tiny, tiny.batch()), out, rtol=1e-5, atol=1e-5)
