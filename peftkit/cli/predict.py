"""`peftkit predict` (labels or tags) and `peftkit generate` (text): a trained run's adapter on given inputs."""

from __future__ import annotations

import argparse
import json
import sys

from peftkit.cli.readers import positive_int
from peftkit.config import ConfigError


def add_parser(subparsers) -> None:
    for name in ("predict", "generate"):
        parser = subparsers.add_parser(name, description=__doc__)
        parser.add_argument("run_dir", help="the --output-dir of a `peftkit train` run")
        parser.add_argument("inputs", nargs="*", help="texts or prompts (default: one per line on stdin)")
        parser.add_argument(
            "--max-new-tokens",
            type=positive_int,
            default=64,
            help="tokens generated per prompt (causal-lm, seq2seq), >= 1",
        )
        parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from peftkit.training.finished import load_run

    run = load_run(args.run_dir, log=lambda message: print(message, file=sys.stderr))
    inputs = args.inputs or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not inputs:
        raise ConfigError("no inputs: give texts as arguments, or one per line on stdin (none came)")
    outputs = run.task.predict(
        run.model,
        inputs,
        run.tokenizer,
        max_length=run.config.max_length,
        label_names=run.label_names,
        max_new_tokens=args.max_new_tokens,
    )
    for text, output in zip(inputs, outputs, strict=True):
        print(json.dumps({"input": text, "output": output}, ensure_ascii=False))
    return 0
