"""Peak memory per process of ``peftkit train`` with 2 processes: FSDP (``--fsdp``) against DDP.

    /work/wt/heavy .venv/bin/python -m benchmarks.fsdp_memory --output benchmarks/results/fsdp_memory.md

Each launch is ``torchrun --standalone --nproc_per_node 2`` of this module's ``--worker``, which runs
peftkit's own training run (:class:`peftkit.training.run.TrainingRun`: the same code as ``peftkit train``)
on the bundled SmolLM2-135M (fp32 in memory, 540 MB of weights: they dominate a LoRA run) with LoRA on all
linear layers, batch 1 x 64 tokens per process, ``--steps`` optimizer steps. The two modes alternate
(DDP, FSDP, DDP, FSDP, ...) for ``--rounds`` rounds; the table gives each launch and the medians.

Memory is each process's resident set, measured the same way in both modes (Linux ``VmRSS`` / ``VmHWM``):
- load peak: the high-water mark up to the first step (loading the model, adding the adapter, sharding);
- training peak: the high-water mark of the optimizer steps, reset just before the first one (clear_refs),
  so it covers the steps, the validation at the end of them and the checkpoint written there;
- held at step 0: the resident set when the steps start (after sharding, for FSDP);
- all processes together: the launch's peak of its processes' resident sets summed (torchrun's agent and
  both workers, sampled every 20 ms), what the machine must hold at once. With ``--fsdp`` the processes load
  and shard the base one after another (:func:`peftkit.training.fsdp.in_turn`); with DDP they load at once.
glibc's malloc is pinned to mmap for blocks >= 64 KiB so freed tensors go back to the system and RSS means
what is live.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = ("ddp", "fsdp")
RESULT = "RESULT "
MODEL, DATASET = "smollm2", "chatterbot"
DESCRIPTIONS = {"smollm2": "bundled SmolLM2-135M (134.5 M parameters, fp32 in memory: 538 MB of weights)"}


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(mode: str, steps: int, output_dir: str, model: str, dataset: str) -> None:
    """One process of a launch: train, then print its memory as a ``RESULT`` JSON line."""
    from peftkit.training.config import TrainConfig
    from peftkit.training.run import TrainingRun

    config = TrainConfig.from_sources(
        None,
        dict(
            model=model,
            dataset=dataset,
            task="causal-lm",
            method="lora",
            fsdp=mode == "fsdp",
            max_steps=steps,
            batch_size=1,
            max_length=64,
            limit=64,
            eval_every=steps,
            save_every=steps,
            eval_limit=2,
            eval_batch_size=2,
            dropout=0.0,
            output_dir=output_dir,
        ),
    )
    run = TrainingRun.prepare(config, log=lambda *_: None)
    load_peak, held = _status_mib("VmHWM"), _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    started = time.perf_counter()
    run.fit()
    seconds = time.perf_counter() - started
    train_peak = _status_mib("VmHWM")
    record = dict(
        mode=mode,
        rank=run.dist.rank,
        load_peak_mib=load_peak,
        held_mib=held,
        train_peak_mib=train_peak,
        fit_seconds=seconds,
        last_loss=run.loss_curve[-1][1],
    )
    run.dist.barrier()
    run.dist.shutdown()
    run.close()
    print(RESULT + json.dumps(record), flush=True)


def _tree_rss_mib(root: int) -> float:
    """The resident sets of ``root`` and every process below it, summed (a process gone meanwhile counts 0)."""
    total, pending = 0.0, [root]
    while pending:
        pid = pending.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        total += next(
            (int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0
        )
        pending += [int(child) for child in children]
    return total


def launch(mode: str, steps: int, model: str, dataset: str) -> list[dict]:
    """One 2-process launch; each process's record, with the launch's peak of all its processes' resident
    sets summed (sampled every 20 ms: what the machine must hold at once)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    torchrun = Path(sys.executable).parent / "torchrun"
    with tempfile.TemporaryDirectory(prefix="fsdp-memory-") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        with out.open("w") as stdout, err.open("w") as stderr:
            process = subprocess.Popen(
                [
                    *(str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "benchmarks.fsdp_memory"),
                    *("--worker", mode, "--steps", str(steps), "--run-dir", str(Path(folder) / "run")),
                    *("--model", model, "--dataset", dataset),
                ],
                stdout=stdout,
                stderr=stderr,
                env=env,
            )
            launch_peak = 0.0
            while process.poll() is None:
                launch_peak = max(launch_peak, _tree_rss_mib(process.pid))
                time.sleep(0.02)
        if process.returncode != 0:
            raise RuntimeError(f"{mode} launch failed:\n{err.read_text()[-4000:]}")
        lines = out.read_text().splitlines()
    records = [json.loads(line[len(RESULT) :]) for line in lines if line.startswith(RESULT)]
    for record in records:
        record["launch_peak_mib"] = launch_peak
    return sorted(records, key=lambda r: r["rank"])


def report(launches: list[list[dict]], command: str, steps: int, model: str) -> str:
    rows = [
        "| launch | mode | rank | load peak | held at step 0 | training peak | fit time | last loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for number, records in enumerate(launches, 1):
        for r in records:
            rows.append(
                f"| {number} | {r['mode']} | {r['rank']} | {r['load_peak_mib']:,.0f} MiB | {r['held_mib']:,.0f} MiB"
                f" | {r['train_peak_mib']:,.0f} MiB | {r['fit_seconds']:.1f} s | {r['last_loss']:.4f} |"
            )

    def median(mode: str, key: str) -> float:  # the larger process of each launch: what must fit
        return statistics.median(max(r[key] for r in rec) for rec in launches if rec[0]["mode"] == mode)

    launch_rows = [
        f"| {n} | {rec[0]['mode']} | {rec[0]['launch_peak_mib']:,.0f} MiB |"
        for n, rec in enumerate(launches, 1)
    ]

    lines = [
        "# FSDP vs DDP: peak memory per process",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}; torch "
        f"{torch.__version__}. 2 processes (torchrun, gloo, CPU), {DESCRIPTIONS.get(model, model)}, "
        f"LoRA r=8 on all linear layers, batch 1 x 64 tokens per process, {steps} optimizer steps, "
        "modes alternating launch by launch.",
        "",
        *rows,
        "",
        "Each launch's peak of all its processes together (torchrun's agent and the 2 workers, resident sets "
        "summed, sampled every 20 ms):",
        "",
        "| launch | mode | all processes, peak |",
        "|---|---|---|",
        *launch_rows,
        "",
        "Medians over launches (per process: the larger process of each launch):",
        "",
        "| | DDP | FSDP | FSDP / DDP |",
        "|---|---|---|---|",
    ]
    for key, label in (
        ("train_peak_mib", "training peak, per process"),
        ("held_mib", "held at step 0, per process"),
        ("load_peak_mib", "load peak, per process"),
        ("launch_peak_mib", "all processes together, peak"),
    ):
        ddp, fsdp = median("ddp", key), median("fsdp", key)
        lines.append(f"| {label} | {ddp:,.0f} MiB | {fsdp:,.0f} MiB | **{fsdp / ddp:.2f}x** |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="DDP + FSDP launches, alternating")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output", type=Path, help="write the markdown report here")
    parser.add_argument("--model", default=MODEL, help="a bundled model or a local folder (a smoke test)")
    parser.add_argument("--dataset", default=DATASET)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.run_dir, args.model, args.dataset)
        return
    launches = []
    for _ in range(args.rounds):
        for mode in MODES:
            launches.append(launch(mode, args.steps, args.model, args.dataset))
            print(json.dumps(launches[-1]), flush=True)
    command = "python -m benchmarks.fsdp_memory " + " ".join(sys.argv[1:])
    text = report(launches, command, args.steps, args.model)
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
