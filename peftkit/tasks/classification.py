"""Sequence classification (accuracy, macro-F1) and token classification (entity-level P/R/F1, seqeval)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

from peftkit.tasks.base import Metric, Task, batches, model_device, to_device

HEAD_NAMES = ("classifier", "score")  # the task head attribute across BERT-, LLaMA- and GPT-2-style models
IGNORE = -100  # label positions the loss skips


def _head(model: nn.Module) -> list[str]:
    return [name for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]


def _label_maps(label_names: Sequence[str]) -> dict:
    return {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
        # a folder whose saved head has another number of labels gets a fresh head (trained in full anyway)
        "ignore_mismatched_sizes": True,
    }


def real_positions(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token logits of the input's own tokens: a prompt method puts its virtual tokens first."""
    return logits[:, logits.shape[1] - input_ids.shape[1] :]


def macro_f1(predictions: list[int], labels: list[int], num_labels: int) -> float:
    """Mean over classes of F1 = 2PR / (P + R); a class never predicted nor present counts as 0."""
    scores = []
    for cls in range(num_labels):
        tp = sum(p == cls and y == cls for p, y in zip(predictions, labels, strict=True))
        fp = sum(p == cls and y != cls for p, y in zip(predictions, labels, strict=True))
        fn = sum(p != cls and y == cls for p, y in zip(predictions, labels, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / num_labels


class SequenceClassification(Task):
    name = "sequence-classification"
    primary = Metric("accuracy", higher_is_better=True)

    def load_model(self, model_dir: Path, label_names, tokenizer) -> nn.Module:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, **_label_maps(label_names))
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder models find the last real token by it
        return model

    def head_modules(self, model: nn.Module) -> list[str]:
        return _head(model)

    def collate(self, records, tokenizer, max_length):
        batch = tokenizer(
            [r["text"] for r in records],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        batch["labels"] = torch.tensor([r["label"] for r in records])
        return dict(batch)

    @torch.no_grad()
    def evaluate(self, model, records, tokenizer, *, batch_size, max_length, label_names):
        model.eval()
        predictions, labels, loss_sum = [], [], 0.0
        # the metrics do not depend on the order: texts of similar length share a batch and little is padded
        ids = tokenizer([r["text"] for r in records], truncation=True, max_length=max_length)["input_ids"]
        ordered = [records[i] for i in sorted(range(len(records)), key=lambda i: len(ids[i]))]
        for chunk in batches(ordered, batch_size):
            batch = to_device(self.collate(chunk, tokenizer, max_length), model_device(model))
            output = model(**batch)
            loss_sum += output.loss.item() * len(chunk)
            predictions += output.logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
        correct = sum(p == y for p, y in zip(predictions, labels, strict=True))
        return {
            "loss": loss_sum / len(records),
            "accuracy": correct / len(records),
            "macro_f1": macro_f1(predictions, labels, len(label_names)),
        }

    @torch.no_grad()
    def predict(self, model, inputs, tokenizer, *, max_length, label_names, max_new_tokens=64):
        model.eval()
        batch = tokenizer(
            list(inputs), truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        logits = model(**to_device(dict(batch), model_device(model))).logits
        return [label_names[i] for i in logits.argmax(-1).tolist()]


class TokenClassification(Task):
    name = "token-classification"
    primary = Metric("f1", higher_is_better=True)

    def load_model(self, model_dir: Path, label_names, tokenizer) -> nn.Module:
        return AutoModelForTokenClassification.from_pretrained(model_dir, **_label_maps(label_names))

    def head_modules(self, model: nn.Module) -> list[str]:
        return _head(model)

    def collate(self, records, tokenizer, max_length):
        """Word-level tags go to each word's first sub-token; other sub-tokens and special tokens get -100."""
        batch = tokenizer(
            [r["tokens"] for r in records],
            is_split_into_words=True,
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        labels = torch.full_like(batch["input_ids"], IGNORE)
        for row, record in enumerate(records):
            previous = None
            for position, word in enumerate(batch.word_ids(row)):
                if word is not None and word != previous:
                    labels[row, position] = record["tags"][word]
                previous = word
        batch = dict(batch)
        batch["labels"] = labels
        return batch

    @torch.no_grad()
    def evaluate(self, model, records, tokenizer, *, batch_size, max_length, label_names):
        model.eval()
        gold, predicted, loss_sum, scored = [], [], 0.0, 0
        # the metrics do not depend on the order (the loss is the mean over every scored word, whatever the
        # batches): sentences of similar length share a batch and little is padded
        for chunk in batches(sorted(records, key=lambda r: sum(len(w) for w in r["tokens"])), batch_size):
            batch = to_device(self.collate(chunk, tokenizer, max_length), model_device(model))
            output = model(**batch)
            words = int((batch["labels"] != IGNORE).sum())  # the model's loss is the mean over these
            if words:  # (a chunk whose words were all cut off has no loss: 0/0)
                loss_sum, scored = loss_sum + output.loss.item() * words, scored + words
            guesses = real_positions(output.logits, batch["input_ids"]).argmax(-1)
            for row in range(len(chunk)):
                keep = batch["labels"][row] != IGNORE  # one position per (kept) word
                gold.append([label_names[i] for i in batch["labels"][row][keep].tolist()])
                predicted.append([label_names[i] for i in guesses[row][keep].tolist()])
        # imported here: seqeval brings scikit-learn, SciPy and pandas (about 150 MiB resident), which every
        # other task's run would otherwise carry
        from seqeval.metrics import f1_score, precision_score, recall_score

        return {
            "loss": loss_sum / max(scored, 1),
            "precision": precision_score(gold, predicted, zero_division=0),
            "recall": recall_score(gold, predicted, zero_division=0),
            "f1": f1_score(gold, predicted, zero_division=0),
        }

    @torch.no_grad()
    def predict(self, model, inputs, tokenizer, *, max_length, label_names, max_new_tokens=64):
        """Each input is a sentence; words are split on whitespace; one tag per word."""
        model.eval()
        words = [text.split() for text in inputs]
        batch = tokenizer(
            words,
            is_split_into_words=True,
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        logits = model(**to_device(dict(batch), model_device(model))).logits
        guesses = real_positions(logits, batch["input_ids"]).argmax(-1)
        results = []
        for row, sentence in enumerate(words):
            tags, previous = {}, None
            for position, word in enumerate(batch.word_ids(row)):
                if word is not None and word != previous:
                    tags[word] = label_names[guesses[row, position].item()]
                previous = word
            results.append([(w, tags.get(i, "O")) for i, w in enumerate(sentence)])
        return results
