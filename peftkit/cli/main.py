"""Entry point of the `peftkit` command."""

from __future__ import annotations

import argparse
import sys

from peftkit import __version__
from peftkit.cli import compare, demo, evaluate, plan, predict, serve, train

SUBCOMMANDS = [train, evaluate, predict, demo, compare, serve, plan]


def build_parser() -> argparse.ArgumentParser:
    """The ``peftkit`` parser, one subparser per module in :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="peftkit", description="Parameter-efficient fine-tuning of transformer models."
    )
    parser.add_argument("--version", action="version", version=f"peftkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv``; the exit status (2: bad input, reported without a traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:  # bad input: a clear message, no traceback
        print(f"peftkit {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
