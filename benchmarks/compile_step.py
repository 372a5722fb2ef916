"""torch.compile of a LoRA training step: peftkit vs Hugging Face PEFT, each run in its own process.

    python -m benchmarks.compile_step [--repeats 3] [--models bert,llama] [--quick]
                                      [--output benchmarks/results/compile_step.md]
    python -m benchmarks.compile_step --worker --library {peftkit,peftkit-composite,hf} --model NAME

The model (``common.MODELS``, LoRA r=8 alpha=16 on all linear layers, the same layers in both libraries) is
wrapped, then ``torch.compile(model)`` (inductor, default mode) and trained with AdamW on one fixed batch:
``zero_grad; loss = compiled(**batch).loss; loss.backward(); optimizer.step()`` (the optimizer is not
compiled). Measured in each process:

- compile: the wall time of the first compiled step (dynamo tracing, AOTAutograd, inductor code generation
  and C++ compilation of forward and backward) minus the median compiled step; every cache is cold (a fresh
  ``TORCHINDUCTOR_CACHE_DIR`` per process, the FX-graph and AOTAutograd caches off), as for a user's first run;
- step: the median of ``STEPS`` compiled steps after ``WARMUP`` more;
- eager: the median of ``STEPS`` uncompiled steps of the same model, for the speed-up compiling brings;
- graphs / breaks: dynamo's count of graphs and graph breaks for the forward.

``peftkit-composite`` is peftkit with its fused LoRA autograd node switched off (the layers then run the
plain ``base(x) + s·B(A(x))`` ops), to show which of the two compiles faster and runs faster compiled.
Peers run back to back in an order that rotates per repeat; the report gives medians over repeats and the
peftkit/HF ratios in bold (below 1: peftkit is faster).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("peftkit", "hf", "peftkit-composite")
STEPS, WARMUP = 10, 3


# --- worker ----------------------------------------------------------------------------------------------
def worker(library: str, model_name: str, quick: bool) -> dict:
    import torch
    import torch._dynamo

    from benchmarks import common

    common.setup()
    batch = common.make_batch(model_name)
    model = common.wrap_lora(library.split("-")[0], common.build_model(model_name), model_name)
    if library == "peftkit-composite":
        from peftkit.methods.lora.linear import LoraLinear

        LoraLinear._fusable = lambda self, name, x: False  # every layer takes the unfused path
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(forward) -> None:
        optimizer.zero_grad(set_to_none=True)
        forward(**batch).loss.backward()
        optimizer.step()

    steps, warmup = (3, 1) if quick else (STEPS, WARMUP)
    eager = [common.timed(lambda: step(model)) for _ in range(warmup + steps)][warmup:]
    explained = torch._dynamo.explain(model)(**batch)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    first = common.timed(lambda: step(compiled))
    for _ in range(warmup):
        step(compiled)
    times = [common.timed(lambda: step(compiled)) for _ in range(steps)]
    median = statistics.median(times)
    return {
        "library": library,
        "model": model_name,
        "compile_s": first - median,
        "first_step_s": first,
        "step_s": median,
        "eager_step_s": statistics.median(eager),
        "graphs": explained.graph_count,
        "breaks": explained.graph_break_count,
        "threads": torch.get_num_threads(),
    }


def cold_cache_env() -> dict[str, str]:
    """The environment of one worker: this checkout first on the path, every compile cache cold."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="peftkit-compile-bench-")
    env["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
    env["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"
    return env


# --- driver ----------------------------------------------------------------------------------------------
def run_worker(library: str, model: str, quick: bool) -> dict:
    """One worker process; ``other_load``: the share of the machine other processes used meanwhile."""
    from benchmarks import common, load

    command = [sys.executable, "-m", "benchmarks.compile_step", "--worker", "--library", library]
    command += ["--model", model] + (["--quick"] if quick else [])
    env = cold_cache_env()
    done, other = load.other_load(
        lambda: subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(common.RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout + done.stderr)
        sys.exit(f"worker failed (exit {done.returncode}): {' '.join(command)}")
    return {**json.loads(lines[-1][len(common.RESULT_PREFIX) :]), "other_load": other}


def median_of(results: list[dict], model: str, library: str, key: str) -> float:
    return statistics.median(r[key] for r in results if r["model"] == model and r["library"] == library)


def ratio_range(results: list[dict], model: str, key: str, peer: str = "peftkit") -> str:
    """The median over repeats of each library, their ratio in bold, and the range of per-repeat ratios."""
    by_repeat: dict[int, dict[str, float]] = {}
    for r in results:
        if r["model"] == model:
            by_repeat.setdefault(r["repeat"], {})[r["library"]] = r[key]
    ratios = [v[peer] / v["hf"] for v in by_repeat.values() if peer in v and "hf" in v]
    medians = median_of(results, model, peer, key) / median_of(results, model, "hf", key)
    return f"**{medians:.2f}** ({min(ratios):.2f}-{max(ratios):.2f})"


def markdown(results: list[dict], command: str, models: list[str], started: str, minutes: float) -> str:
    from benchmarks import common, report

    ctx = report.context()
    lines = [
        "# torch.compile of a LoRA training step: peftkit vs Hugging Face PEFT",
        "",
        f"- command: `{command}` (from the repository root, through the shared slot queue `/work/wt/heavy`)",
        f"- date: {started}; total run {minutes:.1f} min, {max(r['repeat'] for r in results) + 1} processes "
        f"per configuration, peers back to back in rotating order",
        f"- machine: {ctx['cpu']}, {ctx['cores']} cores, {results[0]['threads']} threads per worker; shared: "
        f"other processes used a median {statistics.median(r['other_load'] for r in results):.0%} of it while "
        "a worker ran",
        "- software: "
        + ", ".join(f"{k} {v}" for k, v in ctx["versions"].items())
        + f"; commit {ctx['commit']}",
        f"- settings: batch {common.BATCH} x {common.TOKENS} tokens, LoRA r={common.RANK} alpha={common.ALPHA} "
        "dropout 0 on `all-linear`, AdamW; `torch.compile(model)` (inductor, default mode), every compile "
        "cache cold in each process",
        "- compile = first compiled step minus the median compiled step; step = median of "
        f"{STEPS} compiled steps after {WARMUP} warm-up steps; eager = median uncompiled step",
        "- peftkit-composite: peftkit with its fused LoRA autograd node switched off (plain ops)",
        "",
        "Ratios over Hugging Face PEFT in **bold** (below 1: peftkit is faster), with the range of the "
        "per-repeat ratios.",
        "",
        "| model | library | graphs / breaks | compile | compiled step | eager step | "
        "**compile / HF** | **compiled step / HF** |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model in models:
        for library in PEERS:
            if not any(r["model"] == model and r["library"] == library for r in results):
                continue
            row = next(r for r in results if r["model"] == model and r["library"] == library)
            compile_s = median_of(results, model, library, "compile_s")
            step_ms = median_of(results, model, library, "step_s") * 1000
            eager_ms = median_of(results, model, library, "eager_step_s") * 1000
            ratios = ["", ""]
            if library != "hf":
                ratios = [
                    ratio_range(results, model, "compile_s", library),
                    ratio_range(results, model, "step_s", library),
                ]
            lines.append(
                f"| {model} | {library} | {row['graphs']} / {row['breaks']} | {compile_s:.1f} s | "
                f"{step_ms:.1f} ms | {eager_ms:.1f} ms | {ratios[0]} | {ratios[1]} |"
            )
    lines += ["", "Model descriptions: " + "; ".join(f"{m}: {ctx['models'][m]}" for m in models), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="measure one configuration in this process")
    parser.add_argument("--library", choices=PEERS, help="worker: what to wrap the model with")
    parser.add_argument("--model", help="worker: the model (see benchmarks.common.MODELS)")
    parser.add_argument("--models", default="bert,llama", help="driver: comma-separated models")
    parser.add_argument("--peers", default=",".join(PEERS), help="driver: comma-separated libraries")
    parser.add_argument("--repeats", type=int, default=3, help="driver: processes per configuration")
    parser.add_argument("--quick", action="store_true", help="one repeat, few steps: checks the script runs")
    parser.add_argument("--output", type=Path, help="driver: write the Markdown table here (JSON beside it)")
    args = parser.parse_args()
    if args.worker:
        from benchmarks import common

        common.emit(worker(args.library, args.model, args.quick))
        return
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M+00:00")
    clock = time.monotonic()
    models, peers = args.models.split(","), args.peers.split(",")
    results = []
    for repeat in range(1 if args.quick else args.repeats):
        for model in models:
            shift = repeat % len(peers)
            for library in peers[shift:] + peers[:shift]:
                result = {**run_worker(library, model, args.quick), "repeat": repeat}
                print(json.dumps(result), flush=True)
                results.append(result)
        # written after every repeat, so that a run cut short still leaves its complete repeats
        command = "python -m benchmarks.compile_step " + " ".join(sys.argv[1:])
        text = markdown(results, command, models, started, (time.monotonic() - clock) / 60)
        if args.output:
            args.output.write_text(text)
            args.output.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
