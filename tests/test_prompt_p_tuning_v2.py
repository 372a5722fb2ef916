"""P-tuning v2: a method of its own name on prefix tuning's machinery (deep prompts trained directly), training
a BERT token-classification head and the deep prompts with nothing else changing; saved and loaded exactly."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import BertConfig, BertForTokenClassification
from transformers.cache_utils import DynamicCache

from peftkit import PeftModel, PTuningV2Config, get_peft_model
from peftkit.checkpoint import WEIGHTS_NAME
from peftkit.method_spec import method_spec
from tests.tiny_models import TINY_MODELS, run

N = 4
LABELS = 5


def _ner_model():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, num_labels=LABELS,
    )  # fmt: skip
    return BertForTokenClassification(config).eval()


def test_token_classification_trains_the_deep_prompts_and_the_head_only(tmp_path):
    batch = TINY_MODELS["bert"].batch()
    labels = torch.randint(0, LABELS, batch["input_ids"].shape, generator=torch.Generator().manual_seed(2))
    labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    model = get_peft_model(
        _ner_model(), PTuningV2Config(num_virtual_tokens=N, modules_to_save=["classifier"])
    )
    assert model.peft_config["default"].method == "p_tuning_v2"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert (
        trainable
        == {
            "base_model.bert.embeddings.word_embeddings.encoders.default.prefixes.prefix",
            *{n for n in trainable if n.startswith("base_model.classifier.") and ".default." in n},
        }
        and len(trainable) == 3
    ), trainable  # the prefix, the head's weight and bias
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable, "only the deep prompts and the head change"

    with torch.no_grad():
        output = model(**batch, labels=labels)
    assert output.logits.shape == (3, 6, LABELS), "the head reads every (real) token"
    # by hand: the frozen encoder reading the prefixes from a cache, then the trained head
    prefix = model.base_model.get_input_embeddings().encoders["default"].prefixes["prefix"].detach()
    cache = DynamicCache()
    for index, (keys, values) in enumerate(prefix):
        cache.update(keys.expand(3, -1, -1, -1), values.expand(3, -1, -1, -1), index)
    mask = torch.cat([torch.ones(3, N, dtype=torch.long), batch["attention_mask"]], dim=1)
    reference = _ner_model()
    with torch.no_grad():
        hidden = reference.bert(input_ids=batch["input_ids"], attention_mask=mask, past_key_values=cache)[0]
        head = {
            n.rsplit(".", 1)[-1]: p
            for n, p in model.named_parameters()
            if n in trainable and "classifier" in n
        }
        by_hand = torch.nn.functional.linear(hidden, head["weight"], head["bias"])
    assert torch.equal(output.logits, by_hand)
    torch.testing.assert_close(
        output.loss, torch.nn.functional.cross_entropy(by_hand.reshape(-1, LABELS), labels.reshape(-1))
    )

    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "PREFIX_TUNING" and written["peftkit"]["method"] == "p_tuning_v2"
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as handle:
        shapes = sorted(tuple(handle.get_tensor(k).shape) for k in handle.keys())  # noqa: SIM118
    assert shapes == sorted([(LABELS,), (LABELS, 32), (N, 2 * 2 * 4 * 8)])
    loaded = PeftModel.from_pretrained(_ner_model(), tmp_path)
    assert isinstance(loaded.peft_config["default"], PTuningV2Config)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, output.logits)


def test_sequence_classification_reads_the_first_token_and_the_method_is_asked_for_by_name():
    tiny = TINY_MODELS["bert"]  # BertForSequenceClassification: the head on [CLS], through BERT's pooler
    model = get_peft_model(
        tiny.build(), PTuningV2Config(num_virtual_tokens=2, modules_to_save=["classifier"])
    )
    assert run(model, tiny, tiny.batch()).shape == (3, 3)
    assert not torch.equal(run(model, tiny, tiny.batch()), run(tiny.build(), tiny, tiny.batch()))

    options = {"num_virtual_tokens": 7}
    built = method_spec("p_tuning_v2").build(options, ["classifier"])
    assert built == PTuningV2Config(num_virtual_tokens=7, modules_to_save=("classifier",))
    assert method_spec("p_tuning").build(options, []).num_virtual_tokens == 7


def test_no_reparameterization_field():
    with pytest.raises(TypeError):
        PTuningV2Config(projection_size=8)  # prefix tuning's option; P-tuning v2 trains the prompts directly
