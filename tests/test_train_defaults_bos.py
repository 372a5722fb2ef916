"""Causal-LM prompts start with the tokenizer's BOS token where the model expects one, and never with two:
in training batches, evaluation, generation (`peftkit generate`, the lab's runs) and the server's prompts.

Two word-level tokenizers are built locally: one that puts ``<s>`` before every text on its own (as Llama,
Mistral and Gemma tokenizers do) and one that does not (as GPT-2, Qwen and SmolLM2 ones do)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from peftkit.lab.worker import run as lab_run
from peftkit.prompt_tokens import expects_bos, prompt_ids, prompt_text, special_tokens, with_bos
from peftkit.serve.engine import Engine
from peftkit.tasks import TASKS
from peftkit.training.config import TrainConfig
from peftkit.training.finished import load_run
from peftkit.training.layout import RunFolder

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<user>", "<bot>"] + [f"w{i}" for i in range(40)]
PAD, BOS, EOS = 0, 1, 2
CHAT_WITH_BOS = "{{ bos_token }}{% for m in messages %}<user> {{ m['content'] }}\n{% endfor %}<bot>"
CAUSAL = TASKS["causal-lm"]
RECORDS = [{"prompt": "w1 w2 w3", "response": "w4 w5"}, {"prompt": "w6", "response": "w7 w8 w9"}]


def word_tokenizer(adds_bos: bool, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS; ``adds_bos``: its own encoding of a text starts with <s>."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def plain(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.split()]


@pytest.mark.parametrize("adds_bos", [True, False])
def test_the_tokenizers_do_what_their_names_say(adds_bos):
    tokenizer = word_tokenizer(adds_bos)
    assert tokenizer("w1 w2")["input_ids"] == [BOS] * adds_bos + plain("w1 w2")
    assert special_tokens(tokenizer) == ([BOS] * adds_bos, [])
    assert expects_bos(tokenizer) is adds_bos


def test_a_declared_add_bos_token_counts_even_when_the_tokenizer_does_not_add_it():
    tokenizer = word_tokenizer(adds_bos=False)
    tokenizer.add_bos_token = True  # a slow-to-fast conversion that lost the post-processor
    assert expects_bos(tokenizer)
    assert prompt_ids(tokenizer, "w1") == [BOS, *plain("w1")]


@pytest.mark.parametrize("adds_bos", [True, False])
def test_training_batches_start_with_bos_once_and_the_loss_skips_it(adds_bos):
    tokenizer = word_tokenizer(adds_bos)
    batch = CAUSAL.collate(RECORDS, tokenizer, max_length=32)
    for row, record in enumerate(RECORDS):
        prompt = [BOS] * adds_bos + plain(record["prompt"])
        response = [*plain(record["response"]), EOS]
        length = len(prompt) + len(response)
        assert batch["input_ids"][row, :length].tolist() == prompt + response
        assert batch["labels"][row, :length].tolist() == [-100] * len(prompt) + response
        assert batch["attention_mask"][row].sum() == length


def test_a_chat_template_that_writes_bos_gets_no_second_one():
    tokenizer = word_tokenizer(adds_bos=True, chat_template=CHAT_WITH_BOS)
    text = prompt_text(tokenizer, "w1 w2")
    assert text.startswith("<s>")
    expected = [BOS, WORDS.index("<user>"), *plain("w1 w2"), WORDS.index("<bot>")]
    assert prompt_ids(tokenizer, "w1 w2") == expected
    batch = CAUSAL.collate([{"prompt": "w1 w2", "response": "w3"}], tokenizer, 32)
    assert batch["input_ids"][0].tolist() == [*expected, *plain("w3"), EOS]
    assert with_bos(tokenizer, [BOS, 7]) == [BOS, 7]  # and ids that already start with it stay as they are


@pytest.mark.parametrize("adds_bos", [True, False])
def test_evaluation_scores_the_response_after_the_same_prompt(adds_bos):
    """The evaluation loss equals the model's loss on hand-built rows: [bos] prompt response eos."""
    tokenizer, model = word_tokenizer(adds_bos), tiny_llama()
    metrics = CAUSAL.evaluate(model, RECORDS, tokenizer, batch_size=2, max_length=32, label_names=None)
    total, count = 0.0, 0
    for record in RECORDS:
        prompt = [BOS] * adds_bos + plain(record["prompt"])
        response = [*plain(record["response"]), EOS]
        ids = torch.tensor([prompt + response])
        labels = torch.tensor([[-100] * len(prompt) + response])
        with torch.no_grad():
            total += model(input_ids=ids, labels=labels).loss.item() * len(response)
        count += len(response)
    assert metrics["loss"] == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("adds_bos", [True, False])
def test_generation_starts_from_the_same_prompt_as_training(adds_bos, monkeypatch):
    tokenizer, model = word_tokenizer(adds_bos), tiny_llama()
    seen = []
    generate = model.generate

    def recording(**kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", recording)
    outputs = CAUSAL.predict(
        model, ["w1 w2", "w3"], tokenizer, max_length=32, label_names=None, max_new_tokens=3
    )
    assert seen == [[BOS] * adds_bos + plain("w1 w2"), [BOS] * adds_bos + plain("w3")]
    assert len(outputs) == 2


@pytest.mark.parametrize("adds_bos", [True, False])
def test_the_server_formats_prompts_as_training_did(adds_bos):
    tokenizer = word_tokenizer(adds_bos)
    engine = SimpleNamespace(tokenizer=tokenizer, base_name="base")
    assert Engine.text_prompt(engine, "w1 w2\n") == prompt_ids(tokenizer, "w1 w2")
    assert Engine.text_prompt(engine, [5, 6]) == [5, 6]  # a client's own ids are taken as given
    chat = Engine.chat_prompt(engine, "base", [{"role": "user", "content": "w1 w2"}])
    assert chat == prompt_ids(tokenizer, "w1 w2")


def test_a_lab_run_trains_and_generates_from_bos_prompts(tmp_path):
    """`peftkit compare`'s worker (train, reload, time) on a model whose tokenizer adds BOS: the run's
    batches, its evaluation samples and the reloaded run's generations all go through the BOS prompts."""
    model_dir = tmp_path / "llama"
    tiny_llama().save_pretrained(model_dir)
    word_tokenizer(adds_bos=True).save_pretrained(model_dir)
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"w{i} w{i + 1}", "response": f"w{i + 2}"}) + "\n" for i in range(30))
    )
    config = TrainConfig.from_sources(
        None,
        dict(model=str(model_dir), dataset=str(data), task="causal-lm", max_steps=4, batch_size=4,
             eval_every=4, save_every=4, output_dir=str(tmp_path / "run"), max_length=16),
    )  # fmt: skip
    folder = RunFolder(config.output_dir)
    folder.root.mkdir(parents=True)
    folder.save_config(config)
    record = lab_run(folder.root, latency_batch=2, latency_repeats=1)
    assert record["status"] == "ok"
    loaded = load_run(folder.root)
    assert expects_bos(loaded.tokenizer)
    assert (
        CAUSAL.collate([{"prompt": "w1", "response": "w2"}], loaded.tokenizer, 16)["input_ids"][0, 0] == BOS
    )
