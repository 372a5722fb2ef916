"""`peftkit demo`: LoRA end to end on a tiny model built locally (see peftkit/demo.py)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", description=__doc__)
    parser.add_argument("--output-dir", default="runs/demo-adapter", help="where the adapter is saved")
    parser.add_argument("--steps", type=_positive, default=600, help="training steps (default: 600)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny model, data and training")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from peftkit.demo import run_demo  # torch and transformers: only when the demo runs

    result = run_demo(args.output_dir, steps=args.steps, seed=args.seed)
    print(f"done in {result.seconds:.1f} s")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value
