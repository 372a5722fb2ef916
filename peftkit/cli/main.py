"""Entry point of the `peftkit` command.

Only the subcommand being run builds its full parser: the others are listed by name and one line, without
importing their modules, so that ``peftkit --help`` (and ``peftkit eval ...``) never pays for torch and
transformers until a command needs them (training's flags come from the methods' declarations, which live
beside the methods' torch code)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable, Sequence

from peftkit import __version__

# subcommand -> (the module whose add_parser(subparsers) builds it, the line `peftkit --help` shows)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("peftkit.cli.train", "fine-tune with an adapter method"),
    "eval": ("peftkit.cli.evaluate", "evaluate a trained run's adapter on a dataset split"),
    "predict": ("peftkit.cli.predict", "label or tag given texts with a trained run's adapter"),
    "generate": ("peftkit.cli.predict", "generate from given prompts with a trained run's adapter"),
    "demo": ("peftkit.cli.demo", "train, save, reload, merge and mix LoRA adapters on a tiny model"),
    "compare": ("peftkit.cli.compare", "compare methods side by side"),
    "serve": ("peftkit.cli.serve", "serve a base model and many adapters over an OpenAI-compatible HTTP API"),
    "plan": ("peftkit.cli.plan", "choose a method before training"),
}


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``peftkit`` parser. The subcommands in ``commands`` (None: all of them) get their full parser
    from their module; the others only their name and help line, so that their modules stay unimported."""
    parser = argparse.ArgumentParser(
        prog="peftkit", description="Parameter-efficient fine-tuning of transformer models."
    )
    parser.add_argument("--version", action="version", version=f"peftkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    listed = _Listed(subparsers)
    full = set(COMMANDS) if commands is None else set(commands)
    for module in dict.fromkeys(COMMANDS[name][0] for name in COMMANDS if name in full):
        importlib.import_module(module).add_parser(listed)
    for name in COMMANDS:
        if name not in subparsers.choices:
            listed.add_parser(name)
    order = {name: i for i, name in enumerate(COMMANDS)}
    subparsers._choices_actions.sort(key=lambda action: order[action.dest])
    return parser


class _Listed:
    """The subparsers action as the subcommand modules see it: each command gets its help line from
    :data:`COMMANDS`."""

    def __init__(self, subparsers: argparse._SubParsersAction) -> None:
        self.subparsers = subparsers

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self.subparsers.add_parser(
            name, help=COMMANDS[name][1], formatter_class=DefaultsFormatter, **kwargs
        )


class DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's help ends with its default, unless the text states it already or there is none; the
    description keeps its own line breaks (the modules' docstrings, examples included)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default in (None, False, [], ()):
            return text
        if action.default is argparse.SUPPRESS or isinstance(action, argparse._StoreFalseAction):
            return text  # a --no-x flag's default True would read as "--no-x is on"
        return f"{text} (default: %(default)s)"


def command_in(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option of ``peftkit`` itself."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv``; the exit status (2: bad input, reported without a traceback)."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = command_in(argv)
    parser = build_parser([chosen] if chosen in COMMANDS else [])
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
