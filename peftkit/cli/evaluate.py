"""`peftkit eval`: a trained run's adapter on a split of its dataset."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a trained run's adapter on a dataset split")
    parser.add_argument("run_dir", help="the --output-dir of a `peftkit train` run")
    parser.add_argument("--split", choices=("validation", "test"), default="test")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from peftkit.data import Columns, load_splits
    from peftkit.training.loop import load_run

    config, task, tokenizer, model, label_names = load_run(args.run_dir)
    splits = load_splits(
        config.dataset, config.task, Columns(**config.columns), seed=config.seed, limit=config.limit
    )
    metrics = task.evaluate(
        model,
        getattr(splits, args.split),
        tokenizer,
        batch_size=config.eval_batch_size,
        max_length=config.max_length,
        label_names=label_names,
    )
    print(json.dumps(metrics, indent=2, default=str))
    return 0
