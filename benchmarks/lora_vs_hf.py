"""Driver: LoRA in peftkit vs Hugging Face PEFT, every configuration in its own process, peers interleaved.

    python -m benchmarks.lora_vs_hf [--repeats 4] [--allocator auto|jemalloc|glibc] [--quick]
                                    [--output benchmarks/results/lora_vs_hf.md]

Runs the workers ``train_step`` (peftkit, hf, full fine-tuning), ``inference`` (peftkit, hf) and
``mixed_batch`` (peftkit, hf) on the BERT, GPT-2 and LLaMA-style models. Each repeat runs every configuration
once, the peers of one comparison back to back in an order that rotates from repeat to repeat (peftkit, hf,
then hf, peftkit, ...), so slow phases of the shared machine do not favour one library. Before each process
the driver waits (up to ``--quiet-wait`` seconds) for the machine's other load to drop below 25% of a core
per core, and records how busy it was. Every worker gets the same allocator (jemalloc via LD_PRELOAD with
decay disabled, or glibc's).

Prints the ratio tables and the targets; exits non-zero only when a worker fails to run (or the two libraries
do not wrap the same layers), never because of a timing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common, report

ROOT = Path(__file__).resolve().parent.parent
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2")
NO_DECAY = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
WORKERS = {"train": "train_step", "inference": "inference", "mixed": "mixed_batch"}
PEERS = {"train": ("peftkit", "hf", "full"), "inference": common.LIBRARIES, "mixed": common.LIBRARIES}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4, help="processes per configuration (default 4)")
    parser.add_argument(
        "--allocator",
        choices=("auto", "jemalloc", "glibc"),
        default="auto",
        help="jemalloc (LD_PRELOAD, no decay) for every worker; auto: jemalloc when installed, else glibc",
    )
    parser.add_argument("--measurements", default="train,inference,mixed", help="comma-separated subset")
    parser.add_argument("--models", default="bert,gpt2,llama", help="models for train and inference")
    parser.add_argument("--mixed-models", default="llama,bert", help="models for the mixed batch")
    parser.add_argument("--quick", action="store_true", help="one repeat, few calls: checks everything runs")
    parser.add_argument("--quiet-wait", type=float, default=30.0, help="max seconds to wait for a quiet CPU")
    parser.add_argument("--output", type=Path, help="write the results table here (and raw JSON beside it)")
    return parser.parse_args()


def allocator_env(choice: str) -> tuple[str, dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    found = next((p for p in JEMALLOC_PATHS if Path(p).exists()), None)
    if choice == "jemalloc" and found is None:
        sys.exit(f"jemalloc not found at {JEMALLOC_PATHS}; install libjemalloc2 or use --allocator glibc")
    if choice == "glibc" or found is None:
        return "glibc", env
    return "jemalloc", {**env, "LD_PRELOAD": found, "MALLOC_CONF": NO_DECAY}


def cpu_busy(interval: float = 0.5) -> float:
    """Fraction of all cores busy over ``interval`` seconds (from /proc/stat), while nothing of ours runs."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    busy0, total0 = sample()
    time.sleep(interval)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(total1 - total0, 1)


def wait_for_quiet(max_wait: float) -> float:
    deadline = time.monotonic() + max_wait
    busy = cpu_busy()
    while busy > 0.25 and time.monotonic() < deadline:
        time.sleep(1.0)
        busy = cpu_busy()
    return busy


def plan(args: argparse.Namespace) -> list[tuple[int, str, str, str]]:
    """(repeat, measurement, model, library) in run order: peers adjacent, their order rotating per repeat."""
    repeats = 1 if args.quick else args.repeats
    measurements = args.measurements.split(",")
    jobs = []
    for repeat in range(repeats):
        for measurement in measurements:
            models = (args.mixed_models if measurement == "mixed" else args.models).split(",")
            for model in models:
                peers = PEERS[measurement]
                shift = repeat % len(peers)
                jobs.extend((repeat, measurement, model, lib) for lib in peers[shift:] + peers[:shift])
    return jobs


def run_worker(job: tuple[int, str, str, str], env: dict[str, str], quick: bool) -> dict[str, Any]:
    repeat, measurement, model, library = job
    command = [sys.executable, "-m", f"benchmarks.{WORKERS[measurement]}", "--library", library]
    command += ["--model", model] + (["--quick"] if quick else [])
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith(common.RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout + done.stderr)
        sys.exit(f"worker failed (exit {done.returncode}): {shlex.join(command)}")
    return {**json.loads(lines[-1][len(common.RESULT_PREFIX) :]), "repeat": repeat}


def main() -> None:
    args = parse_args()
    allocator, env = allocator_env(args.allocator)
    jobs = plan(args)
    print(f"{len(jobs)} worker processes, allocator {allocator}, {common.THREADS} threads each", flush=True)
    started = time.monotonic()
    results = []
    for number, job in enumerate(jobs, 1):
        busy = wait_for_quiet(args.quiet_wait)
        result = run_worker(job, env, args.quick)
        if result["allocator"] != allocator:
            sys.exit(f"worker ran under {result['allocator']}, expected {allocator}")
        result["cpu_busy_before"] = busy
        results.append(result)
        print(f"[{number}/{len(jobs)}] {report.one_line(result)} (other load {busy:.0%})", flush=True)
    elapsed = time.monotonic() - started

    report.check_same_layers(results)
    context = report.context(
        command=shlex.join(["python", "-m", "benchmarks.lora_vs_hf", *sys.argv[1:]]),
        allocator=allocator,
        elapsed_s=elapsed,
        repeats=1 if args.quick else args.repeats,
        date=datetime.datetime.now().astimezone().isoformat(timespec="minutes"),
    )
    text = report.markdown(results, context)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        raw = {"context": context, "results": results}
        args.output.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
        print(f"wrote {args.output} and {args.output.with_suffix('.json')}")


if __name__ == "__main__":
    main()
