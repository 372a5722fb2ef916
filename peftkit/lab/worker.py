"""One run of a comparison, in a process of its own (so that its peak memory is its own).

``python -m peftkit.lab.worker RUN_DIR`` trains with the run's saved settings (``peftkit train``'s life
cycle), then reloads the saved adapter on a fresh base and times inference (and, with ``--retain-text``, scores
its retained general ability, :mod:`peftkit.lab.retain`), and writes the lab's record of the run into its folder (:meth:`RunFolder.write_lab_record`): ``{"status": "ok", "result": <TrainResult>,
"latency": ..., ...}``; a run that fails writes its error there instead and exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from peftkit.training.layout import RunFolder


def run(
    run_dir: Path,
    latency_batch: int,
    latency_repeats: int,
    retain: dict[str, Any] | None = None,
    test_limit: int | None = None,
) -> dict[str, Any]:
    """Train the run in ``run_dir`` and time its reloaded adapter (and score its retained ability on
    ``retain``'s text, see :func:`peftkit.lab.retain.evaluate_retention`); the lab's record of it. With
    ``test_limit``, only the first records of the test split are scored."""
    import torch

    from peftkit.lab.latency import measure_latency
    from peftkit.training.finished import load_run
    from peftkit.training.run import TrainingRun

    folder = RunFolder(run_dir)
    training = TrainingRun.prepare(folder.read_config())
    if test_limit is not None:  # a fixed subset: the test split is the same for every run of one data seed
        training.splits = dataclasses.replace(training.splits, test=training.splits.test[:test_limit])
    training.fit()
    result = training.finish()

    loaded = load_run(run_dir)  # the adapter as saved, on a fresh base
    splits, config = training.splits, training.config
    records = (splits.test or splits.validation or splits.train)[:latency_batch]
    torch.manual_seed(config.seed)
    batch = loaded.task.collate(records, loaded.tokenizer, config.max_length)
    latency = measure_latency(loaded.model, batch, repeats=latency_repeats)
    retained = None
    if retain is not None:
        from peftkit.assets import resolve_model
        from peftkit.lab.retain import evaluate_retention

        model_dir = resolve_model(config.model)
        retained = evaluate_retention(loaded.model, loaded.task.name, loaded.tokenizer, retain, model_dir)
    return {
        "status": "ok",
        "retained": retained,
        "test_limit": test_limit,
        "result": result.to_dict(),
        "latency": asdict(latency),
        "latency_batch": len(records),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    """The worker's command line; exit status 0 when the run succeeded, 1 when its error was recorded."""
    parser = argparse.ArgumentParser(prog="python -m peftkit.lab.worker", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--latency-batch", type=int, default=16, help="rows of the timed inference batch")
    parser.add_argument("--latency-repeats", type=int, default=20, help="timed forward passes per variant")
    parser.add_argument("--test-limit", type=int, help="test records scored (default: all)")
    parser.add_argument("--retain-text", help="general text to score the trained model on (forgetting)")
    parser.add_argument("--retain-tokens", type=int, help="tokens of it scored")
    parser.add_argument("--retain-length", type=int, help="tokens per scored window")
    args = parser.parse_args(argv)
    folder = RunFolder(args.run_dir)
    retain = None
    if args.retain_text is not None:
        retain = {"text": args.retain_text, "tokens": args.retain_tokens, "length": args.retain_length}
    try:
        record = run(args.run_dir, args.latency_batch, args.latency_repeats, retain, args.test_limit)
    except Exception as error:  # reported as a failed run in the comparison, never raised past it
        traceback.print_exc()
        folder.write_lab_record({"status": "failed", "error": f"{type(error).__name__}: {error}"})
        return 1
    folder.write_lab_record(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
