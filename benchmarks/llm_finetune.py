"""Causal-LM fine-tuning, peftkit against Hugging Face PEFT inside transformers' ``Trainer``.

    nice -n 10 .venv/bin/python -m benchmarks.llm_finetune --output benchmarks/results/llm_finetune.md
    .venv/bin/python -m benchmarks.llm_finetune --quick          # one short round: does it run?

SmolLM2-135M-Instruct (the real weights peftkit bundles, ``peftkit.assets``) with LoRA (r=8, alpha=16,
dropout 0.05, all linear layers) and QLoRA (the same adapter on an NF4 base, double quantization) on the
bundled chat pairs (``chatterbot``: the loss on the response only), both libraries with the same training
records, the same tokenization and labels (``peftkit.tasks`` CausalLM collate), maximum length, batch size,
steps, learning rate, schedule, weight decay, clipping and seed:

- ``peftkit``: peftkit's training step as ``peftkit train`` runs it for a causal LM: length-grouped batches
  (``StepOrder``), the fused linear cross-entropy (``fused_training_loss``), AdamW (QLoRA on CUDA: paged
  8-bit AdamW), linear schedule;
- ``hf``: ``Trainer`` with ``peft.get_peft_model`` (QLoRA: ``BitsAndBytesConfig`` + ``prepare_model_for_kbit_
  training``), its defaults otherwise (random batches, ``optim="adamw_torch"``; QLoRA on CUDA
  ``"paged_adamw_8bit"``).

Each configuration runs in its own process (``benchmarks.llm_finetune_worker``, which says what is measured);
rounds interleave the peers (the order alternates). On CUDA the models run in bf16 autocast (fp32 master
weights) in both libraries; peftkit's fused loss hands off to Cut Cross-Entropy or Liger when installed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.llm_finetune_worker import worker

RESULT = "RESULT "
CONFIGS = ("peftkit-lora", "hf-lora", "peftkit-qlora", "hf-qlora")


# --- driver ------------------------------------------------------------------------------------------------
def run_config(config: str, args) -> dict:
    command = [sys.executable, "-m", "benchmarks.llm_finetune", "--worker", config]
    for name in ("steps", "warmup", "warmup_steps", "batch_size", "max_length", "lr", "seed", "threads"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    # glibc pinned to mmap for blocks >= 64 KiB (both peers alike): freed tensors leave the resident set, so
    # its peak is what was alive at once, not what glibc's heap kept from the first step.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith(RESULT)), None)
    if done.returncode or line is None:
        return {"config": config, "failed": f"exit {done.returncode}: {done.stderr[-2000:]}"}
    return json.loads(line[len(RESULT) :])


def _ratio_rows(results: dict[str, list[dict]], method: str) -> list[str]:
    ours = [r for r in results.get(f"peftkit-{method}", []) if "failed" not in r]
    theirs = [r for r in results.get(f"hf-{method}", []) if "failed" not in r]
    if not ours or not theirs:
        return []

    def median(runs, key):
        return statistics.median(r[key] for r in runs)

    rows = []
    for key, label, target in (
        ("tokens_per_cpu_s", "real tokens per CPU-second", ">= 1.3x"),
        ("tokens_per_s", "real tokens/s (wall; load-dependent)", ">= 1.3x"),
        ("same_batch_peak_mib", "peak memory of a step on the same widest batch (MiB)", "<= 0.6x"),
        ("peak_above_model_mib", "peak memory above the loaded model over the run (MiB)", "<= 0.6x"),
        ("peak_total_mib", "peak memory from before loading (MiB)", ""),
        ("eval_loss", "held-out loss after training", "no worse"),
    ):
        a, b = median(ours, key), median(theirs, key)
        rows.append(f"| {method} | {label} | {a:,.3f} | {b:,.3f} | **{a / b:.2f}x** | {target} |")
    return rows


def markdown(results: dict[str, list[dict]], args, command: str, seconds: float) -> str:
    first = next((r for runs in results.values() for r in runs if "device" in r), {"device": "?"})
    lines = [
        "# Causal-LM fine-tuning: peftkit vs Hugging Face PEFT + Trainer",
        "",
        f"Command: `{command}`",
        "",
        f"SmolLM2-135M-Instruct (bundled), chatterbot pairs, {args.steps} steps ({args.warmup_steps} not timed), "
        f"batch {args.batch_size}, max length {args.max_length}, lr {args.lr}, warm-up {args.warmup}, seed "
        f"{args.seed}, {args.rounds} interleaved round(s), {args.threads} thread(s); device: {first['device']}; "
        f"torch {torch.__version__}; {seconds / 60:.1f} min. Medians over rounds; ratio = peftkit / HF.",
        "",
        "| method | measure | peftkit | HF PEFT + Trainer | ratio | target |",
        "|---|---|---|---|---|---|",
        *_ratio_rows(results, "lora"),
        *_ratio_rows(results, "qlora"),
        "",
        "Per process (config: tokens per CPU-s / tokens/s wall / same-batch peak MiB / run peak MiB / eval loss):",
        "",
    ]
    for config, runs in results.items():
        cells = ", ".join(
            "failed"
            if "failed" in r
            else f"{r['tokens_per_cpu_s']:.1f} / {r['tokens_per_s']:.1f} / {r['same_batch_peak_mib']:.0f} / "
            f"{r['peak_above_model_mib']:.0f} / {r['eval_loss']:.4f}"
            for r in runs
        )
        lines.append(f"- `{config}`: {cells}")
    for runs in results.values():
        lines += [f"\nFailure of `{r['config']}`:\n\n```\n{r['failed']}\n```" for r in runs if "failed" in r]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=CONFIGS, dest="config")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=1, help="first steps left out of tokens/s")
    # No learning-rate warm-up by default: transformers' schedule starts at 0 and peftkit's at lr/warmup,
    # so over a few steps they would differ; without warm-up both decay linearly from lr alike.
    parser.add_argument("--warmup", type=int, default=0, help="learning-rate warm-up steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    # One thread: a process's CPU time is then the work it did, whatever else runs on the machine.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="one round of 3 steps")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.config:
        sys.stdout.write(RESULT + json.dumps(worker(args)) + "\n")
        return
    if args.quick:
        args.rounds, args.steps, args.warmup_steps = 1, 3, 1
    from peftkit.assets import resolve_model

    resolve_model("smollm2")  # converted once, before any worker is timed
    start = time.perf_counter()
    results: dict[str, list[dict]] = {c: [] for c in args.configs}
    for round_ in range(args.rounds):
        for method in ("lora", "qlora"):
            pair = [c for c in (f"peftkit-{method}", f"hf-{method}") if c in args.configs]
            for config in pair if round_ % 2 == 0 else pair[::-1]:
                result = run_config(config, args)
                results[config].append(result)
                _write(results, args, start)
                if "failed" in result:
                    print(f"round {round_ + 1} {config} failed: {result['failed'][-500:]}", flush=True)
                    continue
                print(
                    f"round {round_ + 1} {config}: {result['tokens_per_cpu_s']:.1f} tokens per CPU-s, "
                    f"{result['tokens_per_s']:.1f} tokens/s, {result['same_batch_peak_mib']:.0f} MiB same-batch "
                    f"peak, loss {result['eval_loss']:.4f}",
                    flush=True,
                )
    print(_write(results, args, start))


def _write(results: dict[str, list[dict]], args, start: float) -> str:
    """The report so far; written after every worker, so a run cut short keeps what it measured."""
    command = "python -m benchmarks.llm_finetune " + " ".join(sys.argv[1:])
    report = markdown(results, args, command, time.perf_counter() - start)
    if args.output:
        args.output.write_text(report)
        args.output.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
