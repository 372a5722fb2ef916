"""The architecture table and its lookup: facts checked against Hugging Face PEFT and transformers, the
structural match for unknown model types, the errors, and the shapes prefixes are built with."""

import peft
import pytest
import torch
import transformers
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as HF_LORA
from torch import nn

from peftkit import BottleneckConfig, ConfigError, IA3Config, LayerTuningConfig, LoraConfig, get_peft_model
from peftkit.architectures import TABLE, architecture, attention_layout, block_lists
from peftkit.methods.bottleneck import BottleneckLayer
from peftkit.methods.ia3 import IA3Linear
from tests.tiny_models import TINY_MODELS

# Model types HF PEFT has no LoRA default for, and peftkit's (the query and value projections, as for the rest).
PEFTKIT_ONLY_LORA = {
    "albert": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "modernbert": ("Wqkv",),
    "phi3": ("qkv_proj",),
    "smollm3": ("q_proj", "v_proj"),
    "gemma3": r".*language_model\..*\.(?:q_proj|v_proj)",  # the text model's, not the vision tower's
}


def test_lora_defaults_equal_hf_peft_where_both_have_one():
    shared = sorted(set(TABLE) & set(HF_LORA))
    assert len(shared) == len(TABLE) - len(PEFTKIT_ONLY_LORA) == 21
    for model_type in shared:
        assert list(TABLE[model_type].lora) == HF_LORA[model_type], model_type
    for model_type, targets in PEFTKIT_ONLY_LORA.items():
        assert TABLE[model_type].lora == targets


def _wrapped(model, kind):
    return {n for n, m in model.named_modules() if isinstance(m, kind)}


@pytest.mark.parametrize("model_name", ["bert", "gpt2", "llama", "t5"])
def test_ia3_defaults_apply_the_modules_hf_peft_applies(model_name):
    """Same layers and the same feed-forward ones, except that on BERT HF PEFT's suffix ``output.dense``
    also catches the attention output projection (peftkit follows the paper: keys, values, feed-forward)."""
    tiny = TINY_MODELS[model_name]
    ours = get_peft_model(tiny.build(), IA3Config()).base_model
    theirs = peft.get_peft_model(tiny.build(), peft.IA3Config()).base_model.model
    hf_layers = {n: m for n, m in theirs.named_modules() if isinstance(m, peft.tuners.ia3.IA3Layer)}
    hf_feedforward = {n for n, m in hf_layers.items() if m.is_feedforward}
    if model_name == "bert":
        extra = {n for n in hf_layers if n.endswith("attention.output.dense")}
        assert extra and extra <= hf_feedforward
        hf_layers = {n: m for n, m in hf_layers.items() if n not in extra}
        hf_feedforward -= extra
    ours_layers = {n: m for n, m in ours.named_modules() if isinstance(m, IA3Linear)}
    assert set(ours_layers) == set(hf_layers)
    assert {n for n, m in ours_layers.items() if m.feedforward["default"]} == hf_feedforward


def _renamed(tiny_name: str, model_type: str) -> nn.Module:
    model = TINY_MODELS[tiny_name].build()
    model.config.model_type = model_type
    return model


def test_an_unknown_model_type_with_standard_names_is_matched_by_structure():
    lora = get_peft_model(_renamed("llama", "my-llama"), LoraConfig(r=2)).base_model
    leaves = {n.rsplit(".", 1)[-1] for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    assert leaves == {"q_proj", "v_proj"}
    ia3 = get_peft_model(_renamed("llama", "my-llama"), IA3Config()).base_model
    layers = {n: m for n, m in ia3.named_modules() if isinstance(m, IA3Linear)}
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"k_proj", "v_proj", "down_proj"}
    assert {n.rsplit(".", 1)[-1] for n, m in layers.items() if m.feedforward["default"]} == {"down_proj"}
    gpt2 = get_peft_model(_renamed("gpt2", "my-gpt"), BottleneckConfig(placement="houlsby")).base_model
    assert {n.split("h.0.")[-1] for n in _wrapped(gpt2, BottleneckLayer) if ".h.0." in n} == {
        "attn.c_proj",
        "mlp.c_proj",
    }


def test_a_model_without_a_known_layout_gets_an_error_naming_what_to_pass():
    with pytest.raises(
        ConfigError,
        match=r"IA3 needs `target_modules` for this model: model type None has no entry in peftkit's "
        r"architecture table .*key and value projections, feed-forward output layer\); pass `target_modules` "
        r".*`feedforward_modules`.*Linear layers in this model: 0, 2, 4",
    ):
        get_peft_model(TINY_MODELS["mlp"].build(), IA3Config())
    with pytest.raises(ConfigError, match=r"bottleneck adapters \(parallel\) need `target_modules`"):
        get_peft_model(TINY_MODELS["mlp"].build(), BottleneckConfig(placement="parallel"))


def test_albert_refuses_top_layer_tuning_and_says_how_to_train_its_shared_block():
    config = transformers.AlbertConfig(
        vocab_size=64,
        hidden_size=32,
        embedding_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
    )
    albert = transformers.AlbertForSequenceClassification(config)
    with pytest.raises(ConfigError, match=r"ALBERT shares one block's weights .*name it with `block_lists`"):
        get_peft_model(albert, LayerTuningConfig())
    with pytest.raises(
        ConfigError, match=r"layer tuning: ALBERT shares one block's weights .*; pass `block_lists`"
    ):
        architecture(
            albert, ("blocks",), purpose="layer tuning", remedy="`block_lists`"
        )  # no stand-in layout
    shared = "albert.encoder.albert_layer_groups.0.albert_layers"
    model = get_peft_model(albert, LayerTuningConfig(block_lists=[shared]))
    assert model.trainable_parameters().trainable == sum(
        p.numel() for p in albert.get_submodule(shared).parameters()
    )


def test_block_lists_come_from_the_table_for_every_stack():
    assert block_lists(TINY_MODELS["t5"].build()) == ["encoder.block", "decoder.block"]
    assert block_lists(TINY_MODELS["bert"].build()) == ["bert.encoder.layer"]
    assert block_lists(_renamed("llama", "my-llama")) == ["model.layers"]  # structural


class _Holder(nn.Module):
    """A module with only a transformers config: attention_layout reads nothing else."""

    def __init__(self, config):
        super().__init__()
        self.config = config


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            transformers.T5Config(num_layers=3, num_decoder_layers=2, num_heads=4, d_kv=8),
            (2, 4, 4, 8, 3, 4, 8),
        ),
        (
            transformers.BartConfig(
                encoder_layers=3,
                decoder_layers=2,
                encoder_attention_heads=8,
                decoder_attention_heads=4,
                d_model=64,
            ),
            (2, 4, 4, 16, 3, 8, 8),
        ),
        (
            transformers.AlbertConfig(
                num_hidden_layers=3, inner_group_num=2, num_attention_heads=4, hidden_size=32
            ),
            (6, 4, 4, 8, 0, 0, 0),  # one shared group of 2 blocks, run at each of 3 layers: 6 attention calls
        ),
        (
            transformers.Gemma3Config(
                text_config=dict(
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16
                )
            ),
            (2, 4, 1, 16, 0, 0, 0),  # the text model's
        ),
    ],
    ids=["t5", "bart", "albert", "gemma3-multimodal"],
)
def test_attention_layout_from_the_config(config, expected):
    layout = attention_layout(_Holder(config))
    assert (
        layout.layers,
        layout.heads,
        layout.kv_heads,
        layout.head_dim,
        layout.encoder_layers,
        layout.encoder_heads,
        layout.encoder_head_dim,
    ) == expected


_FALCON = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, bos_token_id=1, eos_token_id=2
)


@pytest.mark.parametrize(
    "build",
    [
        lambda: TINY_MODELS["llama"].build(),  # grouped-query: 2 KV heads for 4 query heads
        lambda: TINY_MODELS["gpt2"].build(),
        lambda: transformers.FalconForCausalLM(transformers.FalconConfig(**_FALCON)),  # multi-query: 1
        lambda: (
            transformers.FalconForCausalLM(  # new decoder layout: 2 KV heads, broadcast to 4 before caching
                transformers.FalconConfig(**_FALCON, new_decoder_architecture=True, num_kv_heads=2)
            )
        ),
        lambda: transformers.FalconForCausalLM(transformers.FalconConfig(**_FALCON, multi_query=False)),
    ],
    ids=["llama", "gpt2", "falcon-multi-query", "falcon-new", "falcon-multi-head"],
)
def test_attention_layout_is_the_shape_of_the_models_own_cache(build):
    model = build().eval()
    with torch.no_grad():
        cache = model(input_ids=torch.randint(0, 64, (2, 5)), use_cache=True).past_key_values
    layout = attention_layout(model)
    assert len(cache.layers) == layout.layers
    assert all(layer.keys.shape == (2, layout.kv_heads, 5, layout.head_dim) for layer in cache.layers)


# --- bottleneck adapters size themselves from the layer they wrap -------------------------------------------
@pytest.mark.parametrize(
    ("model_name", "target", "placement", "features"),
    [
        ("bert", "intermediate.dense", "pfeiffer", (48, 48)),  # widens 32 -> 48
        ("bert", "intermediate.dense", "parallel", (32, 48)),
        ("llama", "k_proj", "houlsby", (16, 16)),  # grouped KV heads: 2 x 8, not hidden_size 32
        ("llama", "k_proj", "parallel", (32, 16)),
        ("gpt2", "c_fc", "pfeiffer", (128, 128)),  # Conv1D, weight stored (in, out)
    ],
)
def test_bottleneck_on_a_layer_of_another_width_starts_exact_and_trains(
    model_name, target, placement, features
):
    tiny = TINY_MODELS[model_name]
    reference = tiny.build()
    model = get_peft_model(
        tiny.build(), BottleneckConfig(placement=placement, bottleneck_size=4, target_modules=[target])
    )
    layers = [m for m in model.base_model.modules() if isinstance(m, BottleneckLayer)]
    adapter = layers[0].adapters["default"]
    assert (adapter.down.in_features, adapter.up.out_features) == features
    batch = tiny.batch()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(2):
        optimizer.zero_grad()
        model(**tiny.batch(seed=10 + step)).logits.pow(2).mean().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits, reference(**batch).logits)


def test_parallel_adapter_pairs_each_feed_forward_output_with_the_input_of_its_own_block():
    tiny = TINY_MODELS["t5"]
    model = get_peft_model(tiny.build(), BottleneckConfig(placement="parallel", bottleneck_size=4))
    t5 = model.base_model
    for stack in ("encoder", "decoder"):
        for index in range(2):
            ffn = t5.get_submodule(
                f"{stack}.block.{index}.layer.{1 if stack == 'encoder' else 2}.DenseReluDense"
            )
            assert isinstance(ffn.wo, BottleneckLayer) and ffn.wi._forward_pre_hooks


# --- IA3 files say what was applied ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model_name", "targets", "feedforward"),
    [("llama", ["k_proj", "v_proj"], None), ("t5", ["k", "v", "wo"], ["wo"]), ("gpt2", "all-linear", None)],
)
def test_ia3_files_with_explicit_targets_load_in_hf_peft_with_equal_logits(
    model_name, targets, feedforward, tmp_path
):
    """HF PEFT reads a missing ``feedforward_modules`` as its model-type default (LLaMA's ``down_proj``,
    which was not targeted): peftkit writes the layers it applied, feed-forward ones included."""
    import json

    tiny = TINY_MODELS[model_name]
    ours = get_peft_model(
        tiny.build(), IA3Config(target_modules=targets, feedforward_modules=feedforward, init="random")
    )
    expected = ours(**tiny.batch()).logits.detach()
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    applied = {n for n, m in ours.base_model.named_modules() if isinstance(m, IA3Linear)}
    assert set(written["target_modules"]) == applied
    assert set(written["feedforward_modules"]) == {
        n for n in applied if ours.base_model.get_submodule(n).feedforward["default"]
    }
    theirs = peft.PeftModel.from_pretrained(tiny.build(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(theirs(**tiny.batch()).logits, expected)


def test_gemma3_multimodal_defaults_adapt_the_language_model_not_the_vision_tower():
    text = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        head_dim=8,
        vocab_size=300,
    )
    vision = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        image_size=28,
        patch_size=14,
    )
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    for adapter in (
        LoraConfig(r=2),
        IA3Config(),
        BottleneckConfig(placement="parallel"),
        LayerTuningConfig(),
    ):
        model = get_peft_model(transformers.Gemma3ForConditionalGeneration(config), adapter)
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trained and all(".language_model.layers." in n for n in trained), type(adapter).__name__
