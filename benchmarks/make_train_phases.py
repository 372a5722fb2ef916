"""One whole `peftkit train` run with the CPU time of each of its phases.

    OMP_NUM_THREADS=1 python -m benchmarks.make_train_phases OUTPUT_DIR [--settings '{"group_by_length": false}']

The run is `peftkit train`'s (``TrainingRun.prepare``, ``fit``, ``finish``) with the defaults, or the settings
given as JSON. It prints one JSON line: the process's CPU seconds (``time.process_time``) for the imports,
``prepare`` (data, tokenizer, model, max length, batch order), the optimizer steps, the validations, the
checkpoints, ``finish`` and its test evaluation, the whole process, its wall seconds, and the test metrics.
On one thread and a shared machine the CPU time is the measure that the load moves least; the accuracy is
seeded and does not depend on the load at all.
"""

from __future__ import annotations

import time

STARTED_CPU, STARTED_WALL = time.process_time(), time.perf_counter()

import argparse  # noqa: E402  (after the clocks start: the imports are part of what is measured)
import json  # noqa: E402
from collections.abc import Callable  # noqa: E402

from peftkit.training.config import TrainConfig  # noqa: E402
from peftkit.training.run import TrainingRun  # noqa: E402

IMPORTS_CPU = time.process_time() - STARTED_CPU


def _timed(spent: dict[str, float], name: str, function: Callable) -> Callable:
    """``function``, adding its CPU seconds to ``spent[name]`` on every call."""

    def timed(*args, **kwargs):
        start = time.process_time()
        try:
            return function(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.process_time() - start

    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="the run's folder (must not hold a run)")
    parser.add_argument("--settings", default="{}", help="TrainConfig settings as JSON (default: none)")
    args = parser.parse_args()
    settings = json.loads(args.settings)
    spent = {"imports": IMPORTS_CPU}
    prepare = _timed(spent, "prepare", TrainingRun.prepare)
    run = prepare(TrainConfig(output_dir=args.output_dir, **settings))
    run._step = _timed(spent, "steps", run._step)
    run._validate = _timed(spent, "validations", run._validate)
    run._save_checkpoint = _timed(spent, "checkpoints", run._save_checkpoint)
    _timed(spent, "fit", run.fit)()
    run.evaluate = _timed(spent, "test_evaluation", run.evaluate)
    result = _timed(spent, "finish", run.finish)()
    print(
        json.dumps(
            {
                "settings": settings,
                "cpu_s": {k: round(v, 1) for k, v in spent.items()},
                "process_cpu_s": round(time.process_time() - STARTED_CPU, 1),
                "wall_s": round(time.perf_counter() - STARTED_WALL, 1),
                "test": result.test_metrics,
            }
        )
    )


if __name__ == "__main__":
    main()
