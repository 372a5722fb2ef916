"""The training flags `peftkit train` and `peftkit compare` share, derived from TrainConfig and the methods'
declarations (peftkit/method_spec.py): one flag per setting, `--max-steps` for `max_steps`."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from peftkit.method_spec import METHOD_SPECS, all_options
from peftkit.training.config import HEAD_LEARNING_RATE, TrainConfig, default_learning_rate, parse_setting

COLUMN_FLAGS = ("text", "label", "tokens", "tags", "prompt", "response", "source", "target")
HELP = {
    "model": "a bundled model (minilm, smollm2) or a local Hugging Face model folder",
    "dataset": "a built-in dataset (rotten_tomatoes, wnut16, chatterbot, news_headlines) or a CSV / JSONL file "
    "or a Hugging Face datasets folder",
    "task": "sequence-classification, token-classification, causal-lm or seq2seq (inferred for built-ins)",
    "limit": "records read before splitting ('none': all)",
    "train_size": "training examples kept: the first N of the shuffled training split ('none': all)",
    "data_seed": "seed of the data split and its order ('none': --seed)",
    "epochs": "passes over the training split when --max-steps is none",
    "max_steps": "optimizer steps ('none': run `epochs` epochs)",
    "batch_size": "examples per micro-batch and process",
    "gradient_accumulation": "micro-batches per optimizer step",
    "head_learning_rate": "peak learning rate of a freshly initialised task head (a classifier), in its own "
    "optimizer group",
    "weight_decay": "AdamW's decoupled weight-decay coefficient, on weight matrices (biases and norms: none)",
    "warmup_ratio": "share of the steps with a linear learning-rate warm-up, in [0, 1)",
    "max_length": "tokens per example; longer ones are cut, and the run says which share ('none': the 99th "
    "percentile of the training examples' lengths, rounded up to a multiple of 8, at most 512 and the model's "
    "positions)",
    "max_grad_norm": "gradient clipping norm, >= 0 (0 or 'none': no clipping)",
    "bf16": "bfloat16 autocast for the forward pass",
    "gradient_checkpointing": "recompute activations in the backward pass (less memory, more time)",
    "fsdp": "under torchrun / accelerate launch: shard the frozen base across the processes (FSDP2) "
    "instead of a full copy in each (DDP)",
    "seed": "seed of the data order, initialisation and dropout",
    "eval_every": "optimizer steps between validations",
    "eval_batch_size": "examples per evaluation batch",
    "eval_limit": "validation records per evaluation ('none': all)",
    "early_stopping_patience": "validations without improvement before stopping ('none': never stop early)",
    "save_every": "optimizer steps between checkpoints",
    "output_dir": "the run's folder",
    "resume": "continue the run in --output-dir from its last checkpoint",
    "fused_loss": "causal-LM / seq2seq loss from the hidden states in chunks, without the logits (exact)",
    "group_by_length": "batches of similar lengths, keeping a classification batch's label mix (null in a "
    "config.yaml recorded before this was the default: on for causal-lm and seq2seq only)",
    "packing": "causal-lm: several examples per row, each with its own positions and attention",
    "check_finite": "stop the run when a trainable parameter turns NaN or infinite after a step",
}


def add_config_flags(
    parser: argparse.ArgumentParser,
    *,
    exclude: frozenset[str] = frozenset(),
    hidden: frozenset[str] = frozenset(),
    help_for: dict[str, str] | None = None,
) -> None:
    """One flag per TrainConfig setting and per method option, but those in ``exclude``; those in
    ``hidden`` are accepted without being listed in --help, ``help_for`` replaces a flag's help. Defaults stay
    None so that only the flags a user gives override the YAML file."""
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        name = field.name
        if name in ("columns", "options") or name in exclude:
            continue
        flag = "--" + name.replace("_", "-")
        text = (help_for or {}).get(
            name
        ) or f"{HELP.get(name, name.replace('_', ' '))} (default: {_default(field)})"
        text = argparse.SUPPRESS if name in hidden else text
        if hints[name] is bool or hints[name] == bool | None:  # None: the setting's automatic choice
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif name == "method":
            parser.add_argument(flag, choices=list(METHOD_SPECS), default=None, metavar="METHOD", help=text)
        else:
            parser.add_argument(flag, type=_reader(name), default=None, help=text)
    group = parser.add_argument_group("method options", "each taken only by the methods named before it")
    for name, (option, methods) in all_options().items():
        if name in exclude:
            continue
        text = f"({', '.join(methods)}) {option.help} (default: {option.default})"
        group.add_argument(
            "--" + name.replace("_", "-"),
            type=_reader(name),
            nargs="+" if option.many else None,
            choices=option.choices,
            default=None,
            help=argparse.SUPPRESS if name in hidden else text,
        )
    for column in COLUMN_FLAGS:
        parser.add_argument(
            f"--{column}-column", default=None, help=f"column holding the {column} in your file"
        )


def _default(field: dataclasses.Field) -> Any:
    if field.name == "method":
        methods = ", ".join(f"{name} ({spec.summary})" for name, spec in METHOD_SPECS.items())
        return f"{field.default}; one of: {methods}"
    if field.name == "head_learning_rate":
        return f"{HEAD_LEARNING_RATE:g}, whatever the method"
    if field.name == "learning_rate":
        rates = ", ".join(f"{m} {default_learning_rate(m):g}" for m in METHOD_SPECS)
        return f"the method's own: {rates}"
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


class _NoneGiven:
    """The value of a flag given as ``none``: unlike argparse's None (flag not given), it overrides the YAML
    file and the default (``--max-steps none`` runs whole epochs even though the default is 400 steps)."""

    def __repr__(self) -> str:
        return "none"


NONE_GIVEN = _NoneGiven()


def _reader(name: str):
    def read(text: str):
        try:
            value = parse_setting(name, text)
        except ValueError as error:  # argparse reports it as a bad value of this flag, exit status 2
            raise argparse.ArgumentTypeError(str(error)) from None
        return NONE_GIVEN if value is None else value

    read.__name__ = name
    return read


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the flags gave, flat, and only those (a flag given as ``none`` is there as None), column
    flags gathered into ``columns``."""
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("columns", "options")]
    overrides = {}
    for name in [*names, *all_options()]:
        value = getattr(args, name, None)
        if isinstance(value, list):
            value = [None if v is NONE_GIVEN else v for v in value]
            value = value[0] if len(value) == 1 else value  # one string: a regex or all-linear (or None)
        if value is not None:
            overrides[name] = None if value is NONE_GIVEN else value
    columns = {c: getattr(args, f"{c}_column") for c in COLUMN_FLAGS if getattr(args, f"{c}_column", None)}
    if columns:
        overrides["columns"] = columns
    return overrides
