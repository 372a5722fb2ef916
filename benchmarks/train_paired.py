"""Training step, peftkit vs Hugging Face PEFT in one process, steps alternating: a ratio the host's drift cannot bias.

    python -m benchmarks.train_paired [--method lora] [--models bert gpt2 llama] [--rounds 15] [--output FILE.md]

The per-process benchmark (``lora_vs_hf``, ``train_step.py``) keeps each library in its own process, which
is what peak memory needs; its step-time ratio, though, compares two processes that ran minutes apart, and on
a shared virtual machine the host's load moves a process's step time by 10-30% between runs (the spread of
its back-to-back pairs shows it). Here, for time only, one process per model builds the same model twice
(same seed), wraps one copy with each library (LoRA r=8, alpha=16, no dropout, all linear layers, as in
``common.wrap_lora``), and then alternates single training steps, ``peftkit, hf, hf, peftkit, ...``: each
round times one step of each, so a slow moment of the host hits both. The ratio reported is the median over
rounds of the per-round ratio, with the median step of each library beside it.

A third variant, ``peftkit-unfused``, runs peftkit with its fused LoRA node switched off (the plain autograd
ops), to show what that node is worth on its own. ``--method prompt_tuning`` / ``prefix_tuning`` pairs the
prompt methods instead (20 virtual tokens, as ``common.wrap``; causal LMs only), without that variant.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import common

LORA_VARIANTS = ("peftkit", "hf", "peftkit-unfused")
WARMUP = 3


def _trainer(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()

    return step


def measure(model_name: str, rounds: int, method: str = "lora") -> dict[str, object]:
    from peftkit.methods.lora import LoraLinear

    common.setup()
    batch = common.make_batch(model_name)
    base = common.build_model(model_name, common.model_size(method))
    steps = {
        library: _trainer(common.wrap(library, copy.deepcopy(base), model_name, method), batch)
        for library in ("peftkit", "hf")
    }
    variants = LORA_VARIANTS if method == "lora" else LORA_VARIANTS[:2]
    if method == "lora":
        unfused_step = _trainer(common.wrap("peftkit", copy.deepcopy(base), model_name, method), batch)
        fusable = LoraLinear._fusable

        def unfused() -> None:
            LoraLinear._fusable = lambda self, name, x: False
            try:
                unfused_step()
            finally:
                LoraLinear._fusable = fusable

        steps["peftkit-unfused"] = unfused
    for _ in range(WARMUP):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(rounds):
        order = variants if round_index % 2 == 0 else variants[::-1]
        for name in order:
            times[name].append(common.timed(steps[name]))
    ratio = [p / h for p, h in zip(times["peftkit"], times["hf"], strict=True)]
    fused = [p / u for p, u in zip(times["peftkit"], times.get("peftkit-unfused", []), strict=False)]
    return {
        "model": model_name,
        "method": method,
        "median_ms": {name: 1000 * statistics.median(values) for name, values in times.items()},
        "peftkit_over_hf": statistics.median(ratio),
        "peftkit_over_hf_quartiles": statistics.quantiles(ratio, n=4),
        "fused_over_unfused": statistics.median(fused) if fused else None,
        "rounds": rounds,
    }


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(results: list[dict[str, object]], command: str) -> str:
    lines = [
        f"# Training step ({results[0]['method']}), peftkit vs Hugging Face PEFT, steps alternating in one process",
        "",
        f"- command: `{command}` (from the repository root, with `.venv/bin/python`)",
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M+00:00')}; "
        f"peftkit at commit {_commit()}",
        f"- machine: {platform.processor() or platform.machine()}, {results[0]['threads']} threads; "
        f"allocator {results[0]['allocator']} (run under `LD_PRELOAD` to choose it); torch {torch.__version__}",
        "- models, batch, method settings: as in [`lora_vs_hf.md`](lora_vs_hf.md) and "
        "[`prompt_vs_hf.md`](prompt_vs_hf.md) (random weights, 8 x 128 tokens; LoRA r=8 alpha=16 dropout 0 on all "
        "linear layers; prompt methods 20 virtual tokens)",
        "",
        "| model | step peftkit | step HF | **peftkit/HF** (median of per-round ratios) | quartiles | "
        "step peftkit unfused | fused/unfused |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ms = r["median_ms"]
        q1, _, q3 = r["peftkit_over_hf_quartiles"]
        lines.append(
            f"| {r['model']} | {ms['peftkit']:.1f} ms | {ms['hf']:.1f} ms | **{r['peftkit_over_hf']:.3f}** | "
            f"{q1:.3f}-{q3:.3f} | "
            + (
                f"{ms['peftkit-unfused']:.1f} ms | {r['fused_over_unfused']:.3f} |"
                if "peftkit-unfused" in ms
                else "n/a | n/a |"
            )
        )
    lines += [
        "",
        f"Each round times one training step (forward, backward, AdamW) of each variant, the order reversed "
        f"every other round, after {WARMUP} untimed steps each; {results[0]['rounds']} rounds per model. "
        "peftkit unfused: the same peftkit model with the fused LoRA autograd node switched off.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["bert", "gpt2", "llama"], choices=sorted(common.MODELS)
    )
    parser.add_argument("--rounds", type=int, default=15, help="timed steps per variant (at least 2)")
    parser.add_argument("--method", choices=common.METHODS, default="lora")
    parser.add_argument("--output", type=Path, help="write the Markdown table here")
    parser.add_argument("--one", choices=sorted(common.MODELS), help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error(f"--rounds must be at least 2 (quartiles of the per-round ratios), got {args.rounds}")
    if args.one:
        common.emit(measure(args.one, args.rounds, args.method))
        return 0
    results = []
    for model_name in args.models:  # one process per model: no model's allocations shape another's
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.train_paired",
                "--one",
                model_name,
                "--rounds",
                str(args.rounds),
                "--method",
                args.method,
            ],
            capture_output=True,
            text=True,
        )
        lines = [line for line in completed.stdout.splitlines() if line.startswith(common.RESULT_PREFIX)]
        if completed.returncode != 0 or not lines:
            sys.stderr.write(completed.stderr[-2000:])
            return 1
        result = json.loads(lines[-1][len(common.RESULT_PREFIX) :])
        results.append(result)
        print(f"{model_name}: peftkit/HF {result['peftkit_over_hf']:.3f}", flush=True)
    text = report(results, "python -m benchmarks." + Path(sys.argv[0]).stem + " " + " ".join(sys.argv[1:]))
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
