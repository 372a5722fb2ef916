"""Tiny model folders and small data files for end-to-end tests of `peftkit train` (built locally, no download).

The models borrow the bundled MiniLM tokenizer (a real WordPiece vocabulary) and get tiny random weights
from config classes, with dropout off so that runs compare exactly.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from peftkit.assets import resolve_model

POSITIVE = ["great", "good", "wonderful", "fine", "lovely", "superb", "happy", "best"]
NEGATIVE = ["bad", "awful", "terrible", "poor", "sad", "worst", "boring", "ugly"]
FILLER = ["the", "movie", "was", "a", "film", "story", "and", "it", "plot", "actors"]


def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("minilm"))


def save_model(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def tiny_bert(folder: Path, model_class=BertForSequenceClassification) -> Path:
    """A tiny BERT of ``model_class`` (a sequence classifier by default), seeded, saved with its tokenizer."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return save_model(model_class(config), folder)


def tiny_llama(folder: Path) -> Path:
    torch.manual_seed(0)
    vocab = tokenizer()
    config = LlamaConfig(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=vocab.pad_token_id,
        eos_token_id=vocab.sep_token_id,
        bos_token_id=vocab.cls_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = vocab.pad_token_id
    save_model(model, folder)
    saved = AutoTokenizer.from_pretrained(folder)
    saved.eos_token = saved.sep_token  # the WordPiece vocabulary has no eos: [SEP] ends a response
    saved.save_pretrained(folder)
    return folder


def tiny_t5(folder: Path) -> Path:
    torch.manual_seed(0)
    vocab = tokenizer()
    config = T5Config(
        vocab_size=30522,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=vocab.pad_token_id,
        pad_token_id=vocab.pad_token_id,
        eos_token_id=vocab.sep_token_id,
    )
    return save_model(T5ForConditionalGeneration(config), folder)


# `peftkit train` flags that read sentiment_csv's columns as a sequence-classification task
SENTIMENT_FLAGS = [
    "--task",
    "sequence-classification",
    "--text-column",
    "review",
    "--label-column",
    "sentiment",
]


def sentiment_csv(path: Path, rows: int = 400, seed: int = 0) -> Path:
    """Reviews whose label is whether they use positive or negative words: easy to learn, impossible by chance."""
    rng = random.Random(seed)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        for _ in range(rows):
            positive = rng.random() < 0.5
            words = rng.sample(FILLER, 4) + rng.sample(POSITIVE if positive else NEGATIVE, 2)
            rng.shuffle(words)
            writer.writerow([" ".join(words), "pos" if positive else "neg"])
    return path


def qa_jsonl(path: Path, rows: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(rows):
            word = rng.choice(POSITIVE + NEGATIVE)
            handle.write(
                json.dumps({"prompt": f"is {word} positive", "response": "yes" if word in POSITIVE else "no"})
                + "\n"
            )
    return path


def ner_jsonl(path: Path, rows: int = 120, seed: int = 0) -> Path:
    rng = random.Random(seed)
    cities = ["paris", "london", "berlin", "rome"]
    with path.open("w") as handle:
        for _ in range(rows):
            words = rng.sample(FILLER, 3)
            at = rng.randrange(4)
            words.insert(at, rng.choice(cities))
            tags = ["O"] * 4
            tags[at] = "B-LOC"
            handle.write(json.dumps({"tokens": words, "tags": tags}) + "\n")
    return path


def headline_jsonl(path: Path, rows: int = 80, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(rows):
            words = rng.sample(FILLER + POSITIVE, 6)
            handle.write(json.dumps({"source": " ".join(words), "target": " ".join(words[:2])}) + "\n")
    return path
