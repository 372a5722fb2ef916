"""`peftkit serve` over real HTTP on 127.0.0.1: answers equal `PeftModel.generate` with the adapter alone
while requests for different adapters share the running batch; streaming, the official `openai` client,
adapter eviction and hot loading, errors, health and metrics.

The tiny LLaMA runs in float64: a batch rounds differently from a single row (other matmul shapes, the
gathered LoRA path), and a random tiny model's top logits can lie within float32 rounding of each other,
so float32 could flip an argmax by chance. float64 makes "same tokens" a test of the batching logic, not
of rounding; test_serve_units.py compares float32 logits of a mixed decode step within a tolerance.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftkit import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from peftkit.serve import BackgroundServer, Engine, ServeConfig
from peftkit.serve.sampling import SamplingParams
from tests.pipeline_fixtures import tiny_llama

ADAPTERS = {
    "lora_all": LoraConfig(r=4, alpha=8, target_modules="all-linear"),
    "lora_qv": LoraConfig(r=8, alpha=8, target_modules=["q_proj", "v_proj"]),
    "lora_mlp": LoraConfig(r=2, alpha=4, target_modules=["up_proj", "down_proj"]),
    "ia3": IA3Config(init="random"),
    "prompt": PromptTuningConfig(num_virtual_tokens=3),
    "prefix": PrefixTuningConfig(num_virtual_tokens=2),
}
PROMPTS = ["the movie was great", "a film and a plot", "it was bad", "actors story and", "the best film"]
BASE = "tiny"  # the base model's served name
TOKENS = 6
DTYPE = torch.float64  # see the module doc


def _load_base(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE).eval()


def make_adapter(model_dir: Path, name: str, config, target: Path, seed: int) -> Path:
    """An adapter whose output differs clearly from the base model's (LoRA's B and prompts non-zero)."""
    torch.manual_seed(seed)
    model = get_peft_model(_load_base(model_dir), config, adapter_name="default")
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if "lora_B" in key:
                parameter.normal_(std=0.5)
            elif parameter.requires_grad:
                parameter.normal_(std=1.0)
    model.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serve")
    model_dir = tiny_llama(root / "model")
    adapters = {
        name: make_adapter(model_dir, name, config, root / "adapters" / name, seed)
        for seed, (name, config) in enumerate(ADAPTERS.items())
    }
    return {"model": model_dir, "adapters": adapters, "root": root / "adapters"}


def make_engine(assets: dict, adapters: dict[str, Path] | None = None, **settings) -> Engine:
    config = ServeConfig(
        model=str(assets["model"]),
        adapters={k: str(v) for k, v in (assets["adapters"] if adapters is None else adapters).items()},
        served_name=BASE,
        **settings,
    )
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    return Engine(config, PeftModel(_load_base(assets["model"]), None), tokenizer)


@pytest.fixture(scope="module")
def server(assets):
    engine = make_engine(assets, adapter_roots=[str(assets["root"])], max_batch_size=16)
    with BackgroundServer(engine) as url:
        yield url, engine


_reference_cache: dict = {}


def reference(assets: dict, adapter: str, prompt: str, tokens: int = TOKENS) -> str:
    """What `PeftModel.generate` gives with this adapter alone (greedy), decoded as the server decodes."""
    key = (adapter, prompt, tokens)
    if key not in _reference_cache:
        tokenizer = AutoTokenizer.from_pretrained(assets["model"])
        base = _load_base(assets["model"])
        model = (
            PeftModel(base, None)
            if adapter == BASE
            else PeftModel.from_pretrained(base, assets["adapters"][adapter], adapter_name=adapter)
        )
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False
            )
        _reference_cache[key] = tokenizer.decode(
            out[0, ids.shape[1] :], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
    return _reference_cache[key]


def complete(url: str, model: str, prompt: str, tokens: int = TOKENS, **extra) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def metric(url: str, name: str, **labels) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


def test_concurrent_requests_for_different_adapters_equal_each_adapter_alone(server, assets):
    url, _ = server
    jobs = [(name, PROMPTS[i % len(PROMPTS)]) for i, name in enumerate([*ADAPTERS, BASE, "lora_all"])]
    assert len(jobs) == 8
    steps_before = metric(url, "peftkit_decode_steps_total")
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: complete(url, *job), jobs))
    steps = metric(url, "peftkit_decode_steps_total") - steps_before
    tokens = 0
    for (name, prompt), answer in zip(jobs, answers, strict=True):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["choices"][0]["text"] == reference(assets, name, prompt), name
        assert body["model"] == name
        tokens += body["usage"]["completion_tokens"]
    assert steps < tokens - len(jobs)  # decode steps were shared: the rows ran in one batch


def test_streaming_yields_the_same_text(server, assets):
    url, _ = server
    for name in ("lora_all", "prefix", BASE):
        body = {"model": name, "prompt": PROMPTS[0], "max_tokens": TOKENS, "temperature": 0, "stream": True}
        chunks, done = [], False
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunks.append(json.loads(line.removeprefix("data: ")))
        assert done
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
        assert "".join(c["choices"][0]["text"] for c in chunks) == reference(assets, name, PROMPTS[0])


def test_the_official_openai_client_works_unchanged(server, assets):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == BASE and set(ADAPTERS) <= set(ids)

    completion = client.completions.create(
        model="lora_qv", prompt=PROMPTS[1], max_tokens=TOKENS, temperature=0
    )
    assert completion.choices[0].text == reference(assets, "lora_qv", PROMPTS[1])
    assert completion.usage.completion_tokens >= 1

    streamed = client.completions.create(
        model="ia3", prompt=PROMPTS[2], max_tokens=TOKENS, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == reference(assets, "ia3", PROMPTS[2])

    # no chat template in the tiny tokenizer: the message's text and a newline, as `peftkit train` formats it
    chat = client.chat.completions.create(
        model="lora_mlp", messages=[{"role": "user", "content": PROMPTS[3]}], max_tokens=TOKENS, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == reference(assets, "lora_mlp", PROMPTS[3] + "\n")
    stream = client.chat.completions.create(
        model="lora_mlp",
        messages=[{"role": "user", "content": PROMPTS[3]}],
        max_tokens=TOKENS,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content


def test_eviction_and_reload_give_the_same_output(assets):
    names = ["lora_all", "lora_qv", "ia3"]
    engine = make_engine(assets, {n: assets["adapters"][n] for n in names}, max_adapters=2)
    with BackgroundServer(engine) as url:
        first = {n: complete(url, n, PROMPTS[0]).json()["choices"][0]["text"] for n in names}
        assert len(engine.registry.resident) == 2
        again = {n: complete(url, n, PROMPTS[0]).json()["choices"][0]["text"] for n in reversed(names)}
        assert metric(url, "peftkit_adapter_loads_total") >= 5  # each of the 3, then 2 reloads at least
    assert first == again == {n: reference(assets, n, PROMPTS[0]) for n in names}


def test_hot_load_and_unload_during_traffic_lose_no_request(assets, tmp_path):
    engine = make_engine(
        assets, {"lora_all": assets["adapters"]["lora_all"]}, adapter_roots=[str(assets["root"])]
    )
    with BackgroundServer(engine) as url:
        jobs = [("lora_all" if i % 2 else BASE, PROMPTS[i % len(PROMPTS)]) for i in range(12)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(complete, url, *job) for job in jobs]
            loaded = httpx.post(f"{url}/v1/adapters", json={"name": "late", "path": "lora_qv"}, timeout=60)
            vllm_style = httpx.post(
                f"{url}/v1/adapters", json={"lora_name": "late2", "lora_path": "ia3"}, timeout=60
            )
            answers = [f.result() for f in futures]
        assert loaded.status_code == 201, loaded.text
        assert vllm_style.status_code == 201, vllm_style.text
        for (name, prompt), answer in zip(jobs, answers, strict=True):
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["text"] == reference(assets, name, prompt)
        assert complete(url, "late", PROMPTS[0]).json()["choices"][0]["text"] == reference(
            assets, "lora_qv", PROMPTS[0]
        )

        # unloading while a request for it runs: that request finishes, later ones are refused
        running = concurrent.futures.ThreadPoolExecutor(1).submit(complete, url, "late2", PROMPTS[1], 12)
        gone = httpx.delete(f"{url}/v1/adapters/late2", timeout=60)
        assert gone.status_code == 200 and gone.json()["deleted"] is True
        assert running.result().status_code in (200, 404)  # 404 only if the delete came before it arrived
        refused = complete(url, "late2", PROMPTS[1])
        assert refused.status_code == 404 and refused.json()["error"]["param"] == "model"
        assert "late2" not in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]


def test_adapters_load_only_from_the_allowed_roots(server, assets, tmp_path):
    url, _ = server
    outside = make_adapter(assets["model"], "x", ADAPTERS["lora_all"], tmp_path / "outside", seed=9)
    for path in (str(outside), "../../outside", str(assets["root"] / ".." / "model")):
        answer = httpx.post(f"{url}/v1/adapters", json={"name": "evil", "path": path}, timeout=30)
        assert answer.status_code == 403, answer.text
        assert answer.json()["error"]["param"] == "path"
    missing = httpx.post(f"{url}/v1/adapters", json={"name": "x", "path": "no_such"}, timeout=30)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "path"
    duplicate = httpx.post(f"{url}/v1/adapters", json={"name": "ia3", "path": "ia3"}, timeout=30)
    assert duplicate.status_code == 409
    assert httpx.delete(f"{url}/v1/adapters/nope", timeout=30).status_code == 404
    no_roots = make_engine(assets, {})
    with BackgroundServer(no_roots) as other:
        answer = httpx.post(f"{other}/v1/adapters", json={"name": "a", "path": str(outside)}, timeout=30)
        assert answer.status_code == 403 and "--adapter-root" in answer.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "nope", "prompt": "hi"}, "model"),
        ({"model": BASE, "prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ({"model": BASE, "prompt": "hi", "max_tokens": 10**9}, "max_tokens"),
        ({"model": BASE, "prompt": "hi", "max_tokens": "many"}, "max_tokens"),
        ({"model": BASE, "prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"model": BASE, "prompt": "hi", "top_p": 0}, "top_p"),
        ({"model": BASE, "prompt": "hi", "n": 2}, "n"),
        ({"model": BASE, "prompt": " ".join(["film"] * 200)}, "prompt"),
        ({"model": BASE, "prompt": [1, 2, 10**7]}, "prompt"),
        ({"model": BASE}, "prompt"),
        ({"prompt": "hi"}, "model"),
    ],
)
def test_bad_completion_requests_get_an_openai_error_naming_the_field(server, body, param):
    url, _ = server
    answer = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert 400 <= answer.status_code < 500, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["message"] and error["type"].endswith("_error")
    assert complete(url, BASE, PROMPTS[0]).status_code == 200  # and the server keeps serving


def test_bad_chat_requests_and_malformed_json(server):
    url, _ = server
    for body, param in (
        ({"model": BASE, "messages": []}, "messages"),
        ({"model": BASE, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": BASE, "messages": "hi"}, "messages"),
    ):
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text
    broken = httpx.post(
        f"{url}/v1/completions",
        content=b'{"model": "tiny", "prompt": ',
        headers={"content-type": "application/json"},
    )
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]["message"]
    assert complete(url, BASE, PROMPTS[0]).status_code == 200


def test_stop_strings_ignore_eos_and_seeded_sampling(server, assets):
    url, engine = server
    eos = AutoTokenizer.from_pretrained(assets["model"]).sep_token_id  # the tiny model's end of sequence
    for ignore, expected in ((False, {eos}), (True, set())):
        params = SamplingParams(temperature=0.0, ignore_eos=ignore)
        assert engine.sequence(BASE, [5, 6], 4, params, emit=print).stop_ids == expected

    full = reference(assets, "lora_all", PROMPTS[4], 8)
    stop = full.split()[2]
    cut = complete(url, "lora_all", PROMPTS[4], 8, stop=[stop, "zzzz"]).json()["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"

    def sample(seed: int) -> str:
        return complete(url, "lora_qv", PROMPTS[0], 8, temperature=1.0, top_p=0.9, seed=seed).json()[
            "choices"
        ][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # alone and in company: same seed, same text
        texts = list(pool.map(sample, [7, 7, 7, 8]))
    assert texts[0] == texts[1] == texts[2] == sample(7)
    assert len({sample(seed) for seed in range(5)}) > 1  # and the seed matters


def test_queue_limit_answers_429_and_disconnects_cancel_rows(assets):
    engine = make_engine(assets, {}, max_queue=1, max_batch_size=1)
    with BackgroundServer(engine) as url:
        gate = threading.Event()
        engine.scheduler.call(gate.wait)  # holds the scheduler between steps
        first = concurrent.futures.ThreadPoolExecutor(1).submit(complete, url, BASE, PROMPTS[0])
        deadline = time.monotonic() + 10
        while not engine.scheduler.waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = complete(url, BASE, PROMPTS[1])
        gate.set()
        assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
        assert first.result().status_code == 200

        body = {"model": BASE, "prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            next(response.iter_lines())  # one event, then the client goes away
        deadline = time.monotonic() + 20
        while metric(url, "peftkit_requests_total", adapter=BASE, outcome="cancelled") < 1:
            assert time.monotonic() < deadline, "the abandoned row was not cancelled"
            time.sleep(0.05)


def test_api_key_health_and_metrics(assets):
    engine = make_engine(assets, {"lora_all": assets["adapters"]["lora_all"]}, api_key="sesame")
    with BackgroundServer(engine) as url:
        refused = httpx.get(f"{url}/v1/models")
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0, timeout=60)
        client.completions.create(model="lora_all", prompt=PROMPTS[0], max_tokens=3, temperature=0)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()

        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["adapters"] == 1
        text = httpx.get(f"{url}/metrics").text
        for name in (
            "peftkit_requests_total",
            "peftkit_generated_tokens_total",
            "peftkit_prompt_tokens_total",
            "peftkit_time_to_first_token_seconds_bucket",
            "peftkit_queue_length",
            "peftkit_batch_size",
        ):
            assert name in text
        assert metric(url, "peftkit_requests_total", adapter="lora_all", outcome="ok") == 1
        assert metric(url, "peftkit_generated_tokens_total", adapter="lora_all") == 3
