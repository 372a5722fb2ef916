"""`peftkit train`: fine-tune a model with an adapter method. With no arguments it runs the embedded default
(LoRA on the MiniLM encoder, Rotten Tomatoes sentiment). Settings come from the defaults, then `--config
FILE.yaml`, then the flags below; the effective settings are saved as `<output-dir>/config.yaml`."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from peftkit.training.config import TrainConfig

COLUMN_FLAGS = ("text", "label", "tokens", "tags", "prompt", "response", "source", "target")
HELP = {
    "model": "a bundled model (minilm, smollm2) or a local Hugging Face model folder",
    "dataset": "a built-in dataset (rotten_tomatoes, wnut16, chatterbot, news_headlines) or a CSV / JSONL file "
    "or a Hugging Face datasets folder",
    "task": "sequence-classification, token-classification, causal-lm or seq2seq (inferred for built-ins)",
    "method": "lora, qlora, ia3, bitfit, layer_tuning, bottleneck, prompt_tuning, prefix_tuning, p_tuning, "
    "p_tuning_v2 or full",
    "limit": "records read before splitting ('none': all)",
    "max_steps": "optimizer steps ('none': run `epochs` epochs)",
    "resume": "continue the run in --output-dir from its last checkpoint",
    "fused_loss": "causal-LM / seq2seq loss from the hidden states in chunks, without the logits (exact)",
    "group_by_length": "batches of similar lengths (none: on for causal-lm and seq2seq only)",
    "packing": "causal-lm: several examples per row, each with its own positions and attention",
}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="fine-tune with an adapter method", description=__doc__)
    parser.add_argument("--config", help="a YAML file of settings (flags override it)")
    add_config_flags(parser)
    parser.set_defaults(run=run)


def add_config_flags(parser: argparse.ArgumentParser, exclude: frozenset[str] = frozenset()) -> None:
    """One flag per TrainConfig field (``--max-steps`` for ``max_steps``) but those in ``exclude``; defaults
    stay None so that only the flags a user gives override the YAML file."""
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name == "columns" or field.name in exclude:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        text = f"{HELP.get(field.name, field.name.replace('_', ' '))} (default: {default})"
        if kind is bool or kind == bool | None:  # None: the setting's automatic choice
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif field.name == "target_modules":
            parser.add_argument(flag, nargs="+", default=None, help="module names, one regex, or all-linear")
        else:
            parser.add_argument(flag, type=_parser_for(kind), default=None, help=text)
    for column in COLUMN_FLAGS:
        parser.add_argument(
            f"--{column}-column", default=None, help=f"column holding the {column} in your file"
        )


def _parser_for(kind):
    """int / float / str, and 'none' for optional settings."""
    options = (
        [a for a in typing.get_args(kind) if a is not type(None)]
        if isinstance(kind, types.UnionType)
        else [kind]
    )
    base = options[0]

    def parse(text: str):
        if text.lower() == "none" and isinstance(kind, types.UnionType):
            return None
        return base(text)

    parse.__name__ = base.__name__
    return parse


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {
        f.name: getattr(args, f.name, None) for f in dataclasses.fields(TrainConfig) if f.name != "columns"
    }
    columns = {c: getattr(args, f"{c}_column") for c in COLUMN_FLAGS if getattr(args, f"{c}_column")}
    if columns:
        overrides["columns"] = columns
    if isinstance(overrides.get("target_modules"), list) and len(overrides["target_modules"]) == 1:
        overrides["target_modules"] = overrides["target_modules"][0]  # one string: a regex or all-linear
    return TrainConfig.from_sources(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    from peftkit.training.loop import train

    result = train(config_from_args(args))
    if result.test_metrics:  # only the main process evaluates and reports
        print("\n" + result.summary())
    return 0
