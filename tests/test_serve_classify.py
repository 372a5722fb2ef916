"""`POST /v1/classify` over real HTTP on 127.0.0.1: labels and scores equal `PeftModel` run with that adapter
alone, while requests for different classification adapters (each with its own head and label count,
sequence and token classification, LoRA and IA3) are answered concurrently in shared passes; bad requests
get an OpenAI-style error naming the field; API key and metrics.

The tiny LLaMA runs in float64 (see test_serve.py): equal labels then test the batching, not rounding.
"""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftkit import IA3Config, LoraConfig, PeftModel, get_peft_model
from peftkit.serve import BackgroundServer, Engine, ServeConfig
from peftkit.serve.classify import SEQUENCE, TOKEN, ClassifyJob
from peftkit.serve.heads import bio_entities
from peftkit.tasks import TASKS
from tests.pipeline_fixtures import tiny_llama

DTYPE = torch.float64
BASE = "tiny"
# name -> (task, label names, adapter config, saved as a run folder (labels.json) or a bare adapter folder)
ADAPTERS = {
    "sent": (SEQUENCE, ["negative", "positive"], LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), True),
    "topic": (SEQUENCE, None, LoraConfig(r=2, alpha=4, target_modules="all-linear"), False),
    "ner": (TOKEN, ["O", "B-LOC", "I-LOC"], LoraConfig(r=4, target_modules=["q_proj", "up_proj"]), True),
    "sent_ia3": (SEQUENCE, ["no", "yes"], IA3Config(init="random"), True),
}
TOPIC_LABELS = 3  # "topic" is a bare adapter folder: its labels are LABEL_0 .. LABEL_2
TEXTS = ["the movie was great", "it was bad and boring", "a film", "paris and london and rome"]


def _host(model_dir: Path, task: str, labels: list[str]):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return TASKS[task].load_model(model_dir, labels, tokenizer).to(DTYPE).eval()


def _labels(name: str) -> list[str]:
    _task, labels, _, _ = ADAPTERS[name]
    return labels or [f"LABEL_{i}" for i in range(TOPIC_LABELS)]


def _save(model_dir: Path, name: str, root: Path, seed: int) -> Path:
    task, labels, config, as_run = ADAPTERS[name]
    torch.manual_seed(seed)
    config = config.replace(
        task_type="SEQ_CLS" if task == SEQUENCE else "TOKEN_CLS", modules_to_save=["score"]
    )
    model = get_peft_model(_host(model_dir, task, _labels(name)), config)
    with torch.no_grad():  # adapters and heads that clearly differ from each other and from the base
        for _key, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.normal_(std=0.5)
    if not as_run:
        model.save_pretrained(root / name)
        return root / name
    model.save_pretrained(root / name / "adapter")
    (root / name / "config.yaml").write_text("model: tiny\n")
    (root / name / "labels.json").write_text(json.dumps({"task": task, "label_names": labels}))
    return root / name


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("classify")
    model_dir = tiny_llama(root / "model")
    adapters = {name: _save(model_dir, name, root / "adapters", i) for i, name in enumerate(ADAPTERS)}
    generation = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE),
        LoraConfig(r=2, target_modules=["q_proj"]),
    )
    generation.save_pretrained(root / "adapters" / "gen")
    adapters["gen"] = root / "adapters" / "gen"
    return {"model": model_dir, "adapters": adapters, "root": root / "adapters"}


def make_engine(assets: dict, names: list[str], **settings) -> Engine:
    config = ServeConfig(
        model=str(assets["model"]),
        adapters={name: str(assets["adapters"][name]) for name in names},
        served_name=BASE,
        **settings,
    )
    base = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=DTYPE).eval()
    return Engine(config, PeftModel(base, None), AutoTokenizer.from_pretrained(assets["model"]))


@pytest.fixture(scope="module")
def server(assets):
    names = [*ADAPTERS, "gen"]
    engine = make_engine(assets, names, adapter_roots=[str(assets["root"])])
    with BackgroundServer(engine) as url:
        yield url, engine


_references: dict = {}


def reference(assets: dict, name: str, text) -> dict:
    """`PeftModel.from_pretrained` with this adapter alone on its own task model, one text at a time."""
    key = (name, json.dumps(text))
    if key not in _references:
        task = ADAPTERS[name][0]
        labels = _labels(name)
        directory = assets["adapters"][name]
        directory = directory / "adapter" if ADAPTERS[name][3] else directory
        model = PeftModel.from_pretrained(_host(assets["model"], task, labels), directory)
        tokenizer = AutoTokenizer.from_pretrained(assets["model"])
        words = text.split() if isinstance(text, str) else text
        batch = tokenizer(words, is_split_into_words=True) if task == TOKEN else tokenizer(text)
        ids = torch.tensor([batch["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
        if task == SEQUENCE:
            probs = torch.softmax(logits, -1)
            _references[key] = {"label": labels[int(probs.argmax())], "scores": probs.tolist()}
        else:
            first = [batch.word_ids().index(w) for w in range(len(words))]
            probs = torch.softmax(logits[first], -1)  # (words, labels)
            _references[key] = {"labels": [labels[i] for i in probs.argmax(-1).tolist()], "probs": probs}
    return _references[key]


def check(assets: dict, name: str, text, answer: dict) -> None:
    expected = reference(assets, name, text)
    if ADAPTERS[name][0] == SEQUENCE:
        assert answer["label"] == expected["label"]
        assert list(answer["scores"]) == _labels(name)
        assert list(answer["scores"].values()) == pytest.approx(expected["scores"], abs=1e-9)
        assert answer["score"] == pytest.approx(max(expected["scores"]), abs=1e-9)
    else:
        assert [t["label"] for t in answer["tokens"]] == expected["labels"]
        assert [t["score"] for t in answer["tokens"]] == pytest.approx(
            expected["probs"].max(-1).values.tolist(), abs=1e-9
        )


def classify(url: str, model: str, inputs, **headers) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/classify", json={"model": model, "input": inputs}, headers=headers, timeout=60
    )


def test_concurrent_requests_for_different_adapters_equal_each_adapter_alone(server, assets):
    url, _engine = server
    work = [(name, TEXTS[i % len(TEXTS)]) for i in range(3) for name in ADAPTERS]
    work += [(name, TEXTS) for name in ADAPTERS]  # several texts in one request
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: classify(url, *job), work))
    for (name, inputs), answer in zip(work, answers, strict=True):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model"] == name and body["task"] == ADAPTERS[name][0]
        texts = [inputs] if isinstance(inputs, str) else inputs
        assert [d["index"] for d in body["data"]] == list(range(len(texts)))
        for text, result in zip(texts, body["data"], strict=True):
            check(assets, name, text, result)


def test_one_pass_of_rows_of_every_adapter_equals_each_adapter_alone(server, assets):
    """The classifier's pass itself (deterministically mixed): rows of all adapters, of both tasks, given
    together to one run; sequence rows of LoRA and IA3 adapters share one forward pass."""
    _url, engine = server
    jobs = [engine.classify_job(name, TEXTS) for name in ADAPTERS]
    passes_before = _pass_count(engine)
    future = engine.scheduler.call(lambda: engine.classifier.run(jobs, max_rows=64))
    future.result(timeout=60)
    assert _pass_count(engine) - passes_before == 2  # one pass per task kind, all adapters mixed
    for job in jobs:
        for text, result in zip(TEXTS, job.future.result(), strict=True):
            check(assets, job.adapter, text, result)


def _pass_count(engine) -> float:
    return engine.metrics.registry.get_sample_value("peftkit_classify_pass_rows_count") or 0.0


def test_ner_words_and_entities(server, assets):
    url, _ = server
    words = ["paris", "was", "a", "rome", "film"]
    answer = classify(url, "ner", [words, "the movie and london"])
    assert answer.status_code == 200, answer.text
    first, second = answer.json()["data"]
    assert [t["word"] for t in first["tokens"]] == words
    assert [t["word"] for t in second["tokens"]] == ["the", "movie", "and", "london"]
    check(assets, "ner", words, first)
    labels = [t["label"] for t in first["tokens"]]
    assert first["entities"] == bio_entities(words, labels, [t["score"] for t in first["tokens"]])


def test_bio_entities_groups_spans_as_seqeval():
    words = ["john", "smith", "in", "new", "york", "and", "paris"]
    labels = ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O", "I-LOC"]
    spans = bio_entities(words, labels, [1.0, 0.5, 1.0, 0.25, 0.75, 1.0, 0.9])
    assert [(s["entity"], s["start"], s["end"], s["text"]) for s in spans] == [
        ("PER", 0, 2, "john smith"),
        ("LOC", 3, 5, "new york"),
        ("LOC", 6, 7, "paris"),
    ]
    assert [s["score"] for s in spans] == [0.75, 0.5, 0.9]
    assert bio_entities(["a", "b"], ["B-X", "I-Y"], [1.0, 1.0])[1]["entity"] == "Y"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nobody", "input": "x"}, 404, "model"),
        ({"model": "gen", "input": "x"}, 400, "model"),
        ({"model": BASE, "input": "x"}, 400, "model"),
        ({"model": "sent", "input": []}, 400, "input"),
        ({"model": "sent", "input": 3}, 400, "input"),
        ({"model": "sent", "input": ["fine", ""]}, 400, "input[1]"),
        ({"model": "sent", "input": ["fine", "film " * 200]}, 400, "input[1]"),
        ({"model": "sent", "input": [["a", "b"]]}, 400, "input[0]"),
        ({"model": "ner", "input": "   "}, 400, "input"),
        ({"input": "x"}, 400, "model"),
    ],
)
def test_bad_requests_name_the_field(server, body, status, param):
    url, _ = server
    answer = httpx.post(f"{url}/v1/classify", json=body, timeout=30)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["message"]
    assert classify(url, "sent", "still serving").status_code == 200


def test_classification_adapter_refused_by_completions_and_listed(server):
    url, _ = server
    answer = httpx.post(f"{url}/v1/completions", json={"model": "sent", "prompt": "x", "max_tokens": 2})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "model"
    assert "/v1/classify" in answer.json()["error"]["message"]
    bad_json = httpx.post(
        f"{url}/v1/classify", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert bad_json.status_code == 400
    cards = {card["id"]: card for card in httpx.get(f"{url}/v1/models").json()["data"]}
    assert cards["sent"]["task"] == SEQUENCE and cards["ner"]["task"] == TOKEN and "task" not in cards["gen"]


def test_metrics_count_classified_texts(server):
    url, _ = server
    assert classify(url, "topic", TEXTS).status_code == 200
    text = httpx.get(f"{url}/metrics").text
    count = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith('peftkit_classified_inputs_total{adapter="topic"}')
    )
    assert count >= len(TEXTS)
    assert "peftkit_classify_seconds_bucket" in text and "peftkit_classify_pass_rows_bucket" in text


def test_hot_load_and_remove_a_classification_run(server, assets):
    url, _ = server
    load = httpx.post(f"{url}/v1/adapters", json={"name": "sent2", "path": "sent_ia3"}, timeout=60)
    assert load.status_code == 201, load.text
    assert load.json()["task"] == SEQUENCE
    answer = classify(url, "sent2", TEXTS[0])
    assert answer.status_code == 200
    check(assets, "sent_ia3", TEXTS[0], answer.json()["data"][0])
    assert httpx.delete(f"{url}/v1/adapters/sent2").status_code == 200
    assert classify(url, "sent2", TEXTS[0]).status_code == 404
    outside = httpx.post(f"{url}/v1/adapters", json={"name": "x", "path": "/etc"}, timeout=30)
    assert outside.status_code == 403 and outside.json()["error"]["param"] == "path"


def test_api_key_guards_classify(assets):
    engine = make_engine(assets, ["sent"], api_key="secret")
    with BackgroundServer(engine) as url:
        refused = classify(url, "sent", "fine")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        answer = classify(url, "sent", "fine", authorization="Bearer secret")
        assert answer.status_code == 200
        check(assets, "sent", "fine", answer.json()["data"][0])


def test_a_cancelled_job_is_skipped(server):
    _, engine = server
    job = ClassifyJob("sent", [[1, 2, 3]])
    job.future.cancel()
    engine.scheduler.submit_classify(job)
    follow = engine.classify_job("sent", "fine")
    engine.scheduler.submit_classify(follow)
    assert follow.future.result(timeout=30)[0]["label"] in _labels("sent")


def test_an_encoder_base_with_heads_of_different_widths(tmp_path):
    """BERT-style encoder (the pooler feeds the sequence head): sequence adapters of 2 and 4 labels and a
    token adapter, one mixed pass per kind, equal to each adapter alone (no HTTP: the classifier itself)."""
    from tests.pipeline_fixtures import tiny_bert

    model_dir = tiny_bert(tmp_path / "bert")
    specs = {
        "two": (SEQUENCE, ["a", "b"], ["query"]),
        "four": (SEQUENCE, ["w", "x", "y", "z"], ["value", "dense"]),
        "tags": (TOKEN, ["O", "B-LOC", "I-LOC"], ["query", "value"]),
    }
    folders = {}
    for seed, (name, (task, labels, targets)) in enumerate(specs.items()):
        torch.manual_seed(seed)
        config = LoraConfig(r=2, target_modules=targets, modules_to_save=["classifier"])
        model = get_peft_model(_host(model_dir, task, labels), config)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.normal_(std=0.5)
        model.save_pretrained(tmp_path / name / "adapter")
        (tmp_path / name / "config.yaml").write_text("model: bert\n")
        (tmp_path / name / "labels.json").write_text(json.dumps({"task": task, "label_names": labels}))
        folders[name] = tmp_path / name
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE).eval()
    config = ServeConfig(model=str(model_dir), adapters={k: str(v) for k, v in folders.items()})
    engine = Engine(config, PeftModel(base, None), AutoTokenizer.from_pretrained(model_dir))
    for name in specs:
        engine.classifier.load(name)
    jobs = [engine.classify_job(name, TEXTS) for name in specs]
    with torch.no_grad():
        engine.classifier.run(jobs, max_rows=64)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for job in jobs:
        task, labels, _ = specs[job.adapter]
        alone = PeftModel.from_pretrained(_host(model_dir, task, labels), folders[job.adapter] / "adapter")
        for text, answer in zip(TEXTS, job.future.result(), strict=True):
            words = text.split()
            batch = tokenizer(words, is_split_into_words=True) if task == TOKEN else tokenizer(text)
            ids = torch.tensor([batch["input_ids"]])
            with torch.no_grad():
                probs = torch.softmax(alone(input_ids=ids).logits[0].float(), -1)
            if task == SEQUENCE:
                assert list(answer["scores"].values()) == pytest.approx(probs.tolist(), abs=1e-9)
            else:
                first = [batch.word_ids().index(w) for w in range(len(words))]
                assert [t["label"] for t in answer["tokens"]] == [labels[i] for i in probs[first].argmax(-1)]
                assert [t["score"] for t in answer["tokens"]] == pytest.approx(
                    probs[first].max(-1).values.tolist(), abs=1e-9
                )


def test_a_job_whose_adapter_went_away_fails_as_not_found(server):
    from peftkit.serve.registry import AdapterNotFound

    _, engine = server
    job = ClassifyJob("removed-meanwhile", [[1, 2, 3]])
    engine.scheduler.submit_classify(job)
    with pytest.raises(AdapterNotFound, match="removed-meanwhile"):
        job.future.result(timeout=30)
