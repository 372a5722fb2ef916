"""Checks of a run's settings against its data, tokenizer and model, made once they are loaded and before
the first step: what no setting's range can know (``max_length`` within the model's positions, a validation
split that is not empty, a tokenizer that has a vocabulary).

Each raises :class:`~peftkit.config.ConfigError` or :class:`~peftkit.data.DataError` naming the setting or
the file and what is allowed; a run that would otherwise fail deep inside torch, divide by zero at its first
evaluation, or train on nothing but ``[UNK]`` tokens stops before it starts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from peftkit.config import ConfigError
from peftkit.data.core import DataError, Splits
from peftkit.size_bounds import max_positions

TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json + merges.txt",
    "tokenizer.model",
    "spiece.model",
)


def check_vocabulary(tokenizer: Any, model_dir: str | Path) -> None:
    """Raise ConfigError when ``tokenizer`` has no vocabulary besides its special tokens: a model folder
    without tokenizer files loads as such a tokenizer, and every word would become ``[UNK]``."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    if len(tokenizer) <= len(special):
        raise ConfigError(
            f"{model_dir}: the tokenizer has no vocabulary ({len(tokenizer)} tokens, all special): the folder "
            f"holds none of the tokenizer files ({', '.join(TOKENIZER_FILES)}), so every word would read as "
            "[UNK]; save the model's tokenizer into the folder (tokenizer.save_pretrained(folder))"
        )


def check_tokens_known(tokenizer: Any, texts: Sequence[str], source: str) -> None:
    """Raise DataError when every word of ``texts`` (a sample of the training inputs) reads as the unknown
    token: the tokenizer does not fit the data (another language, another model's vocabulary)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not texts:
        return
    special = set(getattr(tokenizer, "all_special_ids", []) or []) - {unk}
    ids = [i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    ids = [i for i in ids if i not in special]
    if ids and all(i == unk for i in ids):
        raise DataError(
            f"{source}: every token of the first {len(texts)} training inputs is the tokenizer's unknown token "
            f"{tokenizer.unk_token!r}: the tokenizer does not fit this data"
        )


def check_positions(model: nn.Module, parts: Sequence[tuple[str, int]]) -> None:
    """Raise ConfigError when the tokens of ``parts`` (``("`max_length`", 48)``, virtual tokens, new tokens)
    together exceed the positions of ``model`` (``max_position_embeddings`` / ``n_positions``), naming each
    part; a model without a limit passes."""
    config_owner = model if max_positions(model) else getattr(model, "base_model", model)  # a PeftModel's
    limit = max_positions(config_owner)
    total = sum(n for _, n in parts)
    if limit is None or total <= limit:
        return
    spelled = " + ".join(f"{name} {n}" for name, n in parts if n)
    raise ConfigError(
        f"{spelled} = {total} tokens exceed the {limit} positions of {type(config_owner).__name__} "
        f"(max_position_embeddings in its config.json); allowed: {limit} in all"
    )


def check_splits(splits: Splits, limit: int | None) -> None:
    """Raise DataError when the validation or the test split is empty (a run evaluates on both)."""
    for name in ("validation", "test"):
        if not getattr(splits, name):
            limited = f" (--limit {limit}: the first {limit} only)" if limit else ""
            raise DataError(
                f"{splits.source}: the {name} split is empty: {len(splits)} records{limited}, of which 10% "
                f"(rounded) go to validation and 10% to test; give at least 10 records (or a larger --limit)"
            )


def check_run(config: Any, splits: Splits, tokenizer: Any, model: nn.Module) -> None:
    """Every check of this module for a training run of ``config`` (a TrainConfig): splits, tokens,
    positions (``max_length`` plus a prompt method's virtual tokens)."""
    check_splits(splits, config.limit)
    field = {"sequence-classification": "text", "token-classification": "tokens"}.get(splits.task)
    field = field or ("prompt" if splits.task == "causal-lm" else "source")
    sample = [r[field] if isinstance(r[field], str) else " ".join(r[field]) for r in splits.train[:64]]
    check_tokens_known(tokenizer, sample, splits.source)
    check_positions(model, run_positions(config))


def run_positions(config: Any) -> list[tuple[str, int]]:
    """The positions a run's input takes: ``max_length`` and a prompt method's virtual tokens."""
    return [
        ("`max_length`", config.max_length),
        ("`num_virtual_tokens`", config.options.get("num_virtual_tokens", 0)),
    ]


def check_labels_fit_head(label_names: Sequence[str] | None, adapter_dir: Path, source: str) -> None:
    """Raise ConfigError when a trained head in the adapter (a module of ``modules_to_save`` in
    ``adapter_config.json``) has another number of outputs than ``label_names`` (from ``source``, a run's
    labels file) lists, before a head is built for them. Reads only the safetensors header, never a tensor."""
    from peftkit.checkpoint import WEIGHTS_NAME
    from peftkit.file_checks import read_header

    if not label_names:
        return
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        saved = config.get("modules_to_save") or []
        header, _ = read_header(adapter_dir / WEIGHTS_NAME)
    except (OSError, ValueError, AttributeError):
        return  # loading the adapter reports what is wrong with its files
    for key, (shape, _) in header.items():
        parts = key.split(".")
        if len(parts) > 2 and parts[-1] == "weight" and parts[-2] in saved and shape:
            outputs = shape[0]
            if outputs != len(label_names):
                raise ConfigError(
                    f"{source} lists {len(label_names)} labels but the adapter's head {parts[-2]!r} has "
                    f"{outputs} outputs ({adapter_dir / WEIGHTS_NAME}); the files come from different runs"
                )
