"""The user's own data: one CSV / TSV / JSONL / JSON file, or a Hugging Face ``datasets`` folder.

A file is read whole and turned into canonical records of the task (see :class:`~peftkit.data.Splits`);
splitting is seeded, as for the built-in data sets. Every problem is a :class:`DataError` naming the file, the
row (the 1-based line of a CSV or JSONL file) and what was expected.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.data.core import Columns, DataError, check_label_set, label_order, tag_order

FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json")


@dataclass
class RowSource:
    """Rows of one user data set: ``rows`` yields ``(where, row)``, ``where`` being "FILE, line N"."""

    description: str
    rows: Iterator[tuple[str, dict[str, Any]]]
    cells_are_text: bool  # CSV cells are strings: a list of words may be written "w1 w2" or '["w1", "w2"]'
    class_names: dict[str, tuple[str, ...]] = field(default_factory=dict)  # datasets ClassLabel names


def open_rows(path: Path) -> RowSource:
    """The rows of a user file or ``datasets`` folder, read lazily; raises :class:`DataError`."""
    if path.is_dir():
        return _datasets_rows(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return RowSource(str(path), _csv_rows(path, "\t" if suffix == ".tsv" else ","), cells_are_text=True)
    if suffix in (".jsonl", ".ndjson", ".json"):
        return RowSource(str(path), _json_rows(path), cells_are_text=False)
    raise DataError(
        f"{path}: cannot tell the format from the suffix {path.suffix!r}; expected one of "
        f"{', '.join(FILE_SUFFIXES)}, or a Hugging Face datasets folder saved with save_to_disk"
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[str, dict[str, Any]]]:
    lines = _read_text(path).splitlines(keepends=True)
    reader = csv.reader(lines, delimiter=delimiter)
    header: list[str] | None = None
    previous_end = 0
    try:
        for cells in reader:
            start, previous_end = previous_end + 1, reader.line_num
            if not cells or all(not c.strip() for c in cells):
                continue
            if header is None:
                header = [c.strip() for c in cells]
                _check_header(path, start, header)
                continue
            if len(cells) != len(header):
                raise DataError(
                    f"{path}, line {start}: expected {len(header)} fields as in the header "
                    f"({', '.join(header)}), got {len(cells)}"
                )
            yield f"{path}, line {start}", dict(zip(header, cells, strict=True))
    except csv.Error as err:
        raise DataError(f"{path}, line {reader.line_num}: malformed CSV: {err}") from None


def _check_header(path: Path, line: int, header: list[str]) -> None:
    """Raise DataError for a repeated column name: a row would keep only the last of the two columns.
    (Unnamed columns, such as the index pandas writes, are left alone.)"""
    repeated = sorted({name for name in header if name and header.count(name) > 1})
    if repeated:
        raise DataError(
            f"{path}, line {line}: column name(s) {repeated} appear more than once in the header; "
            "rename one so that each column can be told apart"
        )


def _json_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    text = _read_text(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {err.lineno}: invalid JSON: {err.msg}") from None
        numbered = ((f"{path}, record {i}", item) for i, item in enumerate(items, 1))
    else:
        numbered = _json_lines(path, text)
    for where, item in numbered:
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a JSON object with named fields, got {type(item).__name__}")
        yield where, item


def _json_lines(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}, line {number}", json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}, line {number}: invalid JSON: {err.msg} (one JSON object per line)"
            ) from None


def _datasets_rows(path: Path) -> RowSource:
    saved = any((path / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json"))
    if not saved:
        raise DataError(
            f"{path}: a folder, but not a Hugging Face dataset saved with save_to_disk (no dataset_dict.json "
            f"or state.json); give a file ({', '.join(FILE_SUFFIXES)}) or such a folder"
        )
    if importlib.util.find_spec("datasets") is None:
        raise DataError(
            f"{path}: reading a Hugging Face datasets folder needs the `datasets` package: pip install datasets"
        )
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # the library's own errors vary by version
        raise DataError(f"{path}: datasets.load_from_disk failed: {err}") from err
    # A DatasetDict is read split after split, in its order, then split again with the seed like any file.
    parts = [(name, loaded[name]) for name in loaded] if hasattr(loaded, "keys") else [(None, loaded)]
    class_names: dict[str, tuple[str, ...]] = {}
    for _, part in parts:
        for column, feature in (getattr(part, "features", None) or {}).items():
            names = _class_label_names(feature)
            if names:
                class_names.setdefault(column, names)

    def rows() -> Iterator[tuple[str, dict[str, Any]]]:
        for name, part in parts:
            prefix = f"{path}, split {name!r}" if name is not None else str(path)
            for number, row in enumerate(part, 1):
                yield f"{prefix}, row {number}", dict(row)

    return RowSource(str(path), rows(), cells_are_text=False, class_names=class_names)


def _class_label_names(feature: Any) -> tuple[str, ...] | None:
    """Names of a ``ClassLabel`` feature, or of the ``ClassLabel`` inside a ``Sequence`` / list feature."""
    names = getattr(feature, "names", None)
    if names:
        return tuple(names)
    inner = getattr(feature, "feature", None)
    if inner is None and isinstance(feature, list) and len(feature) == 1:
        inner = feature[0]
    names = getattr(inner, "names", None) if inner is not None else None
    return tuple(names) if names else None


# --- rows -> canonical records ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskFormat:
    """How one task reads a row: candidate columns for each of its two fields, and how to parse them."""

    fields: tuple[str, str]  # canonical record fields
    candidates: Callable[[Columns], tuple[tuple[str, ...], tuple[str, ...]]]
    kind: str  # "text-label", "tokens-tags" or "text-text"
    order: Callable[[set[str]], tuple[str, ...]] | None  # label names in index order (None: no labels)


FORMATS: dict[str, TaskFormat] = {
    "sequence-classification": TaskFormat(
        ("text", "label"), lambda c: ((c.text,), (c.label,)), "text-label", label_order
    ),
    "token-classification": TaskFormat(
        ("tokens", "tags"), lambda c: ((c.tokens,), (c.tags,)), "tokens-tags", tag_order
    ),
    "causal-lm": TaskFormat(
        ("prompt", "response"), lambda c: ((c.prompt, c.text), (c.response,)), "text-text", None
    ),
    "seq2seq": TaskFormat(
        ("source", "target"), lambda c: ((c.source, c.text), (c.target,)), "text-text", None
    ),
}


def read_records(
    path: Path, task: str, columns: Columns, label_names: Sequence[str] | None = None
) -> tuple[list[dict], tuple[str, ...] | None, str]:
    """All records of a user data set, with labels as indices: ``(records, label_names, description)``.

    ``label_names`` fixes the label set and its order (labels outside it are an error); by default it is
    made from the data (see :func:`~peftkit.data.core.label_order` and ``tag_order``).
    """
    fmt = FORMATS[task]
    source = open_rows(path)
    raw: list[tuple[str, dict]] = []
    for where, row in source.rows:
        first_column, second_column = (
            _pick(where, row, options, task) for options in fmt.candidates(columns)
        )
        first, second = row[first_column], row[second_column]
        if fmt.kind == "tokens-tags":
            tokens = _word_list(where, first_column, first, source.cells_are_text, "words")
            tags = _word_list(
                where,
                second_column,
                second,
                source.cells_are_text,
                "tags",
                source.class_names.get(second_column),
            )
            if not tokens:
                raise DataError(f"{where}: column {first_column!r} is empty; expected at least one word")
            if len(tokens) != len(tags):
                raise DataError(
                    f"{where}: {len(tokens)} words in {first_column!r} but {len(tags)} tags in {second_column!r}; "
                    "expected one tag per word"
                )
            record = {"tokens": tokens, "tags": tags}
        elif fmt.kind == "text-label":
            text = _text(where, first_column, first)
            label = _label(where, second_column, second, source.class_names.get(second_column))
            record = {"text": text, "label": label}
        else:
            record = {
                fmt.fields[0]: _text(where, first_column, first),
                fmt.fields[1]: _text(where, second_column, second),
            }
        raw.append((where, record))
    if not raw:
        raise DataError(f"{source.description}: empty: no records (expected a header and at least one row)")
    if fmt.order is None:
        return [r for _, r in raw], None, source.description
    return (*_encode_labels(raw, fmt, task, columns, label_names, source), source.description)


def _encode_labels(
    raw: list[tuple[str, dict]],
    fmt: TaskFormat,
    task: str,
    columns: Columns,
    label_names: Sequence[str] | None,
    source: RowSource,
) -> tuple[list[dict], tuple[str, ...]]:
    label_field = fmt.fields[1]
    column = columns.label if task == "sequence-classification" else columns.tags
    if label_names is not None:
        names = tuple(str(n) for n in label_names)
    elif column in source.class_names:
        names = source.class_names[column]
    else:
        seen: set[str] = set()
        for _, record in raw:
            value = record[label_field]
            seen.update(value if isinstance(value, list) else [value])
        names = fmt.order(seen)
    if label_names is None:  # a label set given by the caller (a trained head's) is not the data's to judge
        check_label_set(names, task, column, source.description)
    index = {name: i for i, name in enumerate(names)}
    records = []
    for where, record in raw:
        value = record[label_field]
        try:
            encoded = [index[v] for v in value] if isinstance(value, list) else index[value]
        except KeyError as err:
            raise DataError(
                f"{where}: unknown label {err.args[0]!r} in column {column!r}; expected one of: {', '.join(names)}"
            ) from None
        records.append({**record, label_field: encoded})
    return records, names


def _pick(where: str, row: dict, options: tuple[str, ...], task: str) -> str:
    for option in options:
        if option in row:
            return option
    wanted = " or ".join(repr(o) for o in dict.fromkeys(options))
    raise DataError(
        f"{where}: missing column {wanted} (needed for {task}); the columns are: {', '.join(map(str, row))}"
    )


def _text(where: str, column: str, value: Any) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} must hold text, got {_show(value)}")
    if not value.strip():
        raise DataError(f"{where}: column {column!r} is empty; expected non-empty text")
    return value


def _label(where: str, column: str, value: Any, class_names: tuple[str, ...] | None) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(
            f"{where}: column {column!r} must hold a label (a string or an integer), got {_show(value)}"
        )
    if isinstance(value, int) and class_names is not None and 0 <= value < len(class_names):
        return class_names[value]
    label = str(value).strip()
    if not label:
        raise DataError(f"{where}: column {column!r} is empty; expected a label")
    return label


def _word_list(
    where: str,
    column: str,
    value: Any,
    cells_are_text: bool,
    what: str,
    class_names: tuple[str, ...] | None = None,
) -> list[str]:
    if cells_are_text and isinstance(value, str):
        value = _parse_cell_list(where, column, value, what)
    if not isinstance(value, list | tuple):
        raise DataError(f"{where}: column {column!r} must hold a list of {what}, got {_show(value)}")
    items = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool) and what == "tags":
            items.append(class_names[item] if class_names and 0 <= item < len(class_names) else str(item))
        elif isinstance(item, str) and item.strip():
            items.append(item.strip() if what == "tags" else item)
        else:
            raise DataError(
                f"{where}: column {column!r} must hold a list of non-empty {what}, found {_show(item)}"
            )
    return items


def _parse_cell_list(where: str, column: str, cell: str, what: str) -> list:
    """A CSV cell holding a list: JSON (``["a", "b"]``) or words separated by spaces (``a b``)."""
    if cell.lstrip().startswith("["):
        try:
            return json.loads(cell)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{where}: column {column!r} looks like a JSON list of {what} but is not: {err.msg}"
            ) from None
    return cell.split()


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
