"""The data contract: tasks, canonical records, column names, splits and the one error type."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

TASKS = ("sequence-classification", "token-classification", "causal-lm", "seq2seq")

# Fields of a canonical record, by task. Labels and tags are indices into ``Splits.label_names``.
RECORD_FIELDS: dict[str, tuple[str, str]] = {
    "sequence-classification": ("text", "label"),
    "token-classification": ("tokens", "tags"),
    "causal-lm": ("prompt", "response"),
    "seq2seq": ("source", "target"),
}


class DataError(ValueError):
    """A data set that cannot be read as asked: the message names the file, the row and what was expected."""


@dataclass(frozen=True)
class Columns:
    """Column names in the user's own files (the CLI's ``--text-column`` etc.).

    ``text`` is the sequence-classification input, and also the causal-lm prompt or the seq2seq source when
    the file has no ``prompt`` / ``source`` column.
    """

    text: str = "text"
    label: str = "label"
    tokens: str = "tokens"
    tags: str = "tags"
    prompt: str = "prompt"
    response: str = "response"
    source: str = "source"
    target: str = "target"


@dataclass(frozen=True)
class Splits:
    """A data set split three ways, as canonical records.

    Records by task: sequence-classification ``{"text": str, "label": int}``; token-classification
    ``{"tokens": list[str], "tags": list[int]}``; causal-lm ``{"prompt": str, "response": str}``; seq2seq
    ``{"source": str, "target": str}``. ``label_names`` maps label / tag indices to names (``None`` for the
    generation tasks); ``source`` says where the data came from.
    """

    task: str
    train: list[dict]
    validation: list[dict]
    test: list[dict]
    label_names: tuple[str, ...] | None
    source: str

    def __len__(self) -> int:
        return len(self.train) + len(self.validation) + len(self.test)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}

    def with_train_size(self, size: int) -> Splits:
        """The same splits with only the first ``size`` training records: the training split is already in a
        seeded shuffled order, so the subsets of one data seed are nested (a smaller size is a prefix of a
        larger one) and validation and test stay the same. Raises DataError when ``size`` exceeds it."""
        if not 0 < size <= len(self.train):
            raise DataError(
                f"`train_size` must be between 1 and the training split's {len(self.train):,} records, got {size}"
            )
        return dataclasses.replace(self, train=self.train[:size])


def check_task(task: str | None, allowed: Sequence[str] = TASKS, *, what: str | None = None) -> str:
    if task not in allowed:
        where = f" for {what}" if what else ""
        raise DataError(f"unknown task {task!r}{where}; expected one of: {', '.join(allowed)}")
    return task


def split_records(
    records: list[dict],
    *,
    seed: int,
    validation_fraction: float,
    test_fraction: float,
    limit: int | None,
) -> tuple[list[dict], list[dict], list[dict]]:
    """Seeded shuffle, then the first ``limit`` records, then train / validation / test by fraction.

    The permutation depends only on ``seed`` and the number of records, so the same call always gives the
    same splits, and a smaller ``limit`` takes a prefix of the same shuffled order.
    """
    for name, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise DataError(f"`{name}` must be in [0, 1), got {value}")
    if validation_fraction + test_fraction >= 1.0:
        raise DataError(
            "`validation_fraction` + `test_fraction` must leave records to train on, "
            f"got {validation_fraction} + {test_fraction}"
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"`limit` must be a positive integer or None, got {limit!r}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    if limit is not None:
        order = order[:limit]
    n = len(order)
    n_validation = round(n * validation_fraction)
    n_test = round(n * test_fraction)
    n_train = n - n_validation - n_test
    chosen = [records[i] for i in order]
    return chosen[:n_train], chosen[n_train : n_train + n_validation], chosen[n_train + n_validation :]


def label_order(names: set[str]) -> tuple[str, ...]:
    """Distinct label names in index order: numerically when all are integers, else sorted as strings."""
    if names and all(_is_int(n) for n in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def tag_order(names: set[str]) -> tuple[str, ...]:
    """BIO tag names in index order: ``"O"`` first (always present), then sorted; integer tags numerically."""
    if names and all(_is_int(n) for n in names):
        return tuple(sorted(names, key=int))
    return ("O", *sorted(names - {"O"}))


BIO_PREFIXES = ("B-", "I-", "E-", "S-")  # IOB2 and IOBES, the schemes seqeval's entity metrics read


def check_label_set(names: Sequence[str], task: str, column: str, source: str) -> None:
    """Raise DataError when the labels found in ``column`` of ``source`` cannot train ``task``: fewer than
    two classes (a one-label head becomes a regression head, and its accuracy is 1.0 by construction), or
    token tags outside the BIO scheme (``O``, ``B-TYPE``, ``I-TYPE``; ``E-`` / ``S-`` too), whose entities
    seqeval cannot read."""
    if task == "sequence-classification" and len(names) < 2:
        raise DataError(
            f"{source}: column {column!r} holds one label ({', '.join(map(repr, names))}) in every row; "
            "classification needs at least 2 labels"
        )
    if task != "token-classification":
        return
    bad = [n for n in names if n != "O" and not (n[:2] in BIO_PREFIXES and n[2:].strip())]
    if bad:
        raise DataError(
            f"{source}: tag(s) {bad[:5]} in column {column!r} are not in the BIO scheme: expected 'O' or "
            "'B-TYPE' / 'I-TYPE' (IOBES 'E-' / 'S-' too), e.g. B-PER I-PER O; entity metrics need the prefixes"
        )
    if not any(n != "O" for n in names):
        raise DataError(f"{source}: column {column!r} tags every word 'O': there are no entities to learn")


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


LabelOrder = Callable[[set[str]], tuple[str, ...]]
