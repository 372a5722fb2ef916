"""`peftkit compare`: train several methods on the same model, data, budget and seeds, each run in its own
process, and write one table (results.md / .csv / .json) and charts (PNG) into --output-dir. With no
arguments: MiniLM on Rotten Tomatoes with full fine-tuning, LoRA, IA3, BitFit, bottleneck adapters, layer
tuning, prompt tuning, P-tuning, prefix tuning and P-tuning v2. The training flags below apply to every method; each method starts from its own learning rate
(peftkit/lab/defaults.py) unless --learning-rate or --method-setting says otherwise."""

from __future__ import annotations

import argparse
import shlex
import sys

from peftkit.cli.flags import add_config_flags, overrides_from_args
from peftkit.config import ConfigError
from peftkit.method_spec import METHOD_SPECS, all_options, check_options
from peftkit.training.config import TrainConfig, parse_setting, split_settings

DEFAULT_OUTPUT = "runs/compare"
PER_RUN = {"method": "--methods", "seed": "--seeds", "train_size": "--train-sizes"}  # set for each run


def add_parser(subparsers) -> None:
    from peftkit.lab.defaults import DEFAULT_METHODS

    parser = subparsers.add_parser("compare", description=__doc__)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        help=f"methods to compare, from {', '.join(METHOD_SPECS)} (default: {' '.join(DEFAULT_METHODS)})",
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
    parser.add_argument(
        "--report",
        dest="report_only",
        action="store_true",
        help="train nothing: write the tables and charts of the runs of an earlier comparison in --output-dir "
        "that finished with these settings (one cut short), the others marked 'not run'",
    )
    _add_low_data_flags(parser)
    _add_retain_flags(parser)
    parser.add_argument(
        "--test-limit",
        type=int,
        help="test records scored per run: the first N of the test split, the same for every run of one "
        "data seed (default: all)",
    )
    parser.add_argument("--latency-batch", type=int, default=16, help="rows of the timed inference batch")
    parser.add_argument("--latency-repeats", type=int, default=20, help="timed forward passes per variant")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before one run is stopped")
    parser.add_argument(
        "--config", help="a YAML file of training settings for every method (flags override it)"
    )
    add_config_flags(
        parser,
        exclude=frozenset({"resume"}),  # the lab's --resume reuses finished runs
        hidden=frozenset(PER_RUN),  # per-run settings: the lab sets them
        help_for={
            "output_dir": f"the comparison's folder: tables, charts, runs/ (default: {DEFAULT_OUTPUT})"
        },
    )
    parser.set_defaults(run=run)


def _add_low_data_flags(parser) -> None:
    """The low-data comparison's flags (docs/lab_results.md)."""
    parser.add_argument(
        "--train-sizes",
        nargs="+",
        type=int,
        metavar="N",
        help="low-data comparison: also run every method and seed on the first N training examples of one "
        "seeded shuffle (nested subsets, the same for every method and seed: --data-seed, default 0), for "
        "each N, with ceil(--epochs x N / global batch) optimizer steps, at least --min-steps and at most "
        "--max-steps",
    )
    parser.add_argument(
        "--min-steps",
        type=int,
        default=20,
        help="with --train-sizes: the fewest optimizer steps any size trains (default: 20)",
    )


def _add_retain_flags(parser) -> None:
    """The forgetting comparison's flags (docs/lab_results.md)."""
    parser.add_argument(
        "--retain-eval",
        metavar="TEXT",
        help="forgetting: after training, score each method's model (adapter active) and the base model on "
        "this general text, a .txt file or a built-in data set's texts (e.g. news_headlines): perplexity "
        "for causal LMs, the masked-LM loss for encoders whose checkpoint has a masked-LM head (lower is "
        "better for both); not applicable otherwise",
    )
    parser.add_argument(
        "--retain-tokens",
        type=int,
        default=8192,
        help="with --retain-eval: tokens of the text scored (default: 8192)",
    )
    parser.add_argument(
        "--retain-length",
        type=int,
        default=256,
        help="with --retain-eval: tokens per scored window, each token predicted from those before it in "
        "its window (default: 256)",
    )


def parse_method_settings(items: list[str], methods: list[str]) -> dict[str, dict]:
    """``["full.learning_rate=3e-5", "lora.r=16"]`` -> ``{"full": {"learning_rate": 3e-5}, "lora": {"r": 16}}``
    (each value read as the setting's type, as its own flag would read it). Raises ConfigError for a malformed
    item, a method not compared, an unknown setting, or an option the method does not take."""
    settings: dict[str, dict] = {}
    for item in items:
        key, equals, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not (equals and dot and method and name):
            raise ConfigError(f"--method-setting expects METHOD.SETTING=VALUE, got {item!r}")
        if method not in methods:
            raise ConfigError(f"--method-setting {item!r}: {method!r} is not one of --methods {methods}")
        name = name.replace("-", "_")
        if name in PER_RUN:
            raise ConfigError(f"--method-setting {item!r}: the lab sets {name!r} for each run")
        try:
            parsed = parse_setting(name, value)
            if name in all_options() and method in METHOD_SPECS:
                check_options(method, {name: parsed})
        except ConfigError as error:
            raise ConfigError(f"--method-setting {item!r}: {error}") from None
        settings.setdefault(method, {})[name] = parsed
    return settings


def run(args: argparse.Namespace) -> int:
    from peftkit.lab import default_method_settings, run_comparison
    from peftkit.lab.tables import markdown_table

    for name, instead in PER_RUN.items():
        if getattr(args, name) is not None:
            raise ConfigError(f"`peftkit compare` sets {name} for each run; use {instead}")
    methods = [m for item in args.methods for m in item.split(",") if m]
    given = TrainConfig.read_checked_settings(args.config) if args.config else {}
    given.update(overrides_from_args(args))  # only the flags given; `--max-steps none` is a None
    general, options = split_settings(given)
    base = TrainConfig.from_dict(general)
    settings = default_method_settings(methods, keep=set(given), dataset=base.dataset)
    for name, value in options.items():  # a method option applies to the compared methods that take it
        takers = [m for m in methods if m in METHOD_SPECS and name in METHOD_SPECS[m].option_names]
        if not takers:
            owners = ", ".join(all_options()[name][1])
            raise ConfigError(
                f"`{name}` is an option of {owners}, none of which is among --methods {methods}"
            )
        for method in takers:
            settings[method][name] = value
    for method, values in parse_method_settings(args.method_setting, methods).items():
        settings[method].update(values)
    retain = None
    if args.retain_eval is not None:
        retain = {"text": args.retain_eval, "tokens": args.retain_tokens, "length": args.retain_length}
    comparison = run_comparison(
        base,
        methods,
        args.seeds,
        args.output_dir or DEFAULT_OUTPUT,
        settings,
        overwrite=args.overwrite,
        resume=args.resume_comparison,
        latency_batch=args.latency_batch,
        latency_repeats=args.latency_repeats,
        timeout=args.timeout,
        context={"command": "peftkit " + shlex.join(sys.argv[1:])} if sys.argv[1:2] == ["compare"] else None,
        train_sizes=args.train_sizes,
        min_steps=args.min_steps,
        retain=retain,
        test_limit=args.test_limit,
        report_only=args.report_only,
    )
    print("\n" + markdown_table(comparison.rows))
    print("written:", ", ".join(str(p) for p in comparison.files))
    failed = [r for r in comparison.rows if r.status != "ok"]
    for row in failed:
        print(f"{row.method}: {row.status}: {row.error}", file=sys.stderr)
    return 1 if len(failed) == len(comparison.rows) else 0
