"""`peftkit --help` starts without torch and friends, and every flag of every subcommand says what it takes:
help text, its choices, its unit (or what kind of number it is)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
import typing

import pytest

from peftkit.cli.main import COMMANDS, build_parser
from peftkit.method_spec import all_options
from peftkit.training.config import TrainConfig

HEAVY = ("torch", "transformers", "datasets", "matplotlib", "fastapi", "bitsandbytes", "peft", "safetensors")
# subcommands whose own --help needs no heavy module either (train and compare list every method's options,
# which are declared beside the methods' torch code)
LIGHT = ("eval", "predict", "generate", "demo", "serve", "plan")
# what a number on the command line counts or measures: a unit, or the kind of dimensionless number it is
UNITS = re.compile(
    r"\b(tokens?|steps?|examples?|records?|rows?|seconds?|passes|micro-batches|processes|validations?|"
    r"requests?|adapters?|classes|tasks|blocks|width|rank|probability|share|scale|norm|rate|coefficient|"
    r"seeds?|port|bytes|GiB|MiB)\b"
)


def _imported(code: str) -> set[str]:
    """Top-level packages a fresh interpreter imported while running ``code`` (``python -X importtime``)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True
    )
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)", done.stderr, flags=re.M)
    return {name.split(".")[0] for name in names}


def test_peftkit_help_imports_no_heavy_module():
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "peftkit.cli.main", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    imported = {n.split(".")[0] for n in re.findall(r"\|\s+(\S+)$", done.stderr, flags=re.M)}
    assert "peftkit" in imported  # the report was read
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    for name, (_, line) in COMMANDS.items():  # every command is listed, with its line
        assert re.search(rf"^\s+{name}\s+{re.escape(line[:30])}", done.stdout, flags=re.M), name


def test_light_subcommands_build_their_help_without_heavy_modules():
    code = (
        "from peftkit.cli.main import build_parser\n"
        f"for command in {LIGHT!r}:\n"
        "    parser = build_parser([command])\n"
        "    parser._subparsers._group_actions[0].choices[command].format_help()\n"
    )
    imported = _imported(code)
    assert "peftkit" in imported
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_the_library_stays_importable_lazily():
    """``import peftkit`` costs nothing heavy; a public name imports its module when first used."""
    assert not _imported("import peftkit") & set(HEAVY)
    import peftkit

    assert set(peftkit.__all__) <= set(dir(peftkit))
    assert peftkit.LoraConfig.__name__ == "LoraConfig"
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        peftkit.NoSuchThing  # noqa: B018


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()  # every command built in full
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _flags():
    for command, parser in _subparsers().items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue  # (SUPPRESS: accepted but unlisted on purpose, e.g. compare's --method)
            yield command, parser, action


def _numeric_settings() -> set[str]:
    """TrainConfig fields and method options that take a number."""
    hints = typing.get_type_hints(TrainConfig)
    fields = {
        f.name
        for f in dataclasses.fields(TrainConfig)
        if {int, float} & set(typing.get_args(hints[f.name]) or (hints[f.name],))
    }
    return fields | {name for name, (option, _) in all_options().items() if option.kind in (int, float)}


def test_every_command_is_built_and_listed():
    assert set(_subparsers()) == set(COMMANDS)


def test_every_flag_has_help_with_its_choices_and_unit():
    numeric = _numeric_settings()
    problems = []
    for command, parser, action in _flags():
        flag = f"{command} {action.option_strings[0] if action.option_strings else action.dest}"
        text = action.help or ""
        if len(text.split()) < 2:
            problems.append(f"{flag}: no help")
            continue
        rendered = parser.format_help()
        for choice in action.choices or ():
            if str(choice) not in rendered:
                problems.append(f"{flag}: choice {choice!r} is not shown")
        is_number = action.type in (int, float) or getattr(action.type, "__name__", "") in numeric
        if is_number and action.dest not in ("seed", "seeds") and not UNITS.search(text):
            problems.append(f"{flag}: a number without its unit: {text!r}")
    assert not problems, "\n".join(problems)


def test_defaults_are_shown():
    """A flag with a default shows it (in its own words or appended by the formatter)."""
    for command, parser, action in _flags():
        if action.option_strings and action.default not in (None, False, [], ()):
            options = parser.format_help().split("\noptions:", 1)[1]
            entry = options.split(f"\n  {action.option_strings[0]}", 1)[1].split("\n  -", 1)[0]
            assert "default" in entry, f"{command} {action.option_strings[0]}: {entry!r}"


def test_a_no_flag_never_reads_as_on_by_default():
    """A store_false ``--no-x`` flag's default (True) is the x's, not the flag's: the help says what the
    default does in words, never "(default: True)"."""
    seen = 0
    for command, parser, action in _flags():
        if isinstance(action, argparse._StoreFalseAction):
            seen += 1
            help_text = parser._get_formatter()._get_help_string(action) % {"default": action.default}
            assert "(default: True)" not in help_text and "default" in help_text, f"{command}: {help_text!r}"
    assert seen  # plan's --no-fused-loss at least
