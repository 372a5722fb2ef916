"""The language-model loss alone: peftkit's fused linear cross-entropy against the ordinary loss.

    nice -n 10 .venv/bin/python -m benchmarks.fused_loss --output benchmarks/results/fused_loss.md

SmolLM2-135M's head (hidden 576, vocabulary 49,152, fp32), batch 8 x 256 tokens, loss + backward to the
hidden states (the head frozen, as with LoRA), at equal batch:

- ``ordinary``: ``cross_entropy((hidden @ W.T).float(), labels)``, what transformers' ``ForCausalLMLoss`` does;
- ``peftkit``: :func:`peftkit.losses.linear_cross_entropy` (chunked, ignored tokens skipped);
- ``torch-chunked``: torch's own ``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions()`` (no label
  smoothing, so not peftkit's default; shown as a peer).

Time: the variants alternate in one process, median of ``--repeats`` after one warm-up each, as the process's
CPU time (one thread by default: on a shared machine the work done, which other jobs do not inflate) and as
wall time. Memory: each
variant once in a fresh process, the growth of the peak resident set (glibc pinned to mmap for blocks >=
64 KiB so that freed tensors leave the resident set). Two label settings: every token scored, and the first
half of each row ignored (a prompt).
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
import torch.nn.functional as F

HIDDEN, VOCAB, BATCH, TOKENS = 576, 49152, 8, 256
VARIANTS = ("ordinary", "peftkit", "torch-chunked")


def _inputs(prompt: bool):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(BATCH * TOKENS, HIDDEN, generator=g).requires_grad_()
    weight = torch.randn(VOCAB, HIDDEN, generator=g) * 0.02
    labels = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=g)
    if prompt:
        labels[:, : TOKENS // 2] = -100
    return hidden, weight, labels.reshape(-1)


def _step(variant: str, hidden, weight, labels) -> None:
    from peftkit.losses import linear_cross_entropy

    if variant == "ordinary":
        loss = F.cross_entropy((hidden @ weight.T).float(), labels)
    elif variant == "peftkit":
        loss = linear_cross_entropy(hidden, weight, labels)
    else:
        loss = F.linear_cross_entropy(hidden, weight, labels, options=torch.nn.LinearCrossEntropyOptions())
    loss.backward()
    hidden.grad = None


def _peak_worker(variant: str, prompt: bool) -> float:
    hidden, weight, labels = _inputs(prompt)
    small = hidden[:16].detach().requires_grad_()
    _step(variant, small, weight, labels[:16])  # first-call allocations outside the measurement
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    rss = _status("VmRSS")
    _step(variant, hidden, weight, labels)
    return (_status("VmHWM") - rss) / 2**20


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _peak(variant: str, prompt: bool) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    command = [sys.executable, "-m", "benchmarks.fused_loss", "--peak", variant] + (
        ["--prompt"] if prompt else []
    )
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def _times(prompt: bool, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median (CPU seconds, wall seconds) of each variant's step."""
    inputs = _inputs(prompt)
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    wall: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for variant in VARIANTS:
        _step(variant, *inputs)  # warm-up
    for _ in range(repeats):
        for variant in VARIANTS:
            tick, cpu_tick = time.perf_counter(), time.process_time()
            _step(variant, *inputs)
            cpu[variant].append(time.process_time() - cpu_tick)
            wall[variant].append(time.perf_counter() - tick)
    return (
        {v: statistics.median(s) for v, s in cpu.items()},
        {v: statistics.median(s) for v, s in wall.items()},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--peak", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--prompt", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak:
        print(_peak_worker(args.peak, args.prompt))
        return
    logits_mib = BATCH * TOKENS * VOCAB * 4 / 2**20
    lines = [
        "# Fused linear cross-entropy vs the ordinary loss",
        "",
        f"Command: `python -m benchmarks.fused_loss {' '.join(sys.argv[1:])}`",
        "",
        f"Head {HIDDEN} x {VOCAB:,} (SmolLM2-135M), batch {BATCH} x {TOKENS} tokens, fp32, loss + backward to "
        f"the hidden states, {args.threads} thread(s), median of {args.repeats}; torch {torch.__version__}. The "
        f"fp32 logits alone are {logits_mib:,.0f} MiB. Ratios are against the ordinary loss.",
        "",
        "| labels | variant | CPU s | CPU time ratio | wall s | wall ratio | peak MiB | memory ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    results = {}
    for prompt in (False, True):
        cpu, wall = _times(prompt, args.repeats)
        peaks = {v: _peak(v, prompt) for v in VARIANTS}
        label = "first half ignored" if prompt else "all scored"
        for v in VARIANTS:
            lines.append(
                f"| {label} | {v} | {cpu[v]:.3f} | **{cpu[v] / cpu['ordinary']:.2f}x** | {wall[v]:.3f} | "
                f"{wall[v] / wall['ordinary']:.2f}x | {peaks[v]:,.0f} | **{peaks[v] / peaks['ordinary']:.2f}x** |"
            )
        results[label] = {"cpu_seconds": cpu, "wall_seconds": wall, "peak_mib": peaks}
        print("\n".join(lines[-3:]), flush=True)
    report = "\n".join(lines) + "\n"
    print(report)
    if args.output:
        args.output.write_text(report)
        args.output.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
