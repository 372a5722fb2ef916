"""``labels.json`` of a training run: the task and the label names its head was built for, read with every
problem named (file, key, what is allowed) instead of a JSON, key or index error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftkit.config import ConfigError
from peftkit.data.core import TASKS

LABELLED_TASKS = ("sequence-classification", "token-classification")


def read_labels_file(path: Path) -> tuple[str, list[str] | None]:
    """``(task, label_names)`` of a run's ``labels.json``: ``{"task": one of TASKS, "label_names": [at least
    two distinct names] for the classification tasks, null for the generation tasks}``. Raises ConfigError
    naming the file for one that is missing, not JSON, or not of that form."""
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing: the run's task and label names are unknown") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f'{path} must hold a JSON object {{"task": ..., "label_names": ...}}, got {data!r:.60}'
        )
    task, names = data.get("task"), data.get("label_names")
    if task not in TASKS:
        raise ConfigError(f"{path}: `task` must be one of {', '.join(TASKS)}, got {task!r}")
    if task not in LABELLED_TASKS:
        if names is not None:
            raise ConfigError(f"{path}: `label_names` must be null for {task}, got {names!r:.60}")
        return task, None
    ok = isinstance(names, list) and all(isinstance(n, str) and n for n in names)
    if not ok or len(names) < 2 or len(set(names)) != len(names):
        raise ConfigError(
            f"{path}: `label_names` must be a list of at least 2 distinct non-empty names for {task}, "
            f"got {names!r:.80}"
        )
    return task, names
