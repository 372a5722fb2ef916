"""Which modules LoRA wraps, and the errors a user meets when the spec is wrong."""

import pytest
from torch import nn

from peftkit import ConfigError, LoraConfig, get_peft_model
from peftkit.methods.lora import LoraEmbedding, LoraLinear
from tests.tiny_models import TINY_MODELS


def _wrapped(model):
    return sorted(
        n for n, m in model.base_model.named_modules() if isinstance(m, (LoraLinear, LoraEmbedding))
    )


@pytest.mark.parametrize(
    ("model_name", "expected_leaves"),
    [("bert", {"query", "value"}), ("gpt2", {"c_attn"}), ("llama", {"q_proj", "v_proj"}), ("t5", {"q", "v"})],
)
def test_architecture_defaults(model_name, expected_leaves):
    model = get_peft_model(TINY_MODELS[model_name].build(), LoraConfig(r=2))
    wrapped = _wrapped(model)
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == expected_leaves
    assert len(wrapped) == len(expected_leaves) * (
        2 if model_name != "t5" else 6
    )  # T5: enc self, dec self + cross


def test_all_linear_skips_the_output_head_and_modules_to_save():
    llama = get_peft_model(TINY_MODELS["llama"].build(), LoraConfig(r=2, target_modules="all-linear"))
    assert "lm_head" not in _wrapped(llama) and len(_wrapped(llama)) == 14
    bert = get_peft_model(
        TINY_MODELS["bert"].build(),
        LoraConfig(r=2, target_modules="all-linear", modules_to_save=["classifier"]),
    )
    assert "classifier" not in " ".join(_wrapped(bert))
    gpt2 = get_peft_model(TINY_MODELS["gpt2"].build(), LoraConfig(r=2, target_modules="all-linear"))
    assert {n.rsplit(".", 1)[-1] for n in _wrapped(gpt2)} == {"c_attn", "c_proj", "c_fc"}


def test_regex_exclude_and_layer_selection():
    model = get_peft_model(
        TINY_MODELS["llama"].build(),
        LoraConfig(r=2, target_modules=r".*_proj", exclude_modules=["o_proj"], layers_to_transform=1),
    )
    wrapped = _wrapped(model)
    assert wrapped and all(n.startswith("model.layers.1.") for n in wrapped)
    assert not any(n.endswith("o_proj") for n in wrapped) and len(wrapped) == 6


def test_no_match_lists_the_names_that_exist():
    with pytest.raises(ConfigError, match=r"matches no module.*q_proj.*v_proj"):
        get_peft_model(TINY_MODELS["llama"].build(), LoraConfig(target_modules=["qproj"]))


def test_a_typo_among_good_names_is_not_ignored():
    with pytest.raises(ConfigError, match=r"entries \['vaule'\] match no module \(the others do\)"):
        get_peft_model(TINY_MODELS["bert"].build(), LoraConfig(target_modules=["query", "vaule"]))


def test_unsupported_module_type_is_named():
    with pytest.raises(
        ConfigError, match=r"cannot wrap: .*self_attn \(LlamaAttention\).*supported: nn.Linear"
    ):
        get_peft_model(TINY_MODELS["llama"].build(), LoraConfig(target_modules=["self_attn"]))


def test_plain_torch_model_needs_explicit_targets_and_says_which_exist():
    with pytest.raises(
        ConfigError, match=r"`target_modules` is required.*Linear layers in this model: 0, 2, 4"
    ):
        get_peft_model(TINY_MODELS["mlp"].build(), LoraConfig())


def test_a_refused_config_leaves_the_model_untouched():
    model = get_peft_model(TINY_MODELS["llama"].build(), LoraConfig(r=2))
    before = _wrapped(model)
    with pytest.raises(ConfigError):
        model.add_adapter("bad", LoraConfig(target_modules=["q_proj", "nope"]))
    with pytest.raises(ConfigError, match="`modules_to_save` entries \\['head'\\]"):
        model.add_adapter("bad", LoraConfig(modules_to_save=["head"]))
    assert _wrapped(model) == before and list(model.peft_config) == ["default"]
    assert not any(".bad." in n for n, _ in model.named_parameters())


def test_second_adapter_joins_the_existing_wrapper():
    model = get_peft_model(TINY_MODELS["llama"].build(), LoraConfig(r=2))
    model.add_adapter("more", LoraConfig(r=3, target_modules="all-linear"))
    q = model.base_model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoraLinear) and isinstance(q.base_layer, nn.Linear)
    assert set(q.adapter_names()) == {"default", "more"}
