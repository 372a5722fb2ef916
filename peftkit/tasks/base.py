"""What every task provides to the training loop."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from peftkit.data.model_checks import check_vocabulary


@dataclass(frozen=True)
class Metric:
    name: str  # e.g. "accuracy"
    higher_is_better: bool


class Task:
    """Base of the four tasks. Subclasses set ``name``, ``primary`` and implement the methods below."""

    name: str = ""
    primary: Metric = Metric("loss", higher_is_better=False)

    def load_tokenizer(self, model_dir: Path) -> PreTrainedTokenizerBase:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        check_vocabulary(tokenizer, model_dir)  # a folder without tokenizer files loads as specials only
        if tokenizer.pad_token is None:  # decoder-only tokenizers often have none; padding rows need one
            tokenizer.pad_token = tokenizer.eos_token
        # Every task feeds one segment per row: ids and mask only (decoders refuse BERT's token_type_ids).
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
        return tokenizer

    def load_model(self, model_dir: Path, label_names: Sequence[str] | None, tokenizer) -> nn.Module:
        raise NotImplementedError

    def head_modules(self, model: nn.Module) -> list[str]:
        """Freshly initialised modules that must train in full next to any adapter (a classifier)."""
        return []

    def collate(self, records: Sequence[dict], tokenizer, max_length: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        records: Sequence[dict],
        tokenizer,
        *,
        batch_size: int,
        max_length: int,
        label_names: Sequence[str] | None,
    ) -> dict[str, Any]:
        raise NotImplementedError

    @torch.no_grad()
    def predict(
        self,
        model: nn.Module,
        inputs: Sequence[str],
        tokenizer,
        *,
        max_length: int,
        label_names: Sequence[str] | None,
        max_new_tokens: int = 64,
    ) -> list[Any]:
        raise NotImplementedError


def batches(records: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(records), size):
        yield records[start : start + size]


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}
