"""What `check_finite` (the trainable parameters' finiteness after each optimizer step, on by default in
`peftkit train`) costs per training step: two runs of the same settings in one process, one with the check
and one without, their steps alternating in rounds; medians after a warm-up.

    python -m benchmarks.finite_check --output benchmarks/results/finite_check.md

Models: a tiny BERT built from a config (hidden 32, 2 layers: the check's fixed cost against the smallest
step) and the bundled MiniLM (22M parameters, LoRA r=8 on all linear layers: a real encoder's step).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from peftkit.training.config import TrainConfig
from peftkit.training.run import TrainingRun
from tests import pipeline_fixtures as fx


def _config(model: str, data: Path, out: Path, check: bool) -> TrainConfig:
    return TrainConfig.from_sources(
        None,
        dict(
            model=model,
            dataset=str(data),
            task="sequence-classification",
            columns={"text": "review", "label": "sentiment"},
            limit=None,
            max_steps=10**6,
            batch_size=8,
            max_length=32,
            target_modules="all-linear",
            output_dir=str(out),
            check_finite=check,
        ),
    )


def _seconds_per_step(run: TrainingRun, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        run._step()
    return (time.perf_counter() - start) / steps


def measure(model: str, data: Path, root: Path, rounds: int, steps: int) -> dict[str, float]:
    runs = {
        check: TrainingRun.prepare(
            _config(model, data, root / f"{Path(model).name}-{check}", check), lambda _: None
        )
        for check in (True, False)
    }
    for run in runs.values():
        _seconds_per_step(run, 5)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    for index in range(rounds):
        order = (True, False) if index % 2 == 0 else (False, True)
        for check in order:
            times[check].append(_seconds_per_step(runs[check], steps))
    for run in runs.values():
        run.close()
    alone = []  # the check by itself, many times: its cost without the step's noise
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(50):
            runs[True].finite.problem()
        alone.append((time.perf_counter() - start) / 50)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    parameters = len(runs[True].finite.named)
    return {
        "on_ms": on * 1e3,
        "off_ms": off * 1e3,
        "ratio": on / off,
        "tensors": parameters,
        "check_ms": statistics.median(alone) * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="steps per run per round")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = fx.sentiment_csv(root / "reviews.csv", rows=400)
        models = {
            "tiny BERT (hidden 32, 2 layers)": str(fx.tiny_bert(root / "bert")),
            "MiniLM (22M)": "minilm",
        }
        rows = {name: measure(model, data, root, args.rounds, args.steps) for name, model in models.items()}
    lines = [
        "# check_finite: cost per optimizer step",
        "",
        f"Command: `python -m benchmarks.finite_check --rounds {args.rounds} --steps {args.steps}`"
        f" (run through the shared slot queue, 1 torch thread). torch {torch.__version__}, Python "
        f"{platform.python_version()}, {platform.machine()}; LoRA r=8 all-linear, batch 8, 32 tokens; "
        f"medians of {args.rounds} alternating rounds of {args.steps} steps after 5 warm-up steps.",
        "",
        "| model | trainable tensors checked | the check alone (ms) | step with check (ms) | without (ms) "
        "| with / without |",
        "|---|---|---|---|---|---|",
        *[
            f"| {name} | {r['tensors']} | {r['check_ms']:.3f} | {r['on_ms']:.2f} | {r['off_ms']:.2f} "
            f"| **{r['ratio']:.3f}x** |"
            for name, r in rows.items()
        ],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
