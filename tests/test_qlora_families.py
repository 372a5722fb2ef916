"""QLoRA across model families: the 4-bit model computes what its own de-quantized weights compute in fp32,
the layers transformers' own bitsandbytes integration quantizes are quantized (GPT-2's Conv1D, Falcon's
nn.Linear subclass), the modules a model keeps in float32 (T5's ``wo``) stay so, and a training step works."""

import copy

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    FalconConfig,
    FalconForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MT5Config,
    MT5ForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
)

from peftkit import (
    ConfigError,
    LoraConfig,
    QuantizationConfig,
    dequantize_model,
    get_qlora_model,
    quantize_model,
)
from peftkit.quantization import is_quantized_linear, kept_in_fp32

pytest.importorskip("bitsandbytes")

V = 64
T5_SIZES = dict(
    vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
)
FAMILIES = {
    "t5": lambda: T5ForConditionalGeneration(T5Config(**T5_SIZES)),
    "t5-gated": lambda: T5ForConditionalGeneration(T5Config(**T5_SIZES, feed_forward_proj="gated-gelu")),
    "mt5": lambda: MT5ForConditionalGeneration(MT5Config(**T5_SIZES)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=32)),
    "falcon": lambda: FalconForCausalLM(
        FalconConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    ),
    "falcon-new": lambda: FalconForCausalLM(
        FalconConfig(
            vocab_size=V,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
        )
    ),
    "llama": lambda: LlamaForCausalLM(
        LlamaConfig(
            vocab_size=V,
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ),
    "bert": lambda: BertForSequenceClassification(
        BertConfig(
            vocab_size=V,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
            num_labels=3,
        )
    ),
}
# linear layers of the family that are quantized by default ("all-linear"): every one but the head and those
# kept in float32. Counted independently of peftkit's selection, from the module types.
LINEAR = (nn.Linear, __import__("transformers").pytorch_utils.Conv1D)


def _build(family, seed=0):
    torch.manual_seed(seed)
    return FAMILIES[family]().eval()


def _batch(model):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 6), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model.config.is_encoder_decoder:
        batch["decoder_input_ids"] = torch.randint(0, V, (2, 4), generator=generator)
    return batch


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_4bit_model_equals_its_own_dequantized_weights_in_fp32(family):
    model = _build(family)
    linear_before = {p for p, m in model.named_modules() if isinstance(m, LINEAR)}
    paths = quantize_model(model)
    reference = copy.deepcopy(model)
    assert dequantize_model(reference) == paths
    batch = _batch(model)
    with torch.no_grad():
        quantized, dequantized = model(**batch).logits, reference(**batch).logits
    scale = dequantized.abs().max()
    assert (quantized - dequantized).abs().max() <= 1e-5 * scale, family
    assert torch.isfinite(quantized).all()
    kept = {p for p in linear_before if p.endswith(".wo")}
    assert kept == kept_in_fp32(model)  # T5 / mT5 keep `wo` in float32, the others keep nothing
    assert all(type(model.get_submodule(p)) is nn.Linear for p in kept)
    assert all(model.get_submodule(p).weight.dtype == torch.float32 for p in kept)
    heads = {"lm_head", "classifier"} | {p for p in linear_before if p.startswith("lm_head")}
    assert set(paths) == linear_before - kept - heads  # Conv1D and FalconLinear quantized too


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_qlora_training_step_trains_only_the_adapters(family):
    model = get_qlora_model(_build(family), LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    assert any(is_quantized_linear(m) for m in model.modules())
    frozen = {n: t.clone() for n, t in model.base_model.state_dict().items() if "lora_" not in n}
    params = model.adapter_parameters("default")
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    batch = _batch(model.base_model)
    labels = batch.get("decoder_input_ids", batch["input_ids"])
    if family == "bert":
        labels = torch.tensor([0, 2])
    for _ in range(2):
        optimizer.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        optimizer.step()
    assert all(p.grad.abs().sum() > 0 for p in params)  # every adapter tensor reached by the loss
    after = model.base_model.state_dict()
    assert all(torch.equal(after[n], t) for n, t in frozen.items() if n in after)


def test_t5_wo_stays_fp32_even_when_named_and_a_non_linear_subclass_is_left_alone():
    model = _build("t5")
    with pytest.raises(ConfigError, match="keeps in float32"):
        quantize_model(model, QuantizationConfig(target_modules=["wo"]))

    class Scaled(nn.Linear):  # an nn.Linear subclass that computes something else
        def forward(self, x):
            return 2 * super().forward(x)

    net = nn.Sequential(nn.Linear(64, 64), Scaled(64, 64))
    assert quantize_model(net) == ["0"]
    assert type(net[1]) is Scaled
