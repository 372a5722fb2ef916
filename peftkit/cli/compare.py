"""`peftkit compare`: train several methods on the same model, data, budget and seeds, each run in its own
process, and write one table (results.md / .csv / .json) and charts (PNG) into --output-dir. With no
arguments: MiniLM on Rotten Tomatoes with full fine-tuning, LoRA, IA3, BitFit, bottleneck adapters, layer
tuning, prompt tuning, P-tuning, prefix tuning and P-tuning v2. The training flags below apply to every method; each method starts from its own learning rate
(peftkit/lab/defaults.py) unless --learning-rate or --method-setting says otherwise."""

from __future__ import annotations

import argparse
import shlex
import sys
import typing
from pathlib import Path

import yaml

from peftkit.cli.train import _parser_for, add_config_flags, config_from_args
from peftkit.config import ConfigError
from peftkit.training.config import TrainConfig

DEFAULT_OUTPUT = "runs/compare"
PER_RUN = {"method": "--methods", "seed": "--seeds"}  # set by the lab for each run


def add_parser(subparsers) -> None:
    from peftkit.lab.defaults import DEFAULT_METHODS

    parser = subparsers.add_parser("compare", help="compare methods side by side", description=__doc__)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        help=f"methods to compare (default: {' '.join(DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="seeds; each method runs once per seed (default: 0)"
    )
    parser.add_argument(
        "--method-setting",
        action="append",
        default=[],
        metavar="METHOD.SETTING=VALUE",
        help="a setting for one method only, e.g. full.learning_rate=3e-5 (repeatable)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier comparison in --output-dir"
    )
    parser.add_argument(
        "--resume",
        dest="resume_comparison",
        action="store_true",
        help="reuse the runs of an earlier comparison in --output-dir that finished with the same settings; "
        "run the others (new, changed, failed or interrupted)",
    )
    parser.add_argument("--latency-batch", type=int, default=16, help="rows of the timed inference batch")
    parser.add_argument("--latency-repeats", type=int, default=20, help="timed forward passes per variant")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before one run is stopped")
    parser.add_argument(
        "--config", help="a YAML file of training settings for every method (flags override it)"
    )
    add_config_flags(parser, exclude=frozenset({"resume"}))  # the lab's --resume reuses finished runs
    for action in parser._actions:  # per-run settings: the lab sets them
        if action.dest in PER_RUN:
            action.help = argparse.SUPPRESS
        elif action.dest == "output_dir":
            action.help = f"the comparison's folder: tables, charts, runs/ (default: {DEFAULT_OUTPUT})"
    parser.set_defaults(run=run)


def parse_method_settings(items: list[str], methods: list[str]) -> dict[str, dict]:
    """``["full.learning_rate=3e-5", "lora.r=16"]`` -> ``{"full": {"learning_rate": 3e-5}, "lora": {"r": 16}}``
    (each value read as the setting's type, as its own flag would read it)."""
    kinds = typing.get_type_hints(TrainConfig)
    settings: dict[str, dict] = {}
    for item in items:
        key, equals, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not (equals and dot and method and name):
            raise ConfigError(f"--method-setting expects METHOD.SETTING=VALUE, got {item!r}")
        if method not in methods:
            raise ConfigError(f"--method-setting {item!r}: {method!r} is not one of --methods {methods}")
        name = name.replace("-", "_")
        if name not in kinds or name in PER_RUN or name == "columns":
            allowed = sorted(set(kinds) - set(PER_RUN) - {"columns"})
            raise ConfigError(f"--method-setting {item!r}: unknown setting {name!r}; known: {allowed}")
        if kinds[name] is bool:
            settings.setdefault(method, {})[name] = _boolean(item, value)
        else:
            try:
                settings.setdefault(method, {})[name] = _parser_for(kinds[name])(value)
            except ValueError as error:
                raise ConfigError(f"--method-setting {item!r}: {error}") from None
    return settings


def _boolean(item: str, value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise ConfigError(f"--method-setting {item!r}: expected true or false")
    return value.lower() == "true"


def run(args: argparse.Namespace) -> int:
    from peftkit.lab import default_method_settings, run_comparison

    for name, instead in PER_RUN.items():
        if getattr(args, name) is not None:
            raise ConfigError(f"`peftkit compare` sets {name} for each run; use {instead}")
    methods = [m for item in args.methods for m in item.split(",") if m]
    base = config_from_args(args)
    chosen = {k for k, v in vars(args).items() if v is not None}  # flags given for every method
    if args.config:
        chosen |= set(yaml.safe_load(Path(args.config).read_text()) or {})
    settings = default_method_settings(methods, keep=chosen, dataset=base.dataset)
    for method, values in parse_method_settings(args.method_setting, methods).items():
        settings[method].update(values)
    output_dir = args.output_dir or DEFAULT_OUTPUT
    comparison = run_comparison(
        base,
        methods,
        args.seeds,
        output_dir,
        settings,
        overwrite=args.overwrite,
        resume=args.resume_comparison,
        latency_batch=args.latency_batch,
        latency_repeats=args.latency_repeats,
        timeout=args.timeout,
        context={"command": "peftkit " + shlex.join(sys.argv[1:])} if sys.argv[1:2] == ["compare"] else None,
    )
    table = (Path(output_dir) / "results.md").read_text()
    print("\n" + table[table.index("| method") :])
    print("written:", ", ".join(str(p) for p in comparison.files))
    failed = [r for r in comparison.rows if r.status != "ok"]
    for row in failed:
        print(f"{row.method}: {row.status}: {row.error}", file=sys.stderr)
    return 1 if len(failed) == len(comparison.rows) else 0
