"""`peftkit serve` with 16 LoRA adapters: decode cost of a mixed batch, throughput against two peers, latency
under load, memory per resident adapter.

    nice -n 10 python -m benchmarks.serve --model llama --output benchmarks/results/serve_llama.md
    nice -n 10 python -m benchmarks.serve --model smollm2 --output benchmarks/results/serve_smollm2.md
    python -m benchmarks.serve --quick            # does it run? (numbers meaningless)

Models: ``llama``, a LLaMA-style decoder built from its config (hidden 512, 6 layers, 8 heads, SwiGLU 1376,
vocabulary 16,000, random weights; the bundled MiniLM tokenizer only decodes), and ``smollm2``
(SmolLM2-135M-Instruct, the bundled real weights). 16 LoRA adapters, r=8, alpha=16, all linear layers, B
random (std 0.02), saved and served from their folders. Requests: 32 random prompt tokens, 32 new tokens
(greedy, ``ignore_eos``: every request generates exactly 32), adapters taken in turn.

1. *decode*: one decode step of 16 rows with 32 tokens in their cache, (a) all rows on one adapter through the
   ordinary path (``set_adapter``), (b) each row on its own adapter (``adapter_names=``); alternating
   rounds of 16 steps, medians. Target (b)/(a) <= 1.10.
2. *throughput*: 16 clients, one request each, at once: tokens/s of `peftkit serve` against (i) a baseline
   server answering one request at a time with Hugging Face PEFT's ``set_adapter`` + ``generate``
   (target >= 3x) and (ii) Hugging Face PEFT's own mixed-batch ``generate`` of the same 16 requests
   (``adapter_names=``; target >= 1.7x). Alternating rounds, medians.
3. *latency*: 1, 4 and 16 streaming clients, each sending requests one after another: p50 / p99 time to
   first token and inter-token latency, and tokens/s.
4. *memory*: resident memory (VmRSS) and adapter tensor bytes with 16 and then 64 adapters loaded
   (``--memory-adapters``).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.serve_peers import BaselineServer, hf_mixed_generate, run_load

ADAPTERS, RANK, ALPHA = 16, 8, 16
PROMPT, NEW = 32, 32
CLIENTS = (1, 4, 16)


def model_folder(name: str, root: Path) -> Path:
    """A model folder `peftkit serve` and transformers load: the config-built LLaMA saved with the MiniLM
    tokenizer, or the bundled SmolLM2."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from peftkit.assets import resolve_model

    if name == "smollm2":
        return resolve_model("smollm2")
    torch.manual_seed(common.SEED)
    config = LlamaConfig(
        vocab_size=16000,
        hidden_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=1376,
        max_position_embeddings=256,
    )
    LlamaForCausalLM(config).save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(resolve_model("minilm")).save_pretrained(root / "model")
    return root / "model"


def make_adapters(model_dir: Path, root: Path, count: int) -> dict[str, Path]:
    """``count`` LoRA adapters (r=8, all linear layers, B ~ N(0, 0.02)) saved as adapter folders."""
    from transformers import AutoModelForCausalLM

    import peftkit

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = peftkit.LoraConfig(r=RANK, alpha=ALPHA, target_modules="all-linear")
    model = peftkit.get_peft_model(base, config, adapter_name="default")
    folders = {}
    for i in range(count):
        torch.manual_seed(i)
        with torch.no_grad():
            for key, parameter in model.named_parameters():
                if "lora_B" in key:
                    parameter.normal_(std=0.02)
                elif "lora_A" in key:
                    parameter.normal_(std=0.05)
        folders[f"a{i}"] = root / f"a{i}"
        model.save_pretrained(folders[f"a{i}"])
    return folders


def prompts(rows: int, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(common.INPUT_SEED)
    return torch.randint(100, vocab, (rows, PROMPT), generator=generator)  # (rows, PROMPT)


def decode_steps(
    model, names: list[str], vocab: int, rounds: int, steps: int, cpu_time: bool = False
) -> dict:
    """Median seconds of one decode step: every row on ``names[0]`` (ordinary path) vs row i on names[i].
    ``cpu_time``: the process's CPU seconds instead of wall seconds (on a machine other processes load, the
    time this process waits for a core is then not counted; with one thread no spinning is counted either)."""
    ids = prompts(len(names), vocab)
    with torch.no_grad():
        prefilled = model(input_ids=ids, use_cache=True, adapter_names=names).past_key_values
    model.set_adapter(names[0])

    def run(kwargs) -> float:
        cache = copy.deepcopy(prefilled)
        token = ids[:, -1:]
        clock = time.process_time if cpu_time else time.perf_counter
        start = clock()
        with torch.no_grad():
            for _ in range(steps):
                out = model(
                    input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs
                )
                token = out.logits[:, -1].argmax(-1, keepdim=True)
        return (clock() - start) / steps

    variants = {"one adapter": {}, "16 adapters": {"adapter_names": names}}
    times = {name: [] for name in variants}
    for index in range(rounds + 1):  # the first round warms up
        order = list(variants) if index % 2 == 0 else list(variants)[::-1]
        for name in order:
            seconds = run(variants[name])
            if index:
                times[name].append(seconds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {**medians, "ratio": medians["16 adapters"] / medians["one adapter"]}


def jobs(clients: int, per_client: int, vocab: int) -> list[list[dict]]:
    ids = prompts(clients * per_client, vocab).tolist()
    body = {"max_tokens": NEW, "temperature": 0, "ignore_eos": True}
    return [
        [
            {**body, "model": f"a{(c + j * clients) % ADAPTERS}", "prompt": ids[c * per_client + j]}
            for j in range(per_client)
        ]
        for c in range(clients)
    ]


def hf_model(model_dir: Path, folders: dict[str, Path]):
    """Hugging Face PEFT's PeftModel on a fresh base with the same adapters loaded."""
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    names = list(folders)
    model = peft.PeftModel.from_pretrained(base, folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folders[name], adapter_name=name)
    return model.eval()


def throughput(url: str, hf, vocab: int, rounds: int, baseline_requests: int = 16) -> dict:
    """Tokens/s of the same 16 requests: peftkit serve (16 clients at once), the one-at-a-time HF PEFT
    server, HF PEFT's mixed-batch generate; alternating rounds, medians. Each run is timed twice: wall
    seconds (the load generator's clock, its clients built before it starts; for generate, the call) and
    CPU seconds of this process, which holds the servers and generate but not the load generator's clients
    (they stand for remote clients): with one torch thread, CPU seconds are the work each peer does for
    the tokens, which other processes on the machine do not change the way they change wall time.
    ``baseline_requests``: the one-at-a-time server answers only the first so many (it serves one after
    another, so its tokens/s does not depend on how many wait)."""
    work = jobs(16, 1, vocab)
    names = [job[0]["model"] for job in work]
    ids = torch.tensor([job[0]["prompt"] for job in work])
    tokens = {
        "peftkit serve": 16 * NEW,
        "baseline server": baseline_requests * NEW,
        "HF PEFT mixed generate": 16 * NEW,
    }
    wall: dict[str, list[float]] = {name: [] for name in tokens}
    cpu: dict[str, list[float]] = {name: [] for name in tokens}
    with BaselineServer(hf, pad_token_id=0) as baseline:
        runs = {  # each returns its wall seconds
            "peftkit serve": lambda: run_load(url, work, stream=False).seconds,
            "baseline server": lambda: run_load(baseline, work[:baseline_requests], stream=False).seconds,
            "HF PEFT mixed generate": lambda: hf_mixed_generate(hf, ids, names, NEW, 0),
        }
        one = work[:1]
        warm = {
            "peftkit serve": lambda: run_load(url, one, stream=False),
            "baseline server": lambda: run_load(baseline, one, stream=False),
            "HF PEFT mixed generate": lambda: hf_mixed_generate(hf, ids[:1], names[:1], NEW, 0),
        }
        for index in range(rounds + 1):  # round 0 warms each peer up on one request
            order = list(runs) if index % 2 == 0 else list(runs)[::-1]
            for name in order:
                if not index:
                    warm[name]()
                    continue
                start = time.process_time()
                wall[name].append(tokens[name] / runs[name]())
                cpu[name].append(tokens[name] / (time.process_time() - start))
    result = {}
    for clock, values in (("wall", wall), ("cpu", cpu)):
        medians = {name: statistics.median(v) for name, v in values.items()}
        result[clock] = {
            "tokens_per_s": medians,
            "all": values,
            "vs baseline": medians["peftkit serve"] / medians["baseline server"],
            "vs HF mixed": medians["peftkit serve"] / medians["HF PEFT mixed generate"],
        }
    return result


def latency(url: str, vocab: int, per_client: int) -> list[dict]:
    return [run_load(url, jobs(clients, per_client, vocab), stream=True).summary() for clients in CLIENTS]


def adapter_bytes(engine) -> int:
    model = engine.model
    return sum(
        p.numel() * p.element_size() for n in engine.registry.resident for p in model.adapter_parameters(n)
    )


def memory_with(engine, folders: dict[str, Path], rss_base: float, count: int) -> list[dict]:
    """Resident memory and adapter bytes once the first ``count`` adapters are loaded."""
    for name in list(folders)[:count]:
        if name not in engine.registry.known:
            engine.registry.add(name, folders[name], trusted=True)
            engine.preload(name).result()
    return [
        {
            "adapters": len(engine.registry.resident),
            "adapter_mib": adapter_bytes(engine) / 2**20,
            "rss_mib": common.rss_mib(),
            "rss_growth_mib": common.rss_mib() - rss_base,
        }
    ]


def others_share(run):
    """``run()``'s value and the share of the machine other processes used meanwhile (0..1)."""
    import resource

    from benchmarks.load import CORES, busy_cpu_seconds

    def own() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    wall, busy, ours = time.monotonic(), busy_cpu_seconds(), own()
    value = run()
    wall, busy, ours = time.monotonic() - wall, busy_cpu_seconds() - busy, own() - ours
    return value, max(0.0, busy - ours) / (wall * CORES)


def verdict(value: float, goal: float, higher: bool, others: float) -> str:
    met = value >= goal if higher else value <= goal
    if others > 0.1 and not met:
        return "missed (machine loaded: inconclusive)"
    return "met" if met else "missed"


def report(args, ctx: dict, res: dict) -> str:
    head = [
        f"# `peftkit serve`: 16 LoRA adapters on {args.model}",
        "",
        f"- command: `{ctx['command']}` (from the repository root, with `.venv/bin/python`)",
        f"- date: {ctx['date']}; total {ctx['elapsed_s'] / 60:.1f} min",
        f"- machine: {ctx['cpu']}, {ctx['cores']} cores shared with other sessions; other processes used "
        + ", ".join(f"{k} {v:.0%}" for k, v in res["others"].items())
        + f" of the machine; load average {ctx['load_before']:.1f} before, {ctx['load_after']:.1f} after",
        f"- software: {ctx['versions']}; peftkit at commit {ctx['commit']}; {torch.get_num_threads()} torch threads",
        f"- model: {MODEL_TEXT[args.model]}; {ADAPTERS} LoRA adapters r={RANK} alpha={ALPHA} on all linear layers; "
        f"requests of {PROMPT} prompt tokens and {NEW} new tokens (greedy, ignore_eos)",
        "",
        "| target | goal | measured | result |",
        "|---|---|---|---|",
    ]
    targets, body = [], []
    if "decode" in res:
        d = res["decode"]
        targets.append(
            f"| decode step, 16 adapters / one adapter | <= 1.10x | **{d['ratio']:.3f}x** | "
            f"{verdict(d['ratio'], 1.10, False, res['others']['decode'])} |"
        )
        body += [
            f"## Decode step (16 rows, 32 cached tokens each; medians of alternating rounds; "
            f"{'CPU' if args.cpu_time else 'wall'} time)",
            "",
            f"- one adapter (`set_adapter`): {d['one adapter'] * 1e3:.1f} ms; 16 adapters (`adapter_names=`): "
            f"{d['16 adapters'] * 1e3:.1f} ms: **{d['ratio']:.3f}x**",
            "",
        ]
    if "throughput" in res:
        other = res["others"]["throughput"]
        for clock, label in (("cpu", "per CPU-second of the serving process"), ("wall", "wall")):
            t = res["throughput"][clock]
            inconclusive = other if clock == "wall" else 0.0  # CPU seconds: the load's effect is small
            targets += [
                f"| tokens/s ({label}), peftkit serve / one-at-a-time HF PEFT server | >= 3x | "
                f"**{t['vs baseline']:.2f}x** | {verdict(t['vs baseline'], 3.0, True, inconclusive)} |",
                f"| tokens/s ({label}), peftkit serve / HF PEFT mixed-batch generate | >= 1.7x | "
                f"**{t['vs HF mixed']:.2f}x** | {verdict(t['vs HF mixed'], 1.7, True, inconclusive)} |",
            ]
            body += [
                f"## Throughput, {label} (the same 16 requests, 16 x {NEW} tokens; medians of {args.rounds} "
                "alternating rounds)",
                "",
                *[
                    f"- {name}: {value:.1f} tokens/s (rounds: {', '.join(f'{v:.1f}' for v in t['all'][name])})"
                    for name, value in t["tokens_per_s"].items()
                ],
                "",
            ]
    if "latency" in res:
        body += [
            "## Latency under load (streaming clients, each sending its requests one after another)",
            "",
            "| clients | requests | tokens/s | TTFT p50 | TTFT p99 | inter-token p50 | inter-token p99 |",
            "|---|---|---|---|---|---|---|",
            *[
                f"| {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | {_ms(r['ttft_p50'])} | "
                f"{_ms(r['ttft_p99'])} | {_ms(r['itl_p50'])} | {_ms(r['itl_p99'])} |"
                for r in res["latency"]
            ],
            "",
        ]
    body += [
        "## Memory",
        "",
        "| resident adapters | adapter tensors | process RSS | RSS growth since the base model loaded |",
        "|---|---|---|---|",
        *[
            f"| {r['adapters']} | {r['adapter_mib']:.1f} MiB | {r['rss_mib']:.0f} MiB | {r['rss_growth_mib']:.0f} MiB |"
            for r in res["memory"]
        ],
        "",
    ]
    return "\n".join([*head, *targets, "", *body])


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f} ms"


MODEL_TEXT = {
    "llama": "LLaMA-style decoder built from LlamaConfig: hidden 512, 6 layers, 8 heads, SwiGLU 1376, vocab 16,000, "
    "untied head, random weights",
    "smollm2": "SmolLM2-135M-Instruct (the bundled real weights): hidden 576, 30 layers, vocab 49,152",
}


def measure(args, root: Path) -> dict:
    from peftkit.serve import BackgroundServer, Engine, ServeConfig

    model_dir = model_folder(args.model, root)
    most = max(ADAPTERS, args.memory_adapters)
    folders = make_adapters(model_dir, root / "adapters", most)
    first = dict(list(folders.items())[:ADAPTERS])
    config = ServeConfig(
        model=str(model_dir), adapters={k: str(v) for k, v in first.items()}, max_adapters=most
    )
    engine = Engine.load(config, log=lambda *_: None)
    rss_base = common.rss_mib()
    vocab = engine.model.config.vocab_size
    res: dict = {"others": {}}
    quick = args.quick
    with BackgroundServer(engine) as url:
        res["memory"] = memory_with(engine, folders, rss_base, 16)
        if "decode" in args.parts:
            res["decode"], res["others"]["decode"] = others_share(
                lambda: decode_steps(
                    engine.model,
                    list(first),
                    vocab,
                    rounds=1 if quick else args.rounds,
                    steps=2 if quick else 16,
                    cpu_time=args.cpu_time,
                )
            )
        if most > ADAPTERS:
            res["memory"] += memory_with(engine, folders, rss_base, most)
        if "throughput" in args.parts:
            res["throughput"], res["others"]["throughput"] = others_share(
                lambda: throughput(
                    url,
                    hf_model(model_dir, first),
                    vocab,
                    rounds=1 if quick else args.rounds,
                    baseline_requests=args.baseline_requests,
                )
            )
        if "latency" in args.parts:
            res["latency"], res["others"]["latency"] = others_share(
                lambda: latency(url, vocab, 1 if quick else args.latency_requests)
            )
    return res


def main() -> None:
    import importlib.metadata
    import json
    import sys

    from benchmarks.report import _cpu_model, _git_commit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("llama", "smollm2"), default="llama")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of the alternating comparisons")
    parser.add_argument(
        "--output", type=Path, help="write the Markdown results here (and the raw .json beside)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny rounds: checks the script runs")
    parser.add_argument("--threads", type=int, default=common.THREADS, help="torch threads")
    parser.add_argument("--cpu-time", action="store_true", help="decode steps timed in CPU seconds, not wall")
    parser.add_argument(
        "--latency-requests", type=int, default=3, help="requests per client in the latency runs"
    )
    parser.add_argument(
        "--memory-adapters",
        type=int,
        default=64,
        help="resident adapters of the second memory row (16 or fewer: one row, with the 16 served)",
    )
    parser.add_argument(
        "--baseline-requests",
        type=int,
        default=16,
        choices=range(1, 17),
        metavar="N",
        help="the one-at-a-time server answers the first N of the 16 requests (its tokens/s does not "
        "depend on how many wait; fewer keep a slow model's run short)",
    )
    parser.add_argument(
        "--parts",
        default="decode,throughput,latency",
        type=lambda text: set(text.split(",")),
        help="comma-separated: decode, throughput, latency (memory is always measured)",
    )
    args = parser.parse_args()
    common.setup()
    torch.set_num_threads(args.threads)
    start, load_before = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        res = measure(args, Path(tmp))
    versions = ", ".join(
        f"{p} {importlib.metadata.version(p)}" for p in ("torch", "transformers", "peft", "fastapi")
    )
    ctx = {
        "command": "nice -n 10 python -m benchmarks.serve " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start)),
        "elapsed_s": time.time() - start,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "versions": versions,
        "commit": _git_commit(),
    }
    text = report(args, ctx, res)
    print(text)
    if args.output:
        args.output.write_text(text)
        args.output.with_suffix(".json").write_text(json.dumps({"context": ctx, "results": res}, indent=1))


if __name__ == "__main__":
    main()
