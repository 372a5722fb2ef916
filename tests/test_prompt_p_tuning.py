"""P-tuning: the contract on every tiny transformer (encoder trained, its output alone saved and loaded exactly),
virtual tokens written exactly into the template's slots (compared with ``inputs_embeds`` built by hand, left
and right padding), generate() equal to manual greedy decoding, the encoder coupling the tokens."""

import struct

import pytest
import torch
from safetensors import safe_open

from peftkit import ConfigError, PeftModel, PTuningConfig, get_peft_model
from peftkit.checkpoint import WEIGHTS_NAME
from tests.tiny_models import TINY_MODELS, manual_greedy, run, train_steps

N = 3
SLOTS = 63  # the placeholder id of the tiny models' templates
TEMPLATE = "[P] [P] {sentence} [P] it was"


class WordTokenizer:
    """Words to ids 3..52 (never the placeholder), with a leading [1] as the special token (as LLaMA's)."""

    pad_token_id, eos_token_id = 0, 2

    def __init__(self, padding_side="right"):
        self.padding_side = padding_side

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + sum(map(ord, word)) % 50 for word in text.split()]
        return {"input_ids": [1, *ids] if add_special_tokens else ids}


SENTENCES = [{"sentence": "a fine film"}, {"sentence": "dull"}, {"sentence": "the plot was thin and slow"}]


def _template(**fields):
    return PTuningConfig(num_virtual_tokens=N, template=TEMPLATE, placeholder_token_id=SLOTS, **fields)


def _encoder(model):
    return model.base_model.get_input_embeddings().encoders["default"]


def _by_hand(base, prompt, input_ids, attention_mask, **kwargs):
    """The base model on its own embeddings with row b's j-th attended placeholder replaced by prompt[j]."""
    embeds = base.get_input_embeddings()(input_ids).clone()
    for row in range(input_ids.shape[0]):
        slots = [
            p for p in range(input_ids.shape[1]) if input_ids[row, p] == SLOTS and attention_mask[row, p]
        ]
        assert len(slots) == prompt.shape[0]
        for j, position in enumerate(slots):
            embeds[row, position] = prompt[j]
    return base(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)


@pytest.mark.parametrize(
    ("name", "encoder"), [("bert", "lstm"), ("gpt2", "mlp"), ("llama", "lstm"), ("t5", "lstm")]
)
def test_contract_without_template(name, encoder, tmp_path):
    tiny = TINY_MODELS[name]
    batch = tiny.batch()
    reference = run(tiny.build(), tiny, batch)
    model = get_peft_model(tiny.build(), PTuningConfig(num_virtual_tokens=N, encoder=encoder))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".head." in n for n in trainable) and all(".encoders.default." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, tiny)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable, "every encoder parameter trains, nothing else"

    adapted = run(model, tiny, batch)
    with model.disable_adapter():
        assert torch.equal(run(model, tiny, batch), reference)

    model.save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as handle:
        stored = {k.rsplit(".", 1)[-1]: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    assert list(stored) == ["prompt_embeddings"] and stored["prompt_embeddings"].shape == (N, 32)
    with torch.no_grad():
        assert torch.equal(stored["prompt_embeddings"], _encoder(model)()), "the encoder's output is saved"
    count = model.trainable_parameters()
    assert count.adapter == N * 32 < count.trainable
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert count.adapter_bytes == path.stat().st_size - 8 - header
    loaded = PeftModel.from_pretrained(tiny.build(), tmp_path, is_trainable=True)
    assert torch.equal(run(loaded, tiny, batch), adapted), "save/load is exact"
    assert _encoder(loaded).head is None, "the encoder is dropped once loaded"
    assert loaded.trainable_parameters().trainable == N * 32


def test_the_lstm_couples_the_virtual_tokens_and_the_mlp_does_not():
    for encoder, coupled in (("lstm", True), ("mlp", False)):
        model = get_peft_model(
            TINY_MODELS["llama"].build(), PTuningConfig(num_virtual_tokens=N, encoder=encoder)
        )
        prompt_encoder = _encoder(model)
        prompt_encoder().sum(dim=1)[0].backward()  # token 0's output ...
        grad = prompt_encoder.embeddings.grad  # ... against every input embedding
        assert grad[0].abs().sum() > 0
        assert (grad[1:].abs().sum() > 0) == coupled, encoder


def test_encode_puts_the_placeholder_in_the_slots_with_a_real_tokenizer():
    from tests.pipeline_fixtures import tokenizer

    vocab = tokenizer()
    unused = vocab.convert_tokens_to_ids("[unused0]")
    config = PTuningConfig(
        num_virtual_tokens=3, template="[P] [P] {sentence} [P] It was [MASK].", placeholder_token_id=unused
    )
    assert config.fields() == ["sentence"]
    encoded = config.encode(vocab, [{"sentence": "great movie"}, {"sentence": "bad"}])
    tokens = [vocab.convert_ids_to_tokens(row) for row in encoded["input_ids"].tolist()]
    assert tokens[0] == ["[CLS]", "[unused0]", "[unused0]", "great", "movie", "[unused0]", "it", "was",
                         "[MASK]", ".", "[SEP]"]  # fmt: skip
    assert tokens[1][-1] == "[PAD]" and encoded["attention_mask"][1].tolist() == [1] * 10 + [0]
    left = config.encode(vocab, [{"sentence": "great movie"}, {"sentence": "bad"}], padding_side="left")
    assert left["attention_mask"][1].tolist() == [0] + [1] * 10
    assert torch.equal(left["input_ids"][1, 1:], encoded["input_ids"][1, :-1])
    with pytest.raises(ConfigError, match="record 0 has no field 'sentence'"):
        config.encode(vocab, [{"text": "x"}])


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_virtual_tokens_land_exactly_in_the_slots(name, side):
    tiny = TINY_MODELS[name]
    config = _template()
    batch = config.encode(WordTokenizer(side), SENTENCES)
    if side == "left":  # padding with the placeholder id itself: masked positions are no slots
        batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, SLOTS)
    model = get_peft_model(tiny.build(), config)
    with torch.no_grad():
        prompt = _encoder(model)()
    extra = {}
    if name == "llama":  # per-token labels: the slots are ignored, as padding is
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        extra = {"labels": labels}
    with torch.no_grad():
        ours = model(**batch, **extra)
        slots_ignored = {"labels": labels.masked_fill(labels == SLOTS, -100)} if extra else {}
        theirs = _by_hand(tiny.build(), prompt, **batch, **slots_ignored)
    if name == "llama":  # the slots are real positions: nothing is added
        assert ours.logits.shape[:2] == batch["input_ids"].shape
    assert torch.equal(ours.logits, theirs.logits)
    if extra:
        assert torch.equal(ours.loss, theirs.loss)
    with model.disable_adapter(), torch.no_grad():  # the base model reads the placeholder's own embedding
        assert torch.equal(model(**batch).logits, tiny.build()(**batch).logits)


def test_template_adapter_round_trips_exactly_with_a_head(tmp_path):
    tiny = TINY_MODELS["bert"]
    config = _template(encoder="mlp", modules_to_save=["classifier"])
    batch = config.encode(WordTokenizer(), SENTENCES)
    model = get_peft_model(tiny.build(), config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch, labels=torch.tensor([0, 1, 2])).loss.backward()
        optimizer.step()
    model.eval()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(".head." in n for n in changed) and any("classifier" in n for n in changed)
    assert all(".encoders." in n or "classifier" in n for n in changed)
    adapted = run(model, tiny, batch)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny.build(), tmp_path)
    assert loaded.peft_config["default"] == config, "the template travels with the adapter"
    assert torch.equal(run(loaded, tiny, batch), adapted)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_decoder_generate_with_slots_equals_manual_greedy_decoding(name):
    tiny = TINY_MODELS[name]
    config = _template()
    batch = config.encode(WordTokenizer("left"), SENTENCES)
    model = get_peft_model(tiny.build(), config)
    generated = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(generated[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    assert not (generated[:, batch["input_ids"].shape[1] :] == SLOTS).any()
    assert torch.equal(generated, manual_greedy(model, **batch, steps=5))
    with torch.no_grad():
        adapted = model(**batch).logits
        with model.disable_adapter():
            assert not torch.allclose(model(**batch).logits, adapted), "the slots take part"


def test_decoder_generate_without_template_equals_manual_greedy_decoding():
    tiny = TINY_MODELS["gpt2"]
    batch = WordTokenizer("left")
    batch = _template().encode(batch, SENTENCES)  # any left-padded batch; no slots are read here
    model = get_peft_model(tiny.build(), PTuningConfig(num_virtual_tokens=N, encoder="mlp"))
    generated = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, manual_greedy(model, **batch, steps=5))


def test_t5_slots_in_the_encoder_input_and_generate_equals_manual_greedy():
    tiny = TINY_MODELS["t5"]
    config = _template()
    batch = config.encode(WordTokenizer(), SENTENCES)
    model = get_peft_model(tiny.build(), config)
    with torch.no_grad():
        prompt = _encoder(model)()
    decoder = torch.randint(0, 60, (3, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(**batch, decoder_input_ids=decoder, labels=decoder)
        theirs = _by_hand(tiny.build(), prompt, **batch, decoder_input_ids=decoder, labels=decoder)
    assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.loss, theirs.loss)
    generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
    manual = torch.zeros(3, 1, dtype=torch.long)  # decoder_start_token_id
    for _ in range(4):
        with torch.no_grad():
            logits = model(**batch, decoder_input_ids=manual).logits[:, -1]
        manual = torch.cat([manual, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, manual)


def test_a_row_with_the_wrong_number_of_slots_is_refused():
    tiny = TINY_MODELS["llama"]
    model = get_peft_model(tiny.build(), _template())
    batch = _template().encode(WordTokenizer(), SENTENCES)
    batch["input_ids"][1, 1] = 5  # row 1 loses a slot
    with pytest.raises(ConfigError, match=r"exactly 3 slots \(placeholder id 63\); rows \[1\] have \[2\]"):
        model(**batch)
    with pytest.raises(ConfigError, match="tokenizes to the placeholder id"):
        PTuningConfig(num_virtual_tokens=1, template="[P] {s}", placeholder_token_id=13).encode(
            WordTokenizer(), [{"s": "n"}]
        )  # "n" is id 3 + 110 % 50 = 13


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_virtual_tokens": 0}, "`num_virtual_tokens` must be a positive integer, got 0"),
        ({"encoder": "gru"}, r"`encoder` must be one of \['lstm', 'mlp'\], got 'gru'"),
        ({"encoder_hidden_size": 0}, "`encoder_hidden_size` must be a positive integer, got 0"),
        ({"template": "[P] {x}"}, "`template` and `placeholder_token_id` go together"),
        ({"placeholder_token_id": 5}, "`template` and `placeholder_token_id` go together"),
        ({"template": "[P] {x}", "placeholder_token_id": -1}, "must be a token id"),
        (
            {"template": "[P] {x}", "placeholder_token_id": 5},
            "has 1 \\[P\\] slots; `num_virtual_tokens` is 3",
        ),
    ],
)
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        PTuningConfig(**{"num_virtual_tokens": N, **fields})


def test_placeholder_outside_the_vocabulary_is_refused():
    with pytest.raises(ConfigError, match=r"`placeholder_token_id` 64 is outside the vocabulary \(size 64\)"):
        get_peft_model(
            TINY_MODELS["gpt2"].build(),
            _template().__class__(num_virtual_tokens=N, template=TEMPLATE, placeholder_token_id=64),
        )


def test_gradient_checkpointing_gives_the_same_encoder_gradient():
    tiny = TINY_MODELS["llama"]
    batch = _template().encode(WordTokenizer(), SENTENCES)
    grads = []
    for checkpointing in (False, True):
        model = get_peft_model(tiny.build(), _template())
        if checkpointing:
            model.base_model.gradient_checkpointing_enable()
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append(_encoder(model).embeddings.grad)
    assert grads[1] is not None and grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
