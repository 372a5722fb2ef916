"""Prefix tuning: the contract on every tiny transformer (prefix trained directly or through the MLP, folded
on save), a forward pass equal to the base model reading a cache filled by hand, generate() equal to manual
greedy decoding, and prefix and prompt adapters side by side."""

import struct

import pytest
import torch
from safetensors import safe_open
from transformers.cache_utils import DynamicCache

from peftkit import (
    AdapterError,
    ConfigError,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)
from peftkit.checkpoint import WEIGHTS_NAME
from tests.tiny_models import TINY_MODELS, left_padded, manual_greedy, run, train_steps

N = 3


def _store(model):
    return model.base_model.get_input_embeddings()


@pytest.mark.parametrize("projection", [None, 8])
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "t5"])
def test_contract(name, projection, tmp_path):
    tiny = TINY_MODELS[name]
    batch = tiny.batch()
    reference = run(tiny.build(), tiny, batch)
    model = get_peft_model(tiny.build(), PrefixTuningConfig(num_virtual_tokens=N, projection_size=projection))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".encoders.default." in n for n in trainable), trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, tiny)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable

    adapted = run(model, tiny, batch)
    assert not torch.equal(adapted, reference)
    with model.disable_adapter():
        assert torch.equal(run(model, tiny, batch), reference), "disabled == base, exactly"

    model.save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as handle:
        stored = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    config = model.base_model.config
    heads = (
        getattr(config, "num_key_value_heads", None)
        or getattr(config, "num_heads", None)
        or config.num_attention_heads
    )
    expected = (2, 2, heads, N, 8)  # (layers, keys/values, kv heads, n, head_dim): the folded prefix only
    assert {k.rsplit(".", 1)[-1]: tuple(t.shape) for k, t in stored.items()} == (
        {"prefix": expected, "cross_prefix": expected, "encoder_prefix": expected}
        if name == "t5"
        else {"prompt_embeddings": (N, 2 * 2 * heads * 8)}  # HF PEFT's layout: per token, every layer's k, v
    )
    count = model.trainable_parameters()
    assert count.adapter == sum(t.numel() for t in stored.values())
    assert (count.trainable == count.adapter) == (projection is None)
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert count.adapter_bytes == path.stat().st_size - 8 - header
    loaded = PeftModel.from_pretrained(tiny.build(), tmp_path, is_trainable=True)
    assert torch.equal(run(loaded, tiny, batch), adapted), "save/load is exact (reparameterized: folded)"
    assert loaded.trainable_parameters().trainable == count.adapter, (
        "a loaded adapter trains the prefix alone"
    )
    with pytest.raises(AdapterError, match="cannot be merged"):
        model.merge_adapter()


def _by_hand_cache(prefix, rows):
    cache = DynamicCache()
    for index, (keys, values) in enumerate(prefix):
        cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), index)
    return cache


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_forward_equals_the_base_model_reading_the_prefix_from_a_cache(name):
    tiny = TINY_MODELS[name]
    batch = left_padded(tiny)
    model = get_peft_model(tiny.build(), PrefixTuningConfig(num_virtual_tokens=N))
    prefix = _store(model).encoders["default"].prefixes["prefix"].detach()
    mask = torch.cat([torch.ones(3, N, dtype=torch.long), batch["attention_mask"]], dim=1)
    with torch.no_grad():
        ours = model(**batch).logits
        theirs = tiny.build()(
            input_ids=batch["input_ids"], attention_mask=mask, past_key_values=_by_hand_cache(prefix, 3)
        ).logits
    assert torch.equal(ours, theirs)


def test_every_layers_prefix_takes_part():
    tiny = TINY_MODELS["gpt2"]
    batch = tiny.batch()
    model = get_peft_model(tiny.build(), PrefixTuningConfig(num_virtual_tokens=N))
    prefix = _store(model).encoders["default"].prefixes["prefix"]
    base = run(model, tiny, batch)
    for layer in range(2):
        for kv in range(2):
            with torch.no_grad():
                prefix[layer, kv] += 1.0
            assert not torch.equal(run(model, tiny, batch), base), (layer, kv)
            with torch.no_grad():
                prefix[layer, kv] -= 1.0


@pytest.mark.parametrize(("name", "projection"), [("gpt2", None), ("llama", None), ("llama", 8)])
def test_decoder_generate_equals_manual_greedy_decoding(name, projection):
    tiny = TINY_MODELS[name]
    batch = left_padded(tiny)
    model = get_peft_model(tiny.build(), PrefixTuningConfig(num_virtual_tokens=N, projection_size=projection))
    generated = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, manual_greedy(model, **batch, steps=6))
    with model.disable_adapter():
        assert not torch.equal(
            model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0), generated
        )
    torch.manual_seed(0)
    sampled = model.generate(
        **batch, max_new_tokens=4, do_sample=True, num_return_sequences=2, pad_token_id=0
    )
    assert sampled.shape == (6, 10)


def test_t5_generate_equals_manual_greedy_decoding():
    tiny = TINY_MODELS["t5"]
    ids = tiny.batch()["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    model = get_peft_model(tiny.build(), PrefixTuningConfig(num_virtual_tokens=N))
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    manual = torch.zeros(3, 1, dtype=torch.long)  # decoder_start_token_id
    for _ in range(5):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=manual).logits[:, -1]
        manual = torch.cat([manual, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, manual)
    with model.disable_adapter():
        assert not torch.equal(
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5), generated
        )


def test_t5_cross_attention_prefix_takes_part():
    tiny = TINY_MODELS["t5"]
    batch = tiny.batch()
    model = get_peft_model(tiny.build(), PrefixTuningConfig(num_virtual_tokens=N))
    base = run(model, tiny, batch)
    with torch.no_grad():
        _store(model).encoders["default"].prefixes["cross_prefix"][1] += 1.0
    assert not torch.equal(run(model, tiny, batch), base)


@pytest.mark.parametrize("layer", [0, 1])
def test_t5_encoder_self_attention_prefix_takes_part_in_every_layer(layer):
    tiny = TINY_MODELS["t5"]
    model = get_peft_model(tiny.build(), PrefixTuningConfig(num_virtual_tokens=N))
    base = run(model, tiny, tiny.batch())
    with torch.no_grad():
        _store(model).encoders["default"].prefixes["encoder_prefix"][layer, 1] += 1.0  # that layer's values
    assert not torch.equal(run(model, tiny, tiny.batch()), base)


def test_t5_encoder_prefix_respects_the_padding_mask():
    """A right-padded row gives the same logits as the same row alone: the mask extended over the encoder
    prefix still hides the padding, and the prefix is attended."""
    tiny = TINY_MODELS["t5"]
    model = get_peft_model(tiny.build(), PrefixTuningConfig(num_virtual_tokens=N))
    batch = tiny.batch()
    mask = torch.ones_like(batch["input_ids"])
    mask[0, -2:] = 0
    padded = run(model, tiny, {**batch, "attention_mask": mask})
    alone = run(
        model,
        tiny,
        {"input_ids": batch["input_ids"][:1, :-2], "decoder_input_ids": batch["decoder_input_ids"][:1]},
    )
    torch.testing.assert_close(padded[:1], alone, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_is_refused_clearly():
    tiny = TINY_MODELS["llama"]
    model = get_peft_model(tiny.build(), PrefixTuningConfig(num_virtual_tokens=N))
    model.base_model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(ConfigError, match="cannot train with gradient checkpointing"):
        model(**tiny.batch())
    model.eval()
    model(**tiny.batch())  # inference is fine: checkpointing only acts in training


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_virtual_tokens": 0}, "`num_virtual_tokens` must be a positive integer, got 0"),
        ({"projection_size": -1}, "`projection_size` must be a positive integer, got -1"),
    ],
)
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        PrefixTuningConfig(**fields)


def test_prefix_and_prompt_adapters_switch_on_one_model():
    tiny = TINY_MODELS["llama"]
    batch = tiny.batch()
    model = get_peft_model(tiny.build(), PrefixTuningConfig(num_virtual_tokens=N), adapter_name="prefix")
    model.add_adapter("prompt", PromptTuningConfig(num_virtual_tokens=2))
    model.add_adapter("prefix2", PrefixTuningConfig(num_virtual_tokens=5, projection_size=4))
    outputs = {}
    for name in ("prefix", "prompt", "prefix2"):
        model.set_adapter(name)
        outputs[name] = run(model, tiny, batch)
    for name in reversed(outputs):
        model.set_adapter(name)
        assert torch.equal(run(model, tiny, batch), outputs[name]), name
    for name in list(outputs):
        model.delete_adapter(name)
    assert type(model.base_model.get_input_embeddings()) is torch.nn.Embedding
    assert torch.equal(run(model, tiny, batch), run(tiny.build(), tiny, batch))
