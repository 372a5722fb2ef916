"""Data for training and evaluation: built-in data sets by name, or the user's own file, split three ways.

from peftkit.data import load_splits, Columns

splits = load_splits("rotten_tomatoes")                       # task inferred: sequence-classification
splits = load_splits("reviews.csv", "sequence-classification", Columns(text="review", label="stars"))
splits.train[0]  # {"text": "...", "label": 1}; splits.label_names[1] is its name
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from peftkit.data.builtin import BUILTIN_DATASETS, BuiltinDataset
from peftkit.data.core import RECORD_FIELDS, TASKS, Columns, DataError, Splits, check_task, split_records
from peftkit.data.files import FILE_SUFFIXES, read_records

DEFAULT_COLUMNS = Columns()  # frozen, so one shared default is safe

__all__ = [
    "BUILTIN_DATASETS",
    "DEFAULT_COLUMNS",
    "FILE_SUFFIXES",
    "RECORD_FIELDS",
    "TASKS",
    "BuiltinDataset",
    "Columns",
    "DataError",
    "Splits",
    "load_records",
    "load_splits",
]


def load_records(
    dataset: str | Path,
    task: str | None = None,
    columns: Columns = DEFAULT_COLUMNS,
    *,
    label_names: Sequence[str] | None = None,
) -> tuple[str, list[dict], tuple[str, ...] | None, str]:
    """Every record of a data set, unsplit and in file order: ``(task, records, label_names, source)``.

    See :func:`load_splits` for the arguments.
    """
    if task is not None:
        check_task(task)
    name = str(dataset)
    path = Path(name).expanduser()
    if name in BUILTIN_DATASETS and not path.exists():
        builtin = BUILTIN_DATASETS[name]
        task = check_task(task or builtin.tasks[0], builtin.tasks, what=f"the built-in data set {name!r}")
        location = builtin.locate()
        records, names = builtin.load(location, task)
        if label_names is not None and names is not None and tuple(label_names) != names:
            raise DataError(
                f"the built-in data set {name!r} has the labels {', '.join(names)}; "
                f"expected {', '.join(map(str, label_names))}"
            )
        return task, records, names, f"{name}: {builtin.pip_spec} {builtin.path} ({location})"
    if not path.exists():
        raise DataError(
            f"unknown data set {name!r}: not a built-in name ({', '.join(BUILTIN_DATASETS)}) "
            f"and no such file or folder"
        )
    if task is None:
        raise DataError(f"{path}: give the task of your own data; one of: {', '.join(TASKS)}")
    records, names, description = read_records(path, task, columns, label_names)
    return task, records, names, description


def load_splits(
    dataset: str | Path,
    task: str | None = None,
    columns: Columns = DEFAULT_COLUMNS,
    *,
    seed: int = 0,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    limit: int | None = None,
    label_names: Sequence[str] | None = None,
) -> Splits:
    """A data set as canonical records in seeded train / validation / test splits.

    ``dataset`` is a built-in name (:data:`BUILTIN_DATASETS`: ``rotten_tomatoes``, ``wnut16``, ``chatterbot``,
    ``news_headlines``; ``task`` defaults to the data set's own, and must be one it supports) or a path to
    the user's own data: a ``.csv`` / ``.tsv`` file (with a header), a ``.jsonl`` / ``.json`` file (one JSON
    object per line, or one JSON array), or a Hugging Face ``datasets`` folder saved with ``save_to_disk``
    (needs ``pip install datasets``). ``task`` is required for the user's data, and ``columns`` names its
    columns. One data set gives all three splits: a file (or every split of a ``DatasetDict``, concatenated)
    is shuffled with ``seed`` and cut by the fractions; split columns and separate split files are not read.

    Sequence-classification labels may be strings or integers; ``label_names`` are then the distinct labels
    sorted (numerically when all are integers) and a record's ``label`` is its index. Token-classification
    tags are listed as "O" first, then sorted. In a CSV cell, a list of words or tags is written as JSON
    (``["New", "York"]``) or separated by spaces (``New York``); in JSON it must be a list. Pass
    ``label_names`` to fix the label set and order (e.g. those an adapter was trained with): a label outside
    it is then an error.

    The splits depend only on ``seed`` and the data: a fixed seeded shuffle, then the first ``limit``
    records (all by default), then ``validation_fraction`` and ``test_fraction`` of them (rounded) for
    validation and test, the rest for training. Errors are :class:`DataError`, naming the file, the row
    (the 1-based line of a CSV / JSONL file) and what was expected.
    """
    task, records, names, source = load_records(dataset, task, columns, label_names=label_names)
    train, validation, test = split_records(
        records, seed=seed, validation_fraction=validation_fraction, test_fraction=test_fraction, limit=limit
    )
    return Splits(task=task, train=train, validation=validation, test=test, label_names=names, source=source)
