"""The architecture table on every family users bring (``FAMILIES`` of tests/tiny_models.py): its facts match
transformers' module names, its defaults match Hugging Face PEFT's where both have one (IA3's differences are
listed, each with its reason), and parallel adapters read the feed-forward sub-layer's input everywhere.
(That every method's defaults apply, train and save on each family, and that LoRA and IA3 files load in HF
PEFT with equal logits, is the matrix's job: test_architecture_matrix.py.)"""

import re

import peft
import pytest
import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as HF_IA3
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as HF_LORA
from torch import nn

from peftkit import BottleneckConfig, IA3Config, LoraConfig, get_peft_model
from peftkit.architectures import TABLE, block_lists
from peftkit.methods.bottleneck import BottleneckLayer
from peftkit.methods.ia3 import IA3Linear
from tests.tiny_models import FAMILIES, run

# One model per family: the token-classification twins share their body with the sequence-classification ones.
NAMES = sorted(name for name in FAMILIES if not name.endswith("-token"))
MODEL_TYPES = {name: FAMILIES[name].build().config.model_type for name in NAMES}
POSITIONS = ("query", "key", "value", "qkv", "attention_output", "ffn_input", "ffn_output")

# Where peftkit's IA3 defaults differ from HF PEFT's: peftkit rescales keys, values and the feed-forward
# intermediate activation on every family (Liu et al. 2022, section 3.3). Module suffix -> feed-forward flag,
# (peftkit only, HF PEFT only).
_KEYS_NOT_QUERIES = "HF PEFT rescales queries instead of keys"
IA3_DIFFERENCES = {
    # HF PEFT's suffix `output.dense` also matches the attention output projection, rescaling its input:
    # redundant with the value vector (attention output = softmax(...) V, rescaled per feature either way).
    "bert": ({}, {"attention.output.dense": True}),
    "roberta": ({}, {"attention.output.dense": True}),
    "deberta-v2": ({}, {"attention.output.dense": True}),
    "opt": ({"self_attn.v_proj": False}, {"self_attn.q_proj": False}),  # HF PEFT: queries and keys
    "gpt-j": ({"attn.k_proj": False}, {"attn.q_proj": False}),  # the rest: queries and values
    "qwen2": ({"self_attn.k_proj": False}, {"self_attn.q_proj": False}),
    "qwen3": ({"self_attn.k_proj": False}, {"self_attn.q_proj": False}),
    "gemma2": ({"self_attn.k_proj": False}, {"self_attn.q_proj": False}),
    "gemma3": ({"self_attn.k_proj": False}, {"self_attn.q_proj": False}),
    "bart": (
        {"self_attn.k_proj": False, "encoder_attn.k_proj": False},
        {"self_attn.q_proj": False, "encoder_attn.q_proj": False},
    ),
    # HF PEFT rescales the output of the gate's linear half (wi_1) instead of wo's input: the same
    # intermediate activation, one vector of the same size; peftkit treats mT5 as T5.
    "mt5": (
        {"layer.1.DenseReluDense.wo": True, "layer.2.DenseReluDense.wo": True},
        {"layer.1.DenseReluDense.wi_1": False, "layer.2.DenseReluDense.wi_1": False},
    ),
}


def _in_block(path: str) -> str:
    """A layer's path inside its block: ``bert.encoder.layer.1.attention.self.key`` -> ``attention.self.key``."""
    return re.sub(r"^.*?\.\d+\.", "", path)


@pytest.mark.parametrize("name", NAMES)
def test_every_position_of_the_entry_is_a_linear_layer_of_the_model(name):
    model = FAMILIES[name].build()
    arch = TABLE[MODEL_TYPES[name]]
    linear = {p for p, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    for position in POSITIONS:
        if (pattern := arch.pattern(position)) is not None:
            found = {p for p, _ in model.named_modules() if re.fullmatch(pattern, p)}
            assert found and found <= linear, f"{position}: {sorted(found)}"
    if arch.blocks is not None:
        lists = [model.get_submodule(path) for path in block_lists(model)]
        assert lists and all(
            len(blocks) == model.config.get_text_config().num_hidden_layers for blocks in lists
        )


@pytest.mark.parametrize("name", [n for n in NAMES if MODEL_TYPES[n] in HF_LORA])
def test_lora_defaults_wrap_what_hf_peft_wraps(name):
    tiny = FAMILIES[name]
    ours = get_peft_model(tiny.build(), LoraConfig(r=2)).base_model
    theirs = peft.get_peft_model(tiny.build(), peft.LoraConfig(r=2)).base_model.model
    wrapped = {p for p, m in ours.named_modules() if hasattr(m, "lora_A")}
    assert wrapped and wrapped == {
        p for p, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)
    }


def _ia3_layers(model, kind, flag) -> set[tuple[str, bool]]:
    return {(_in_block(p), flag(m)) for p, m in model.named_modules() if isinstance(m, kind)}


@pytest.mark.parametrize("name", [n for n in NAMES if MODEL_TYPES[n] in HF_IA3])
def test_ia3_defaults_differ_from_hf_peft_only_where_listed(name):
    tiny = FAMILIES[name]
    ours = _ia3_layers(
        get_peft_model(tiny.build(), IA3Config()), IA3Linear, lambda m: m.feedforward["default"]
    )
    theirs = _ia3_layers(
        peft.get_peft_model(tiny.build(), peft.IA3Config()),
        peft.tuners.ia3.IA3Layer,
        lambda m: m.is_feedforward,
    )
    only_ours, only_theirs = IA3_DIFFERENCES.get(name, ({}, {}))
    assert (ours - theirs, theirs - ours) == (set(only_ours.items()), set(only_theirs.items()))


@pytest.mark.parametrize("name", NAMES)
def test_parallel_adapter_starts_exact_and_reads_the_feed_forward_input(name):
    """Added at the feed-forward output layer of every block: the exact base output at init; moved off zero,
    each such layer outputs its base output plus s·a(x) where x is the input of the feed-forward sub-layer
    (observed independently: the input of the last feed-forward input layer that ran before it)."""
    tiny = FAMILIES[name]
    base = run(tiny.build(), tiny, tiny.batch())
    model = get_peft_model(
        tiny.build(), BottleneckConfig(placement="parallel", bottleneck_size=4, scaling=2.0)
    )
    assert torch.equal(run(model, tiny, tiny.batch()), base)
    ffn_input = re.compile(TABLE[MODEL_TYPES[name]].pattern("ffn_input"))
    last_input, plain, checked = [], {}, []

    def check(layer, args, output):
        adapter = layer.adapters["default"]
        expected = plain[layer] + 2.0 * adapter(last_input[-1])
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
        checked.append(layer)

    for path, module in model.base_model.named_modules():
        if ffn_input.fullmatch(path):
            module.register_forward_pre_hook(lambda m, args: last_input.append(args[0]))
        if isinstance(module, BottleneckLayer):
            nn.init.normal_(module.adapters["default"].up.weight)
            module.base_layer.register_forward_hook(
                lambda m, a, out, layer=module: plain.__setitem__(layer, out)
            )
            module.register_forward_hook(check)
    moved = run(model, tiny, tiny.batch())
    assert checked and not torch.allclose(moved, base)
