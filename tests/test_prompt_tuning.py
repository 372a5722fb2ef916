"""Prompt tuning and prompt ensembles: the method's contract on every tiny transformer, forward passes equal to
an independent computation with ``inputs_embeds``, ``generate()`` equal to manual decoding, ensembles."""

import struct

import pytest
import torch
from safetensors import safe_open
from transformers import BertConfig, BertForTokenClassification

from peftkit import AdapterError, ConfigError, PeftModel, PromptTuningConfig, get_peft_model
from peftkit.checkpoint import WEIGHTS_NAME
from tests.tiny_models import TINY_MODELS, left_padded, manual_greedy, run, train_steps

N = 3
TRANSFORMERS = ["bert", "gpt2", "llama", "t5"]


def _config(**fields):
    return PromptTuningConfig(num_virtual_tokens=N, init="vocab", **fields)


def _by_hand(base, prompt, input_ids, attention_mask, **kwargs):
    """The prompt put in front by hand: the base model on [P ; E(x)] with the mask and positions extended."""
    embeds = base.get_input_embeddings()(input_ids)
    batch = input_ids.shape[0]
    full = torch.cat([prompt.expand(batch, -1, -1), embeds], dim=1)
    mask = torch.cat([torch.ones(batch, prompt.shape[0], dtype=attention_mask.dtype), attention_mask], dim=1)
    return base(inputs_embeds=full, attention_mask=mask, **kwargs)


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_contract(name, tmp_path):
    tiny = TINY_MODELS[name]
    batch = tiny.batch()
    reference = run(tiny.build(), tiny, batch)
    model = get_peft_model(tiny.build(), _config())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("prompt_embeddings.default") for n in trainable), trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, tiny)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(trainable)

    adapted = run(model, tiny, batch)
    with model.disable_adapter():
        assert torch.equal(run(model, tiny, batch), reference), "disabled == base, exactly"

    model.save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as handle:
        stored = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    assert {k: tuple(t.shape) for k, t in stored.items()} == {
        "prompt_embeddings": (N, 32)
    }  # HF PEFT's layout
    count = model.trainable_parameters()
    assert count.adapter == count.trainable == N * 32
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert count.adapter_bytes == path.stat().st_size - 8 - header
    loaded = PeftModel.from_pretrained(tiny.build(), tmp_path)
    assert torch.equal(run(loaded, tiny, batch), adapted), "save/load is exact"
    with pytest.raises(AdapterError, match="cannot be merged"):
        model.merge_adapter()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_decoder_forward_equals_inputs_embeds_by_hand_with_left_padding_and_labels(name):
    tiny = TINY_MODELS[name]
    batch = left_padded(tiny)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model = get_peft_model(tiny.build(), _config())
    prompt = model.base_model.get_input_embeddings().prompt_embeddings["default"][0].detach()
    with torch.no_grad():
        ours = model(**batch, labels=labels)
        ignored = torch.full((labels.shape[0], N), -100)
        theirs = _by_hand(tiny.build(), prompt, **batch, labels=torch.cat([ignored, labels], dim=1))
    assert ours.logits.shape == (3, N + 6, 64)
    assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.loss, theirs.loss)
    # the loss counts every real token and no virtual one: the last virtual position predicts the first
    # real token, each real position the next
    predicting = ours.logits[:, N - 1 : -1]
    by_hand = torch.nn.functional.cross_entropy(predicting.reshape(-1, 64), labels.reshape(-1))
    torch.testing.assert_close(ours.loss, by_hand)


def test_position_ids_shift_past_the_virtual_tokens():
    tiny = TINY_MODELS["llama"]
    batch = left_padded(tiny)
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    model = get_peft_model(tiny.build(), _config())
    prompt = model.base_model.get_input_embeddings().prompt_embeddings["default"][0].detach()
    with torch.no_grad():
        ours = model(**batch, position_ids=positions).logits
        extended = torch.cat([torch.arange(N).expand(3, N), positions + N], dim=1)
        theirs = _by_hand(tiny.build(), prompt, **batch, position_ids=extended).logits
    assert torch.equal(ours, theirs)


def test_token_classification_labels_skip_the_virtual_tokens():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, num_labels=5,
    )  # fmt: skip
    model = get_peft_model(BertForTokenClassification(config).eval(), _config(modules_to_save=["classifier"]))
    batch = TINY_MODELS["bert"].batch()
    labels = torch.randint(0, 5, batch["input_ids"].shape).masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        output = model(**batch, labels=labels)
    real = output.logits[:, N:]  # (B, L, labels): the virtual positions come first
    torch.testing.assert_close(
        output.loss, torch.nn.functional.cross_entropy(real.reshape(-1, 5), labels.reshape(-1))
    )


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_decoder_generate_equals_manual_greedy_decoding(name):
    tiny = TINY_MODELS[name]
    batch = left_padded(tiny)
    model = get_peft_model(
        tiny.build(), PromptTuningConfig(num_virtual_tokens=N)
    )  # random init: strong effect
    generated = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, manual_greedy(model, **batch, steps=6))
    with model.disable_adapter():
        assert not torch.equal(
            model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0), generated
        )


def test_decoder_manual_decoding_with_a_cache_matches_generate():
    tiny = TINY_MODELS["llama"]
    batch = left_padded(tiny)
    model = get_peft_model(tiny.build(), PromptTuningConfig(num_virtual_tokens=N))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
        )
        for _ in range(4):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
            position = mask.sum(-1, keepdim=True) - 1
            out = model(
                input_ids=token,
                attention_mask=mask,
                position_ids=position,
                past_key_values=out.past_key_values,
            )
    generated = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, ids)


def test_sampling_with_the_cache_and_several_sequences_per_input():
    tiny = TINY_MODELS["gpt2"]
    batch = left_padded(tiny)
    model = get_peft_model(tiny.build(), PromptTuningConfig(num_virtual_tokens=N))
    settings = {"max_new_tokens": 5, "do_sample": True, "top_k": 0, "top_p": 1.0, "pad_token_id": 0}
    torch.manual_seed(3)
    sampled = model.generate(**batch, num_return_sequences=2, **settings)
    assert sampled.shape == (6, 11)
    torch.manual_seed(3)
    assert torch.equal(model.generate(**batch, num_return_sequences=2, **settings), sampled)
    # the cached prompt is the same as recomputing everything: sample by hand from full forward passes
    torch.manual_seed(3)
    one = model.generate(**batch, **settings)
    torch.manual_seed(3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for _ in range(5):
        with torch.no_grad():
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
            ).logits
        token = torch.multinomial(logits[:, -1].softmax(-1), 1)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    assert torch.equal(one, ids)


def test_t5_prompt_extends_the_encoder_and_generate_equals_manual_greedy():
    tiny = TINY_MODELS["t5"]
    ids = tiny.batch()["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    model = get_peft_model(tiny.build(), PromptTuningConfig(num_virtual_tokens=N))
    prompt = model.base_model.get_input_embeddings().prompt_embeddings["default"][0].detach()
    decoder = tiny.batch()["decoder_input_ids"]
    labels = decoder.roll(-1, 1)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder, labels=labels)
        theirs = _by_hand(tiny.build(), prompt, ids, mask, decoder_input_ids=decoder, labels=labels)
    assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.loss, theirs.loss)

    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    manual = torch.zeros(3, 1, dtype=torch.long)  # decoder_start_token_id
    for _ in range(5):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=manual).logits[:, -1]
        manual = torch.cat([manual, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, manual)


def test_init_from_text_uses_the_texts_embeddings_cycled():
    class Tokenizer:
        def __call__(self, text, add_special_tokens):
            assert not add_special_tokens
            return {"input_ids": [5, 9]}

    config = PromptTuningConfig.from_text(Tokenizer(), "Classify:", num_virtual_tokens=5)
    assert config.init_token_ids == (5, 9) and config.init_text == "Classify:"
    assert PromptTuningConfig.from_json(config.to_json()) == config
    model = get_peft_model(TINY_MODELS["llama"].build(), config)
    table = model.base_model.get_input_embeddings().weight
    prompt = model.base_model.get_input_embeddings().prompt_embeddings["default"]
    assert torch.equal(prompt[0], table[[5, 9, 5, 9, 5]])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_virtual_tokens": 0}, "`num_virtual_tokens` must be a positive integer, got 0"),
        ({"init": "zeros"}, r"`init` must be one of \['random', 'vocab', 'text'\], got 'zeros'"),
        ({"init": "text"}, "`init_token_ids` goes with init='text'"),
        ({"init_token_ids": [1]}, "`init_token_ids` goes with init='text'"),
        ({"init": "text", "init_token_ids": [-1]}, "`init_token_ids` must be a non-empty list of token ids"),
        ({"init": "text", "init_token_ids": [1], "num_prompts": 2}, "would start equal"),
        ({"num_prompts": 0}, "`num_prompts` must be a positive integer, got 0"),
    ],
)
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        PromptTuningConfig(**fields)


def test_init_ids_outside_the_vocabulary_are_refused_and_the_model_is_untouched():
    base = TINY_MODELS["gpt2"].build()
    with pytest.raises(ConfigError, match=r"`init_token_ids` \[64\] are outside the vocabulary \(size 64\)"):
        get_peft_model(base, PromptTuningConfig(init="text", init_token_ids=[1, 64]))
    assert type(base.get_input_embeddings()) is torch.nn.Embedding


def test_several_prompts_switch_and_deleting_the_last_restores_the_embedding():
    tiny = TINY_MODELS["llama"]
    batch = tiny.batch()
    model = get_peft_model(tiny.build(), _config())
    model.add_adapter("long", PromptTuningConfig(num_virtual_tokens=5, init="random"))
    first = run(model, tiny, batch)
    model.set_adapter("long")
    second = run(model, tiny, batch)
    assert second.shape == (3, 5 + 6, 64)
    model.set_adapter("default")
    assert torch.equal(run(model, tiny, batch), first)
    model.delete_adapter("default")
    model.delete_adapter("long")
    assert type(model.base_model.get_input_embeddings()) is torch.nn.Embedding
    assert torch.equal(run(model, tiny, batch), run(tiny.build(), tiny, batch))


def test_a_mixed_batch_is_refused():
    tiny = TINY_MODELS["llama"]
    model = get_peft_model(tiny.build(), _config())
    with pytest.raises(ConfigError, match="cannot join a mixed batch"):
        model(**tiny.batch(), adapter_names=["default", "__base__", "default"])


def test_gradient_checkpointing_gives_the_same_gradient():
    tiny = TINY_MODELS["llama"]
    ids = tiny.batch()["input_ids"]
    grads = []
    for checkpointing in (False, True):
        model = get_peft_model(tiny.build(), _config())
        if checkpointing:
            model.base_model.gradient_checkpointing_enable()
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.base_model.get_input_embeddings().prompt_embeddings["default"].grad)
    assert grads[1] is not None and grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


# --- prompt ensembles ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_ensemble_output_is_the_mean_of_the_single_prompt_outputs_in_one_forward(name):
    tiny = TINY_MODELS[name]
    batch = tiny.batch()
    k = 3
    model = get_peft_model(tiny.build(), _config(num_prompts=k))
    prompts = model.base_model.get_input_embeddings().prompt_embeddings["default"].detach()
    calls = []
    first_block = (
        model.base_model.base_model.encoder.layer[0] if name == "bert" else model.base_model.model.layers[0]
    )
    first_block.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0] if a else None))
    with torch.no_grad():
        ensemble = model(**batch).logits
    assert len(calls) == 1 and calls[0] in (k * 3, None), "one forward over a k-times batch"
    with torch.no_grad():
        singles = [_by_hand(tiny.build(), prompts[i], **batch).logits for i in range(k)]
    assert ensemble.shape == singles[0].shape
    torch.testing.assert_close(ensemble, torch.stack(singles).mean(0), rtol=1e-5, atol=1e-6)


def test_ensemble_training_loss_is_the_mean_of_the_prompt_losses_and_each_prompt_trains():
    tiny = TINY_MODELS["llama"]
    ids = tiny.batch()["input_ids"]
    model = get_peft_model(tiny.build(), _config(num_prompts=2))
    prompts = model.base_model.get_input_embeddings().prompt_embeddings["default"]
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    ignored = torch.full((3, N), -100)
    losses = [
        _by_hand(
            tiny.build().train(),
            prompts[i].detach(),
            ids,
            torch.ones_like(ids),
            labels=torch.cat([ignored, ids], 1),
        ).loss
        for i in range(2)
    ]
    torch.testing.assert_close(loss, torch.stack(losses).mean())
    loss.backward()
    assert all(prompts.grad[i].abs().sum() > 0 for i in range(2))


def test_ensemble_generate_is_refused_clearly():
    tiny = TINY_MODELS["gpt2"]
    model = get_peft_model(tiny.build(), _config(num_prompts=2))
    with pytest.raises(ConfigError, match="ensemble of 2 prompts"):
        model.generate(input_ids=tiny.batch()["input_ids"], max_new_tokens=2)
