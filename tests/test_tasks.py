"""The four tasks on tiny models: batches are laid out right, and a short run learns."""

import json

import pytest
import torch

from peftkit.method_spec import method_spec
from peftkit.prompt_tokens import prompt_text
from peftkit.tasks import TASKS
from peftkit.training.config import TrainConfig
from peftkit.training.loop import train
from tests import pipeline_fixtures as fx

QUIET = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("task-assets")


def _run(root, name, model, dataset, task, **overrides):
    settings = dict(
        model=str(model),
        dataset=str(dataset),
        task=task,
        limit=None,
        max_steps=30,
        batch_size=8,
        learning_rate=1e-2,
        target_modules="all-linear",
        eval_every=30,
        save_every=30,
        dropout=0.0,
        output_dir=str(root / name),
        max_length=32,
    )
    settings.update(overrides)
    taken = method_spec(settings.get("method", "lora")).option_names  # LoRA's options only where they apply
    settings = {k: v for k, v in settings.items() if k not in ("target_modules", "dropout") or k in taken}
    return train(TrainConfig.from_sources(None, settings), log=QUIET)


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_token_labels_go_to_the_first_sub_token_of_each_word():
    tokenizer = fx.tokenizer()
    record = {"tokens": ["unbelievably", "paris"], "tags": [0, 1]}
    batch = TASKS["token-classification"].collate([record], tokenizer, max_length=16)
    word_ids = tokenizer(record["tokens"], is_split_into_words=True).word_ids()
    assert word_ids.count(0) > 1, "the first word is split into several sub-tokens"
    expected = []
    for position, word in enumerate(word_ids):
        first = word is not None and (position == 0 or word_ids[position - 1] != word)
        expected.append(record["tags"][word] if first else -100)
    assert batch["labels"][0].tolist() == expected


def test_causal_lm_loss_is_on_the_response_only():
    tokenizer = fx.tokenizer()
    tokenizer.eos_token = tokenizer.sep_token
    records = [
        {"prompt": "is great positive", "response": "yes"},
        {"prompt": "is bad positive ok", "response": "no no"},
    ]
    batch = TASKS["causal-lm"].collate(records, tokenizer, max_length=32)
    for row, record in enumerate(records):
        prompt_ids = tokenizer(prompt_text(tokenizer, record["prompt"]), add_special_tokens=False)[
            "input_ids"
        ]
        response_ids = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        labels = batch["labels"][row]
        assert (labels[: len(prompt_ids)] == -100).all()
        assert labels[len(prompt_ids) : len(prompt_ids) + len(response_ids)].tolist() == response_ids
        assert (labels[len(prompt_ids) + len(response_ids) :] == -100).all()
        assert batch["attention_mask"][row].sum() == len(prompt_ids) + len(response_ids)


def test_token_classification_run(root):
    result = _run(
        root,
        "ner",
        fx.tiny_bert(root / "bert"),
        fx.ner_jsonl(root / "ner.jsonl"),
        "token-classification",
        max_steps=40,
    )
    assert {"precision", "recall", "f1"} <= set(result.test_metrics)
    assert result.test_metrics["f1"] > 0.5


def test_causal_lm_run(root):
    model = fx.tiny_llama(root / "llama")
    result = _run(root, "lm", model, fx.qa_jsonl(root / "qa.jsonl"), "causal-lm", max_steps=40)
    losses = [e["loss"] for e in _log(root / "lm") if e["kind"] == "train"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3  # the response loss goes down from ~ln(30522)
    assert result.test_metrics["perplexity"] == pytest.approx(
        torch.tensor(result.test_metrics["loss"]).exp().item()
    )
    assert len(result.test_metrics["samples"]) == 3


def test_seq2seq_run(root):
    result = _run(
        root, "s2s", fx.tiny_t5(root / "t5"), fx.headline_jsonl(root / "news.jsonl"), "seq2seq", max_steps=20
    )
    assert {"rouge1", "rouge2", "rougeL", "loss"} <= set(result.test_metrics)


def test_yaml_settings_and_flags(tmp_path):
    (tmp_path / "run.yaml").write_text("method: ia3\nmax_steps: 7\nlearning_rate: 0.002\n")
    config = TrainConfig.from_sources(tmp_path / "run.yaml", {"max_steps": 9, "seed": None})
    assert (config.method, config.max_steps, config.learning_rate, config.seed) == ("ia3", 9, 0.002, 0)
    (tmp_path / "exponent.yaml").write_text("learning_rate: 3e-5\n")  # YAML 1.1 reads this as a string
    assert TrainConfig.from_sources(tmp_path / "exponent.yaml").learning_rate == 3e-5
    (tmp_path / "word.yaml").write_text("max_steps: many\n")
    with pytest.raises(
        ValueError, match=r"`max_steps` must be an integer >= 1, or none \(run `epochs` epochs\), got 'many'"
    ):
        TrainConfig.from_sources(tmp_path / "word.yaml")
    (tmp_path / "bad.yaml").write_text("learning_rte: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown training setting\(s\) \['learning_rte'\]"):
        TrainConfig.from_sources(tmp_path / "bad.yaml")


def test_qlora_run_trains_a_plain_lora_adapter_on_a_4bit_base(root):
    from peftkit.checkpoint import read_adapter

    model = root / "llama" if (root / "llama").exists() else fx.tiny_llama(root / "llama")
    _run(root, "qlora", model, fx.qa_jsonl(root / "qa.jsonl"), "causal-lm", method="qlora", max_steps=20)
    losses = [e["loss"] for e in _log(root / "qlora") if e["kind"] == "train"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    config, tensors = read_adapter(root / "qlora" / "adapter")
    assert config["peft_type"] == "LORA" and all(t.dtype == torch.float32 for t in tensors.values())


@pytest.mark.parametrize(
    ("method", "task"),
    [
        ("prompt_tuning", "token-classification"),
        ("prefix_tuning", "causal-lm"),
        ("prompt_tuning", "causal-lm"),
    ],
)
def test_prompt_methods_train_through_the_pipeline(root, method, task):
    if task == "token-classification":
        model, data = fx.tiny_bert(root / f"bert-{method}"), fx.ner_jsonl(root / "ner.jsonl")
    else:
        model = root / "llama" if (root / "llama").exists() else fx.tiny_llama(root / "llama")
        data = fx.qa_jsonl(root / "qa.jsonl")
    name = f"{method}-{task}"
    result = _run(root, name, model, data, task, method=method, num_virtual_tokens=4, max_steps=15)
    losses = [e["loss"] for e in _log(root / name) if e["kind"] == "train"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert result.test_metrics  # evaluation lines up the virtual tokens (token tags, generations)
