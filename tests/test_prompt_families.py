"""Every prompt method on every family of ``tests.tiny_models.FAMILIES``: the adapter moves the output, every
trained tensor gets a gradient, disabling it gives the base model exactly, save/load is exact; decoders: a
left-padded row equals the same row alone and generate() equals manual greedy decoding; and prefixes equal,
to float precision, the keys and values of real tokens placed before the input (an independent computation
by the unmodified model)."""

import pytest
import torch
import transformers as tf
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from peftkit import (
    ConfigError,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    PTuningV2Config,
    get_peft_model,
)
from tests.tiny_models import FAMILIES, manual_greedy

N = 3
METHODS = {
    "prefix_tuning": lambda: PrefixTuningConfig(num_virtual_tokens=N),
    "prefix_tuning_mlp": lambda: PrefixTuningConfig(num_virtual_tokens=N, projection_size=8),
    "p_tuning_v2": lambda: PTuningV2Config(num_virtual_tokens=N),
    "prompt_tuning": lambda: PromptTuningConfig(num_virtual_tokens=N),
    "prompt_ensemble": lambda: PromptTuningConfig(num_virtual_tokens=N, num_prompts=2, init="vocab"),
    "p_tuning": lambda: PTuningConfig(num_virtual_tokens=N, encoder="mlp"),
}
PREFIXES = ("prefix_tuning", "prefix_tuning_mlp", "p_tuning_v2")
# By default each family runs plain prefix tuning (every route); the other methods share its code or enter
# through the input embedding, and run with the slow tests (the architecture matrix covers them by default).
ALL_METHODS = [m if m == "prefix_tuning" else pytest.param(m, marks=pytest.mark.slow) for m in METHODS]
DECODERS = [name for name, family in FAMILIES.items() if family.kind == "decoder"]
SEQ2SEQ = [name for name, family in FAMILIES.items() if family.kind == "seq2seq"]


def batch(family, padded=True):
    """Three rows of six tokens (ids 3.. avoid the special ones); with ``padded``, row 0's last two are
    padding (right padding: what encoders and encoder-decoders get)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (3, 6), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, -2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if family.kind == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(3, 64, (3, 4), generator=generator)
    return inputs


def _real_tokens(family, method, logits):
    """The real tokens' logits: per-position outputs of input-side prompt methods (decoders, token
    classifiers) carry the n virtual positions first."""
    per_position = family.kind == "decoder" or family.name.endswith("-token")
    if per_position and method not in PREFIXES:
        return logits[:, N:]
    return logits


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_adapter_moves_the_output_and_trains_every_tensor(name, method, tmp_path):
    family = FAMILIES[name]
    inputs = batch(family)
    with torch.no_grad():
        reference = family.build()(**inputs).logits
    model = get_peft_model(family.build(), METHODS[method]())
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    torch.manual_seed(0)
    out = model(**inputs).logits
    out.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable), "every tensor learns"
    model.eval()
    with torch.no_grad():
        adapted = _real_tokens(family, method, model(**inputs).logits)
        assert adapted.shape == reference.shape
        assert not torch.allclose(adapted, reference, atol=1e-4), "the adapter moves the output"
        with model.disable_adapter():
            assert torch.equal(model(**inputs).logits, reference), "disabled == base, exactly"
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(family.build(), tmp_path)
    with torch.no_grad():
        assert torch.equal(_real_tokens(family, method, loaded(**inputs).logits), adapted)


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("name", DECODERS)
def test_decoder_left_padding_and_generate(name, method):
    if method == "prompt_ensemble":
        pytest.skip("an ensemble is refused by generate(); its forward is covered above")
    family = FAMILIES[name]
    model = get_peft_model(family.build(), METHODS[method]())
    inputs = batch(family, padded=False)
    mask = torch.ones_like(inputs["input_ids"])
    mask[0, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() derives them from the mask
    with torch.no_grad():
        padded = model(input_ids=inputs["input_ids"], attention_mask=mask, position_ids=positions).logits
        alone = model(input_ids=inputs["input_ids"][:1, 2:]).logits
    real = inputs["input_ids"].shape[1] - 2  # the row's tokens (prompt methods' outputs have N more in front)
    assert torch.allclose(padded[:1, -real:], alone[:, -real:], atol=1e-5), "left-padded row == row alone"
    generated = model.generate(
        input_ids=inputs["input_ids"], attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0
    )
    # the last logits are the last real token's for every method (virtual tokens come first)
    assert torch.equal(generated, manual_greedy(model, inputs["input_ids"], mask, steps=4))


@pytest.mark.parametrize("method", [m for m in ALL_METHODS if getattr(m, "values", [m])[0] in PREFIXES])
@pytest.mark.parametrize("name", SEQ2SEQ)
def test_encoder_decoder_generate_equals_manual_greedy(name, method):
    family = FAMILIES[name]
    model = get_peft_model(family.build(), METHODS[method]())
    model.base_model.generation_config.forced_eos_token_id = None  # BART's: generate() is then greedy search
    inputs = batch(family)
    generated = model.generate(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        max_new_tokens=4,
        min_new_tokens=4,
        eos_token_id=model.base_model.config.eos_token_id,
        do_sample=False,
    )
    start = model.base_model.config.decoder_start_token_id
    decoded = torch.full((3, 1), start)
    for _ in range(generated.shape[1] - 1):
        with torch.no_grad():
            logits = model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                decoder_input_ids=decoded,
            ).logits[:, -1]
        logits[:, model.base_model.config.eos_token_id] = -torch.inf  # min_new_tokens: no end before 4
        decoded = torch.cat([decoded, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, decoded)
    with model.disable_adapter():
        plain = model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            max_new_tokens=4,
            min_new_tokens=4,
            eos_token_id=model.base_model.config.eos_token_id,
            do_sample=False,
        )
    assert not torch.equal(plain, generated)


# --- prefixes are keys and values of tokens before the input -------------------------------------------------
# Run the unmodified model on [a; y], where the n tokens ``a`` attend only to each other (so their keys and
# values do not depend on ``y``), and record each layer's keys and values at ``a``. A prefix holding exactly
# those must give ``y`` the hidden states it has in that run: the prefix is what ``n`` leading tokens would be.


def _leading_mask(mask, n):
    """(B, 1, n + L, n + L) bool: ``a`` (the first n) attends to ``a``; ``y`` to ``a`` and its unpadded self."""
    rows, length = mask.shape
    full = torch.zeros(rows, 1, n + length, n + length, dtype=torch.bool)
    full[:, :, :, :n] = True
    full[:, :, n:, n:] = mask.bool()[:, None, None, :]
    return full


def _record_interface(model, inputs):
    """Keys and values each attention call receives, (B, heads, positions, head_dim), in call order."""
    records = []

    def record(module, query, key, value, attention_mask, **kwargs):
        records.append(torch.stack([key, value], dim=1))  # (B, 2, heads, positions, head_dim)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("test_record", record)
    ALL_MASK_ATTENTION_FUNCTIONS.register("test_record", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.config._attn_implementation = "test_record"
    try:
        with torch.no_grad():
            hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
    finally:
        model.config._attn_implementation = "sdpa"
    return hidden, records


def _record_deberta(model, inputs):
    """DeBERTa's key and value projections of the hidden states, (B, 2, heads, positions, head_dim)."""
    records, handles = [], []
    for attention in model.modules():
        if hasattr(attention, "disentangled_attention_bias"):
            pair = {}

            def keep(role, pair=pair, heads=attention.num_attention_heads):
                def hook(module, args, output):
                    if output.shape[1] == inputs["input_ids"].shape[1]:  # not the relative embeddings
                        b, length, _ = output.shape
                        pair[role] = output.view(b, length, heads, -1).transpose(1, 2)
                        if len(pair) == 2:
                            records.append(torch.stack([pair.pop("key"), pair.pop("value")], dim=1))

                return hook

            handles += [attention.key_proj.register_forward_hook(keep("key"))]
            handles += [attention.value_proj.register_forward_hook(keep("value"))]
    padding = inputs["attention_mask"].any(dim=1).long()  # (B, positions): which tokens are real
    try:
        with torch.no_grad():  # DeBERTa's embeddings take a 2-D mask; its encoder the 3-D one
            embedded = model.deberta.embeddings(input_ids=inputs["input_ids"], mask=padding)
            hidden = model.deberta.encoder(embedded, inputs["attention_mask"]).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    return hidden, records


ENCODER_BUILDS = {
    "bert": FAMILIES["bert"].build,
    "distilbert": FAMILIES["distilbert"].build,
    "albert": FAMILIES["albert"].build,
    "deberta-v2": FAMILIES["deberta-v2"].build,
    # a window wider than the sequence: the run on [a; y] passes its own mask, which no window narrows
    "modernbert": lambda: _widened(FAMILIES["modernbert"].build()),
}


def _widened(model):
    config = model.config
    config.local_attention, config.sliding_window = 64, 32
    torch.manual_seed(0)
    return type(model)(config).eval()


@pytest.mark.parametrize("name", list(ENCODER_BUILDS))
def test_encoder_prefix_equals_keys_and_values_of_leading_tokens(name):
    build = ENCODER_BUILDS[name]
    family = FAMILIES[name]
    inputs = batch(family)
    rows, length = inputs["input_ids"].shape
    leading = torch.randint(3, 64, (1, N), generator=torch.Generator().manual_seed(5)).expand(rows, N)
    joined = {"input_ids": torch.cat([leading, inputs["input_ids"]], dim=1)}
    record = _record_deberta if name == "deberta-v2" else _record_interface
    if name == "deberta-v2":  # DeBERTa takes a 3-D (B, queries, keys) mask
        joined["attention_mask"] = _leading_mask(inputs["attention_mask"], N)[:, 0].long()
    else:
        joined["attention_mask"] = _leading_mask(inputs["attention_mask"], N)
    expected, records = record(build(), joined)
    prefix = torch.stack([r[0, :, :, :N] for r in records])  # (layers, 2, heads, n, head_dim)

    model = get_peft_model(build(), PrefixTuningConfig(num_virtual_tokens=N))
    with torch.no_grad():
        model.base_model.get_input_embeddings().encoders["default"].prefixes["prefix"].copy_(prefix)
        given = dict(inputs)
        if name != "bert":  # the prefix carries no position: the real tokens' positions are the user's
            given["position_ids"] = torch.arange(N, N + length).expand(rows, length)
        ours = model(**given, output_hidden_states=True).hidden_states[-1]
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(ours[real], expected[:, N:][real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_prefix_equals_keys_and_values_of_leading_tokens(name):
    family = FAMILIES[name]
    inputs = batch(family, padded=False)
    rows = inputs["input_ids"].shape[0]
    leading = torch.randint(3, 64, (1, N), generator=torch.Generator().manual_seed(5)).expand(rows, N)
    base = family.build()
    with torch.no_grad():
        cache = base(input_ids=leading[:1], use_cache=True).past_key_values
        expected = base(input_ids=torch.cat([leading, inputs["input_ids"]], dim=1)).logits[:, N:]
    prefix = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
    model = get_peft_model(family.build(), PrefixTuningConfig(num_virtual_tokens=N))
    with torch.no_grad():
        model.base_model.get_input_embeddings().encoders["default"].prefixes["prefix"].copy_(prefix)
        ours = model(input_ids=inputs["input_ids"]).logits
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


# --- the interface route: other attention functions, refusals, nothing left behind --------------------------


def test_interface_route_gives_eager_attention_the_same_prefix():
    family = FAMILIES["distilbert"]
    inputs = batch(family)
    outputs = []
    for implementation in ("sdpa", "eager"):
        base = family.build()
        base.set_attn_implementation(implementation)
        model = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=N))  # the same seeded prefix
        with torch.no_grad():
            outputs.append(model(**inputs).logits)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=1e-5)


def test_prefix_is_refused_at_apply_where_it_cannot_reach_attention():
    config = tf.MPNetConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    base = tf.MPNetForSequenceClassification(config).eval()
    before = [name for name, _ in base.named_modules()]
    with pytest.raises(ConfigError, match=r"MPNetForSequenceClassification.*Prompt tuning or P-tuning"):
        get_peft_model(base, PTuningV2Config(num_virtual_tokens=N))
    assert [name for name, _ in base.named_modules()] == before, "a refused config changes nothing"
    get_peft_model(base, PromptTuningConfig(num_virtual_tokens=N))  # what works instead


def test_interface_route_refuses_other_attention_functions():
    base = FAMILIES["modernbert"].build()
    base.config._attn_implementation = "flex_attention"
    with pytest.raises(ConfigError, match="attn_implementation='sdpa'"):
        get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=N))


@pytest.mark.parametrize("name", ["distilbert", "deberta-v2", "bart"])
def test_no_hook_or_attention_switch_outlives_the_pass_or_the_adapter(name):
    family = FAMILIES[name]
    inputs = batch(family)
    base = family.build()
    with torch.no_grad():
        reference = base(**inputs).logits

    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in base.modules())

    implementation = base.config._attn_implementation
    model = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=N))
    during = hooks()
    with torch.no_grad():
        model(**inputs)
    assert hooks() == during and base.config._attn_implementation == implementation
    with pytest.raises(IndexError):  # a pass that fails half-way closes its call all the same
        model(**{**inputs, "input_ids": inputs["input_ids"] + 1000})
    assert hooks() == during and base.config._attn_implementation == implementation
    unloaded = model.unload()
    assert hooks() == 0
    with torch.no_grad():
        assert torch.equal(unloaded(**inputs).logits, reference)
