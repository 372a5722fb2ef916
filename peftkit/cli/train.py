"""`peftkit train`: fine-tune a model with an adapter method. With no arguments it runs the embedded default
(LoRA on the MiniLM encoder, Rotten Tomatoes sentiment). Settings come from the defaults, then `--config
FILE.yaml`, then the flags below; the effective settings are saved as `<output-dir>/config.yaml`. Each
method starts from its own learning rate unless --learning-rate is given; a method option of another method
than --method is refused."""

from __future__ import annotations

import argparse

from peftkit.cli.flags import add_config_flags, overrides_from_args
from peftkit.config import ConfigError
from peftkit.training.config import TrainConfig, named_setting
from peftkit.training.resume import recorded_base


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", description=__doc__)
    parser.add_argument("--config", help="a YAML file of settings (flags override it)")
    add_config_flags(parser)
    parser.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's settings: defaults, then ``--config``'s YAML file, then the flags given. With ``--resume``
    the run's recorded settings stand in for the defaults: only the settings given are compared with them.

    Raises ConfigError for an unknown setting, a bad value or an option of another method, and for
    ``--resume`` without a run to continue."""
    overrides = overrides_from_args(args)
    base = recorded_base(args.config, overrides)
    try:
        return TrainConfig.from_sources(args.config, overrides, none_is_unset=False, base=base)
    except ConfigError as error:  # a method option its adapter config refuses: name the flag it came from
        named = named_setting(error)
        if named not in overrides or str(error).startswith(str(args.config)):
            raise
        raise ConfigError(f"--{named.replace('_', '-')}: {error}") from None


def run(args: argparse.Namespace) -> int:
    from peftkit.training.loop import train

    result = train(config_from_args(args))
    if result.test_metrics:  # only the main process evaluates and reports
        print("\n" + result.summary())
    return 0
