"""`peftkit serve` under load (a few hundred requests over 16 adapters, none may fail) and end to end from
the command line: two `peftkit train` runs served by `peftkit serve`, queried over HTTP."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import time

import httpx
import pytest

from peftkit import LoraConfig
from peftkit.prompt_tokens import prompt_text
from peftkit.serve import BackgroundServer
from peftkit.serve.server import free_port
from peftkit.training.config import TrainConfig
from peftkit.training.loop import train
from tests import pipeline_fixtures as fx
from tests.test_serve import BASE, PROMPTS, make_adapter, make_engine

REQUESTS, CLIENTS, ADAPTERS = 300, 16, 16


def test_load_test_a_few_hundred_requests_over_16_adapters_without_a_failure(tmp_path):
    model_dir = fx.tiny_llama(tmp_path / "model")
    adapters = {
        f"a{i}": make_adapter(
            model_dir, f"a{i}", LoraConfig(r=4, target_modules="all-linear"), tmp_path / f"a{i}", i
        )
        for i in range(ADAPTERS)
    }
    engine = make_engine({"model": model_dir, "adapters": adapters}, max_batch_size=16)
    names = [*adapters, BASE]
    with BackgroundServer(engine) as url, httpx.Client(timeout=60) as client:

        def ask(i: int) -> tuple[int, int]:
            body = {"model": names[i % len(names)], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 4}
            answer = client.post(f"{url}/v1/completions", json={**body, "temperature": 0})
            tokens = answer.json()["usage"]["completion_tokens"] if answer.status_code == 200 else 0
            return answer.status_code, tokens

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(ask, range(REQUESTS)))
        seconds = time.perf_counter() - start
    assert [status for status, _ in results] == [200] * REQUESTS
    assert all(tokens >= 1 for _, tokens in results)
    assert seconds < 60, f"{REQUESTS} requests took {seconds:.1f} s"


@pytest.mark.slow
def test_two_trained_runs_served_from_the_command_line(tmp_path):
    model_dir = fx.tiny_llama(tmp_path / "model")
    data = fx.qa_jsonl(tmp_path / "qa.jsonl")
    for name, seed in (("qa", 0), ("qa2", 1)):
        settings = dict(
            model=str(model_dir),
            dataset=str(data),
            task="causal-lm",
            max_steps=3,
            batch_size=4,
            eval_every=3,
            save_every=3,
            seed=seed,
            output_dir=str(tmp_path / name),
            max_length=24,
            limit=40,
        )
        train(TrainConfig.from_sources(None, settings), log=lambda *_: None)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "peftkit.cli.main",
        "serve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
    ]
    command += ["--adapter", f"qa={tmp_path / 'qa'}", "--adapter", f"qa2={tmp_path / 'qa2'}"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        models = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
        assert models == ["model", "qa", "qa2"]
        tokenizer = fx.tokenizer()
        for name in ("qa", "qa2"):
            body = {
                "model": name,
                "messages": [{"role": "user", "content": "is good positive"}],
                "max_tokens": 4,
            }
            answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            assert answer.status_code == 200, answer.text
            # the chat is formatted as `peftkit train` formatted the run's prompts
            expected = tokenizer(prompt_text(tokenizer, "is good positive"), add_special_tokens=False)[
                "input_ids"
            ]
            assert answer.json()["usage"]["prompt_tokens"] == len(expected)
    finally:
        server.terminate()
        server.wait(timeout=30)
