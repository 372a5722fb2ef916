"""`peftkit eval`: a trained run's adapter on a split of its dataset."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", description=__doc__)
    parser.add_argument("run_dir", help="the --output-dir of a `peftkit train` run")
    parser.add_argument(
        "--split", choices=("validation", "test"), default="test", help="the split of the run's dataset"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from peftkit.data import Columns, load_splits
    from peftkit.data.model_checks import check_splits
    from peftkit.training.finished import finished_folder, from_record, load_run

    folder = finished_folder(args.run_dir)
    config = folder.read_config()
    splits = from_record(  # before the model: a data set that moved is reported at once
        folder,
        f"data set {config.dataset!r}",
        lambda: load_splits(
            config.dataset, config.task, Columns(**config.columns), seed=config.split_seed, limit=config.limit
        ),
    )
    check_splits(splits, config.limit)  # an empty split would divide by zero in the metrics
    if config.train_size is not None:  # the training examples the run kept (validation and test: whole)
        splits = splits.with_train_size(config.train_size)
    run = load_run(args.run_dir, log=_note)
    metrics = run.task.evaluate(
        run.model,
        getattr(splits, args.split),
        run.tokenizer,
        batch_size=config.eval_batch_size,
        max_length=config.max_length,
        label_names=run.label_names,
    )
    print(json.dumps(metrics, indent=2, default=str))
    return 0


def _note(message: str) -> None:
    print(message, file=sys.stderr)
