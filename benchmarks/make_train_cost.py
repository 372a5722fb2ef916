"""The default run's cost on one CPU thread: random batches against length-grouped ones, interleaved.

    OMP_NUM_THREADS=1 python -m benchmarks.make_train_cost [--every 6] [--settings '{"max_steps": 300}']

One process prepares `peftkit train`'s default run (the settings given as JSON override the defaults) and
times optimizer steps (``TrainingRun._step``: collate, forward, backward, clipping, AdamW) on the batches of
two orders over the same training split: the seeded random order (``StepOrder`` without lengths, the
default before length grouping) and the run's own order. Every ``every``-th step of the run is taken from
both orders, alternating which goes first, so that the machine's load falls on both alike; time is the
process's CPU time (``time.process_time``), which the load inflates far less than the wall clock. Then the
evaluation (the test split and 500 validation records) in the data's order (the loop before sorting) and in
the task's own evaluation (sorted by length), twice each, alternating. It prints one JSON line: mean step
CPU seconds and padded tokens per step for each order, the evaluation CPU seconds, and whole-run estimates
(steps x mean step + the run's 3 x 500 validation and test records at the measured rate).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

import torch

from peftkit.data.batching import StepOrder
from peftkit.tasks.base import batches, model_device, to_device
from peftkit.training.config import TrainConfig
from peftkit.training.run import TrainingRun


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _timed_steps(run: TrainingRun, orders: dict[str, StepOrder], every: int) -> tuple[dict, dict]:
    """CPU seconds and padded tokens of every ``every``-th step, per order, the two orders alternating."""
    cost: dict[str, list[float]] = {name: [] for name in orders}
    tokens: dict[str, list[int]] = {name: [] for name in orders}
    lengths = orders["grouped"].lengths
    for k, step in enumerate([0, *range(1, run.total_steps, every)]):
        names = list(orders) if k % 2 == 0 else list(orders)[::-1]
        for name in names:
            run.sampler, run.progress.step = orders[name], step
            rows = orders[name].step_rows(step)
            start = time.process_time()
            run._step()
            if k > 0:  # step 0 of each order warms up (allocations, AdamW's state)
                cost[name].append(time.process_time() - start)
                tokens[name].append(max(lengths[i] for i in rows) * len(rows))
    return cost, tokens


def _unsorted_evaluation(run: TrainingRun, records: list[dict]) -> None:
    """The forward passes of the evaluation loop as it was: batches in the records' order."""
    run.model.eval()
    with torch.no_grad():
        for chunk in batches(records, run.config.eval_batch_size):
            batch = run.task.collate(chunk, run.tokenizer, run.config.max_length)
            run.model(**to_device(batch, model_device(run.model)))
    run.model.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=6, help="time every N-th step of the run (both orders)")
    parser.add_argument("--settings", default="{}", help="TrainConfig settings as JSON (default: none)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = tempfile.mkdtemp(prefix="make_train_cost_")
    try:
        config = TrainConfig(output_dir=folder, **json.loads(args.settings))
        run = TrainingRun.prepare(config, log=lambda _: None)
        grouped = run.sampler
        assert grouped.lengths is not None, "the run does not group by length"
        plain = StepOrder(len(run.splits.train), run.global_batch, config.seed)
        run.model.train()
        cost, tokens = _timed_steps(run, {"random": plain, "grouped": grouped}, args.every)
        records = run.splits.test + run.splits.validation[:500]
        evaluation: dict[str, list[float]] = {"unsorted": [], "sorted": []}
        for k in range(2):
            for name in ("unsorted", "sorted") if k == 0 else ("sorted", "unsorted"):
                start = time.process_time()
                _unsorted_evaluation(run, records) if name == "unsorted" else run.evaluate(records)
                evaluation[name].append(time.process_time() - start)
        run.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    evaluated = len(run.splits.test) + 3 * min(500, len(run.splits.validation))
    per_record = {name: min(v) / len(records) for name, v in evaluation.items()}
    before = run.total_steps * _mean(cost["random"]) + per_record["unsorted"] * evaluated
    after = run.total_steps * _mean(cost["grouped"]) + per_record["sorted"] * evaluated
    print(
        json.dumps(
            {
                "settings": json.loads(args.settings),
                "timed_steps_per_order": len(cost["random"]),
                "step_cpu_s": {k: round(_mean(v), 4) for k, v in cost.items()},
                "padded_tokens_per_step": {k: round(_mean(v), 1) for k, v in tokens.items()},
                "step_ratio": round(_mean(cost["grouped"]) / _mean(cost["random"]), 3),
                "evaluation_cpu_s": {k: round(min(v), 2) for k, v in evaluation.items()},
                "evaluated_records": len(records),
                "run_cpu_s_estimate": {
                    "random_unsorted": round(before, 1),
                    "grouped_sorted": round(after, 1),
                },
                "run_ratio": round(after / before, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
