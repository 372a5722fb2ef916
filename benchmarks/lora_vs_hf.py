"""Driver: LoRA in peftkit vs Hugging Face PEFT, every configuration in its own process, peers interleaved.

    python -m benchmarks.lora_vs_hf [--repeats 3] [--allocator auto|jemalloc|glibc] [--quick]
                                    [--output benchmarks/results/lora_vs_hf.md]

Runs the workers ``train_step`` (peftkit, hf, full fine-tuning), ``inference`` (peftkit, hf) and
``mixed_batch`` (peftkit, hf) on the BERT, GPT-2 and LLaMA-style models; ``--measurements prompt`` runs
``train_step --method prompt_tuning`` and ``--method prefix_tuning`` (peftkit, hf) on the causal LMs. Each repeat runs every configuration
once, the peers of one comparison back to back in an order that rotates from repeat to repeat (peftkit, hf,
then hf, peftkit, ...), so slow phases of the shared machine do not favour one library. Before each process
the driver waits (up to ``--quiet-wait`` seconds) for other processes to leave the machine nearly idle, then
measures their load while the worker runs and reruns a disturbed worker (see ``load.py``). Every worker gets the same allocator (jemalloc via LD_PRELOAD with
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

from benchmarks import common, load, report

ROOT = Path(__file__).resolve().parent.parent
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2")
NO_DECAY = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
CONTENDED = 0.10  # a worker during which other processes used more than this of the machine is run again
PROMPT_METHODS = ("prompt_tuning", "prefix_tuning")  # what ``--measurements prompt`` stands for
WORKERS = {"train": "train_step", "inference": "inference", "mixed": "mixed_batch"}
WORKERS |= dict.fromkeys(PROMPT_METHODS, "train_step")
PEERS = {"train": ("peftkit", "hf", "full"), "inference": common.LIBRARIES, "mixed": common.LIBRARIES}
PEERS |= dict.fromkeys(PROMPT_METHODS, common.LIBRARIES)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="processes per configuration (default 3)")
    parser.add_argument(
        "--allocator",
        choices=("auto", "jemalloc", "glibc"),
        default="auto",
        help="jemalloc (LD_PRELOAD, no decay) for every worker; auto: jemalloc when installed, else glibc",
    )
    parser.add_argument(
        "--measurements", default="train,inference,mixed", help="comma-separated subset of these and prompt"
    )
    parser.add_argument("--models", default="bert,gpt2,llama", help="models for train and inference")
    parser.add_argument("--mixed-models", default="llama,bert", help="models for the mixed batch")
    parser.add_argument("--prompt-models", default="llama,gpt2", help="models for prompt and prefix tuning")
    parser.add_argument("--quick", action="store_true", help="one repeat, few calls: checks everything runs")
    parser.add_argument("--quiet-wait", type=float, default=30.0, help="max seconds to wait for a quiet CPU")
    parser.add_argument("--retries", type=int, default=2, help="reruns of a worker disturbed by other load")
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


def plan(args: argparse.Namespace) -> list[tuple[int, str, str, str]]:
    """(repeat, measurement, model, library) in run order: peers adjacent, their order rotating per repeat."""
    repeats = 1 if args.quick else args.repeats
    measurements = []
    for measurement in args.measurements.split(","):
        measurements += PROMPT_METHODS if measurement == "prompt" else (measurement,)
    models_of = {"mixed": args.mixed_models} | dict.fromkeys(PROMPT_METHODS, args.prompt_models)
    jobs = []
    for repeat in range(repeats):
        for measurement in measurements:
            models = models_of.get(measurement, args.models).split(",")
            for model in models:
                peers = PEERS[measurement]
                shift = repeat % len(peers)
                jobs.extend((repeat, measurement, model, lib) for lib in peers[shift:] + peers[:shift])
    return jobs


def run_worker(job: tuple[int, str, str, str], env: dict[str, str], quick: bool) -> dict[str, Any]:
    repeat, measurement, model, library = job
    command = [sys.executable, "-m", f"benchmarks.{WORKERS[measurement]}", "--library", library]
    command += ["--model", model] + (["--quick"] if quick else [])
    command += ["--method", measurement] if measurement in PROMPT_METHODS else []
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith(common.RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout + done.stderr)
        sys.exit(f"worker failed (exit {done.returncode}): {shlex.join(command)}")
    return {**json.loads(lines[-1][len(common.RESULT_PREFIX) :]), "repeat": repeat}


def run_until_quiet(job: tuple[int, str, str, str], env: dict[str, str], args: argparse.Namespace) -> dict:
    """Run the worker after waiting for a quiet machine; again (up to ``--retries`` times) when other
    processes took more than ``CONTENDED`` of the machine while it ran. Keeps the least disturbed run."""
    best = None
    for attempt in range(1, args.retries + 2):
        load.wait_for_quiet(args.quiet_wait)
        result, other = load.other_load(lambda: run_worker(job, env, args.quick))
        if best is None or other < best["other_load"]:
            best = {**result, "other_load": other, "attempts": attempt}
        if other <= CONTENDED or attempt > args.retries:
            break
        print(
            f"  {report.one_line(result)}: other processes used {other:.0%} of the machine, again", flush=True
        )
    return best


def main() -> None:
    args = parse_args()
    allocator, env = allocator_env(args.allocator)
    jobs = plan(args)
    print(f"{len(jobs)} worker processes, allocator {allocator}, {common.THREADS} threads each", flush=True)
    started = time.monotonic()
    results = []
    for number, job in enumerate(jobs, 1):
        result = run_until_quiet(job, env, args)
        if result["allocator"] != allocator:
            sys.exit(f"worker ran under {result['allocator']}, expected {allocator}")
        results.append(result)
        print(
            f"[{number}/{len(jobs)}] {report.one_line(result)} "
            f"(other load {result['other_load']:.0%}, attempt {result['attempts']})",
            flush=True,
        )
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
