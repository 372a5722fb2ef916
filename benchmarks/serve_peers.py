"""The peers `benchmarks/serve.py` measures `peftkit serve` against, and its load generator.

- :class:`BaselineServer`: what a user would write with Hugging Face PEFT: an HTTP endpoint that answers one
  request at a time, ``set_adapter(name)`` then ``generate``.
- :func:`hf_mixed_generate`: Hugging Face PEFT's own mixed batch: one ``generate`` of all requests with
  ``adapter_names=`` (one adapter per row).
- :func:`run_load`: N concurrent clients, each sending its requests one after another, streaming when the
  server streams; it records time to first token, the gaps between tokens and the wall time.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import torch
from fastapi import FastAPI
from pydantic import BaseModel

from peftkit.serve.server import BackgroundServer


@dataclass
class Load:
    clients: int
    requests: int
    tokens: int
    seconds: float
    ttft: list[float] = field(default_factory=list)  # seconds, one per request
    gaps: list[float] = field(default_factory=list)  # seconds between consecutive streamed tokens

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def summary(self) -> dict:
        def pct(values: list[float], q: float) -> float | None:
            """Percentile ``q``; one value is every percentile of itself (the table shows the count)."""
            if len(values) < 2:
                return values[0] if values else None
            return statistics.quantiles(values, n=100, method="inclusive")[q - 1]

        return {
            "clients": self.clients,
            "requests": self.requests,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s,
            "ttft_p50": pct(self.ttft, 50),
            "ttft_p99": pct(self.ttft, 99),
            "itl_p50": pct(self.gaps, 50),
            "itl_p99": pct(self.gaps, 99),
        }


def _one_request(client: httpx.Client, url: str, body: dict, stream: bool, load: Load, lock) -> int:
    start = time.perf_counter()
    if not stream:
        answer = client.post(f"{url}/v1/completions", json=body)
        answer.raise_for_status()
        with lock:
            load.ttft.append(time.perf_counter() - start)
        return answer.json()["usage"]["completion_tokens"]
    stamps = []
    with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    with lock:
        load.ttft.append(stamps[0] - start)
        load.gaps.extend(b - a for a, b in itertools.pairwise(stamps))
    return body["max_tokens"]  # ignore_eos: exactly max_tokens tokens


def run_load(url: str, jobs: list[list[dict]], stream: bool, own_process: bool = True) -> Load:
    """``jobs[c]``: the request bodies client ``c`` sends one after another; all clients start together.

    ``own_process``: the clients run in a process of their own (``python -m benchmarks.serve_peers``), as
    clients of a deployed server do: in the server's process their threads would compete with the server
    for the interpreter lock, which measures the load generator rather than the server."""
    if own_process:
        command = [sys.executable, "-m", "benchmarks.serve_peers", url, "stream" if stream else "whole"]
        done = subprocess.run(command, input=json.dumps(jobs), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the load generator failed: {done.stderr[-2000:]}")
        return Load(**json.loads(done.stdout.strip().splitlines()[-1]))
    load = Load(clients=len(jobs), requests=sum(map(len, jobs)), tokens=0, seconds=0.0)
    lock = threading.Lock()
    ready = threading.Barrier(len(jobs) + 1)  # every client built before the clock starts

    def client_run(bodies: list[dict]) -> int:
        # a client's set-up (an SSL context, its pool: tens of ms of CPU each) is not the server's time
        with httpx.Client(timeout=600) as client:
            ready.wait()
            return sum(_one_request(client, url, body, stream, load, lock) for body in bodies)

    with ThreadPoolExecutor(len(jobs)) as pool:
        running = pool.map(client_run, jobs)
        ready.wait()
        start = time.perf_counter()
        load.tokens = sum(running)
    load.seconds = time.perf_counter() - start
    return load


class _Completion(BaseModel):
    model: str
    prompt: list[int]
    max_tokens: int


def baseline_app(model, pad_token_id: int) -> FastAPI:
    """One request at a time: ``set_adapter`` then greedy ``generate`` of exactly ``max_tokens`` tokens."""
    app = FastAPI()
    lock = threading.Lock()

    @app.post("/v1/completions")
    def complete(body: _Completion) -> dict:  # FastAPI runs sync handlers in a thread pool
        ids = torch.tensor([body.prompt])
        with lock, torch.no_grad():
            model.set_adapter(body.model)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=body.max_tokens,
                min_new_tokens=body.max_tokens,
                do_sample=False,
                pad_token_id=pad_token_id,
            )
        return {"usage": {"completion_tokens": out.shape[1] - ids.shape[1]}}

    return app


class BaselineServer(BackgroundServer):
    """:class:`BackgroundServer`'s uvicorn thread around :func:`baseline_app` (no engine to start)."""

    def __init__(self, model, pad_token_id: int) -> None:
        import uvicorn

        from peftkit.serve.server import free_port

        self.engine = None
        self.host, self.port = "127.0.0.1", free_port()
        config = uvicorn.Config(
            baseline_app(model, pad_token_id), host=self.host, port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def hf_mixed_generate(
    model, prompts: torch.Tensor, names: list[str], new_tokens: int, pad_token_id: int
) -> float:
    """Seconds for one mixed-batch ``generate`` (each row its own adapter) of exactly ``new_tokens`` tokens."""
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            adapter_names=names,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id,
        )
    return time.perf_counter() - start


if __name__ == "__main__":  # the load generator's own process: jobs as JSON on stdin, the Load as JSON out
    done = run_load(
        sys.argv[1], json.loads(sys.stdin.read()), stream=sys.argv[2] == "stream", own_process=False
    )
    print(json.dumps(dataclasses.asdict(done)))
