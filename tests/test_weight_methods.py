"""Method-specific behaviour of BitFit, top-layer tuning, bottleneck adapters, AdapterFusion, IA3 and full
fine-tuning (the shared contract is in test_methods_contract.py)."""

import re

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel
from transformers.pytorch_utils import Conv1D

from peftkit import (
    BASE_ROW,
    AdapterError,
    BitFitConfig,
    BottleneckConfig,
    ConfigError,
    FullFineTuningConfig,
    FusionConfig,
    IA3Config,
    LayerTuningConfig,
    PeftModel,
    get_peft_model,
)
from peftkit.methods.bottleneck import BottleneckLayer
from peftkit.methods.ia3 import IA3Linear
from tests.tiny_models import TINY_MODELS, run


def _trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


# --- BitFit ------------------------------------------------------------------------------------------------
def test_bitfit_on_bert_base_trains_exactly_its_bias_terms():
    """BERT-base (BertConfig() defaults): per layer the biases of query, key, value and attention output
    (4 x 768), the first feed-forward layer (3072), the second (768) and two LayerNorms (2 x 768) make
    8,448; times 12 layers, plus the embedding LayerNorm (768) and the pooler (768): 102,912 of 109,482,240
    parameters, 0.094%."""
    model = get_peft_model(BertModel(BertConfig()), BitFitConfig())
    count = model.trainable_parameters()
    per_layer = 4 * 768 + 3072 + 768 + 2 * 768
    assert per_layer == 8448
    assert count.trainable == 12 * per_layer + 768 + 768 == 102_912
    assert count.base == 109_482_240
    assert 0.08 < count.trainable_percent < 0.1


def test_bitfit_roles_select_a_subset():
    model = get_peft_model(TINY_MODELS["bert"].build(), BitFitConfig(roles=["query", "ffn_in"]))
    names = _trainable(model)
    assert len(names) == 4  # 2 layers x (query, intermediate)
    assert all(re.search(r"(query|intermediate\.dense)\.bias$", n) for n in names)


def test_bitfit_says_clearly_when_there_is_nothing_to_train():
    with pytest.raises(ConfigError, match=r"has no bias parameters.*use LoRA or IA3"):
        get_peft_model(TINY_MODELS["llama"].build(), BitFitConfig())
    with pytest.raises(
        ConfigError, match=r"`roles` \['query'\] match no bias of GPT2LMHeadModel; roles present"
    ):
        get_peft_model(TINY_MODELS["gpt2"].build(), BitFitConfig(roles=["query"]))
    with pytest.raises(ConfigError, match=r"`roles` has unknown entries \['queries'\]"):
        BitFitConfig(roles=["queries"])


# --- top-layer tuning --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model_name", "config", "expected"),
    [
        ("bert", LayerTuningConfig(top_k=1), r"^base_model\.bert\.encoder\.layer\.1\."),
        (
            "gpt2",
            LayerTuningConfig(top_k=1, include_final_norm=True),
            r"^base_model\.transformer\.(h\.1\.|ln_f\.)",
        ),
        (
            "llama",
            LayerTuningConfig(top_k=2, include_embeddings=True),
            r"^base_model\.model\.(layers\.[01]\.|embed_tokens\.)",
        ),
        ("t5", LayerTuningConfig(top_k=1), r"^base_model\.(encoder|decoder)\.block\.1\."),
    ],
)
def test_layer_tuning_unfreezes_the_top_blocks(model_name, config, expected):
    model = get_peft_model(TINY_MODELS[model_name].build(), config)
    names = _trainable(model)
    assert names and all(re.search(expected, n) for n in names), names[:3]
    if model_name == "t5":
        assert any(".encoder." in n for n in names) and any(".decoder." in n for n in names)


def test_layer_tuning_errors():
    with pytest.raises(ConfigError, match=r"`top_k`=3 but 'model.layers' has only 2 blocks"):
        get_peft_model(TINY_MODELS["llama"].build(), LayerTuningConfig(top_k=3))
    with pytest.raises(
        ConfigError, match="no list of repeated blocks found in MLP; name it with `block_lists`"
    ):
        get_peft_model(TINY_MODELS["mlp"].build(), LayerTuningConfig())
    with pytest.raises(ConfigError, match="no norm follows the blocks"):
        get_peft_model(TINY_MODELS["bert"].build(), LayerTuningConfig(include_final_norm=True))


# --- full fine-tuning --------------------------------------------------------------------------------------
def test_full_fine_tuning_trains_and_stores_the_whole_model():
    tiny = TINY_MODELS["gpt2"]
    model = get_peft_model(tiny.build(), FullFineTuningConfig())
    count = model.trainable_parameters()
    assert count.trainable == count.base == count.adapter == sum(p.numel() for p in tiny.build().parameters())


# --- bottleneck adapters -----------------------------------------------------------------------------------
def test_serial_adapter_is_h_plus_scaled_up_f_down_h():
    base = nn.Linear(8, 6)
    layer = BottleneckLayer(base)
    layer.add_adapter(
        "a", BottleneckConfig(bottleneck_size=3, non_linearity="tanh", scaling=0.5, init="random")
    )
    layer.active_adapter = "a"
    x = torch.randn(2, 4, 8)
    adapter = layer.adapters["a"]
    h = base(x)
    expected = h + 0.5 * (
        torch.tanh(h @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T + adapter.up.bias
    )
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_parallel_adapter_reads_the_sub_layer_input():
    tiny = TINY_MODELS["llama"]
    model = get_peft_model(
        tiny.build(), BottleneckConfig(placement="parallel", bottleneck_size=4, scaling=4.0, init="random")
    )
    mlp = model.base_model.model.layers[0].mlp
    assert isinstance(mlp.down_proj, BottleneckLayer), "added at the feed-forward output layer"
    x = torch.randn(3, 5, 32)
    adapter = mlp.down_proj.adapters["default"]
    base = mlp.down_proj.base_layer
    expected = base(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)) + 4.0 * adapter.up(
        torch.relu(adapter.down(x))
    )
    torch.testing.assert_close(mlp(x), expected, rtol=1e-6, atol=1e-6)


def test_parallel_adapter_on_bert_reads_the_feed_forward_input_through_a_hook():
    tiny = TINY_MODELS["bert"]
    model = get_peft_model(
        tiny.build(), BottleneckConfig(placement="parallel", bottleneck_size=4, init="random")
    )
    layer = model.base_model.bert.encoder.layer[0]
    attention_output = torch.randn(3, 5, 32)
    adapter = layer.output.dense.adapters["default"]
    intermediate = layer.intermediate(attention_output)
    expected = layer.output.LayerNorm(
        layer.output.dense.base_layer(intermediate)
        + adapter.up(torch.relu(adapter.down(attention_output)))
        + attention_output
    )
    torch.testing.assert_close(layer.output(intermediate, attention_output), expected, rtol=1e-5, atol=1e-6)
    hooked = layer.intermediate.dense._forward_pre_hooks
    assert hooked and model.unload() is not None and not hooked, "unload removes the hook"


@pytest.mark.parametrize(("placement", "per_layer"), [("houlsby", 2), ("pfeiffer", 1), ("parallel", 1)])
def test_placements_and_sizes(placement, per_layer):
    model = get_peft_model(
        TINY_MODELS["gpt2"].build(), BottleneckConfig(placement=placement, reduction_factor=8)
    )
    layers = [m for m in model.base_model.modules() if isinstance(m, BottleneckLayer)]
    assert len(layers) == 2 * per_layer
    assert all(m.adapters["default"].down.out_features == 32 // 8 for m in layers)


def test_bottleneck_config_errors():
    with pytest.raises(
        ConfigError, match=r"`placement` must be one of \['houlsby', 'pfeiffer', 'parallel'\]"
    ):
        BottleneckConfig(placement="serial")
    with pytest.raises(ConfigError, match=r"`non_linearity` must be one of"):
        BottleneckConfig(non_linearity="swish")
    with pytest.raises(ConfigError, match="one of `bottleneck_size` and `reduction_factor`"):
        BottleneckConfig(reduction_factor=None)


# --- AdapterFusion -----------------------------------------------------------------------------------------
def _fused(tiny):
    model = get_peft_model(tiny.build(), BottleneckConfig(bottleneck_size=4, init="random"), adapter_name="a")
    model.add_adapter("b", BottleneckConfig(bottleneck_size=8, init="random"))
    model.add_adapter("fusion", FusionConfig(adapters=["a", "b"]))
    model.set_adapter("fusion")
    return model


def test_fresh_fusion_averages_the_adapters_outputs():
    layer = BottleneckLayer(nn.Linear(6, 6))
    for name in ("a", "b"):
        layer.add_adapter(name, BottleneckConfig(bottleneck_size=2, init="random"))
    from peftkit.methods.fusion import Fusion

    layer.adapters["f"] = Fusion(6, FusionConfig(adapters=["a", "b"]), layer.factory(None))
    x = torch.randn(4, 6)
    outputs = {}
    for name in ("a", "b", "f"):
        layer.active_adapter = name
        outputs[name] = layer(x)
    torch.testing.assert_close(outputs["f"], (outputs["a"] + outputs["b"]) / 2, rtol=1e-6, atol=1e-6)


def test_fusion_trains_only_its_own_parameters_and_saves_on_its_own(tmp_path):
    tiny = TINY_MODELS["bert"]
    model = _fused(tiny)
    assert _trainable(model) and all(".adapters.fusion." in n for n in _trainable(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        optimizer.zero_grad()
        model(**tiny.batch(seed=step)).logits.pow(2).mean().backward()
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(_trainable(model)), "every fusion tensor trains (W_Q and W_K too), nothing else"

    expected = run(model, tiny, tiny.batch())
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "fusion"]
    loaded = PeftModel.from_pretrained(tiny.build(), tmp_path / "a", adapter_name="a")
    with pytest.raises(AdapterError, match=r"builds on \['b'\]"):
        loaded.load_adapter(tmp_path / "fusion", "fusion")
    loaded.load_adapter(tmp_path / "b", "b")
    loaded.load_adapter(tmp_path / "fusion", "fusion")
    loaded.set_adapter("fusion")
    assert torch.equal(run(loaded, tiny, tiny.batch()), expected)
    with pytest.raises(AdapterError, match=r"adapters \['fusion'\] build on 'a'"):
        loaded.delete_adapter("a")


def test_fusion_joins_a_mixed_batch_like_any_adapter():
    """A fusion is one more entry of the layer's adapters: a batch mixing it with one of its members and the
    base model gives each row what that adapter alone gives."""
    tiny = TINY_MODELS["bert"]
    model = _fused(tiny)
    with torch.no_grad():  # a fusion that no longer averages: W_Q, W_K moved off zero
        for name, parameter in model.named_parameters():
            if ".adapters.fusion." in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    batch = tiny.batch()
    rows = ["fusion", BASE_ROW, "a"]
    mixed = run(model, tiny, batch, adapter_names=rows)
    singles = {"fusion": run(model, tiny, batch)}
    model.set_adapter("a")
    singles["a"] = run(model, tiny, batch)
    with model.disable_adapter():
        singles[BASE_ROW] = run(model, tiny, batch)
    assert not torch.allclose(singles["fusion"], singles["a"])
    for row, name in enumerate(rows):
        torch.testing.assert_close(mixed[row], singles[name][row], rtol=1e-5, atol=1e-6)


def test_fusion_needs_serial_bottleneck_adapters():
    model = get_peft_model(
        TINY_MODELS["llama"].build(), BottleneckConfig(bottleneck_size=4), adapter_name="a"
    )
    with pytest.raises(AdapterError, match=r"builds on \['b'\]"):
        model.add_adapter("f", FusionConfig(adapters=["a", "b"]))
    with pytest.raises(ConfigError, match="at least two distinct"):
        FusionConfig(adapters=["a"])


# --- IA3 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_rescales_output_or_feedforward_input(transposed, feedforward):
    base = Conv1D(6, 8) if transposed else nn.Linear(8, 6)
    with torch.no_grad():
        base.bias.normal_()
    layer = IA3Linear(base)
    layer.add_adapter("a", IA3Config(target_modules=["x"], init="random"), feedforward=feedforward)
    layer.active_adapter = "a"
    x = torch.randn(3, 8)
    vector = layer.ia3_l["a"].flatten()
    assert layer.ia3_l["a"].shape == ((1, 8) if feedforward else (6, 1))
    expected = base(x * vector) if feedforward else base(x) * vector
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    layer.merge("a")
    torch.testing.assert_close(base(x), expected, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    layer.active_adapter = None
    torch.testing.assert_close(layer(x), (base(x)), rtol=0, atol=0)


def test_ia3_defaults_follow_the_paper():
    model = get_peft_model(TINY_MODELS["bert"].build(), IA3Config())
    layers = {p: m for p, m in model.base_model.named_modules() if isinstance(m, IA3Linear)}
    assert sorted({p.split("layer.0.")[-1] for p in layers if ".layer.0." in p}) == [
        "attention.self.key",
        "attention.self.value",
        "output.dense",
    ]
    assert [p for p, m in layers.items() if m.feedforward["default"]] == [
        "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.1.output.dense",
    ]
