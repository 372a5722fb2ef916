"""A run's folder on disk: the only code that spells its file names.

::

    <run>/config.yaml          the effective settings (enough to repeat or resume the run)
    <run>/labels.json          the task and the label names the head was built for
    <run>/metrics.jsonl        one JSON object per optimizer step ("train"), evaluation ("eval") and test
    <run>/curves.png           training loss and the validation metric against step
    <run>/checkpoint/          adapter + trainer_state.pt, for ``--resume`` (swapped in atomically)
    <run>/checkpoint.previous/ the checkpoint before it, kept in case the latest one is found damaged
    <run>/train.lock           locked (``flock``) by the process writing the run, with its pid and host
    <run>/adapter/             the trained adapter, in the Hugging Face PEFT format
    <run>/result.json          the run's :class:`~peftkit.training.record.TrainResult`
    <run>/lab_result.json      a comparison's record of the run (the result, its latency; or its error)
    <run>/worker.log           a comparison worker's output

A checkpoint is built in a temporary folder and swapped in with renames, the one before it kept as
``checkpoint.previous``, so a run killed at any moment leaves at least one whole checkpoint, and a
checkpoint damaged afterwards still leaves the one before it. ``trainer_state.pt`` holds only tensors,
numbers and strings and is read back with ``torch.load(weights_only=True)``, which refuses code.

One process writes a run at a time: :meth:`RunFolder.lock` is taken by ``peftkit train`` before it writes
anything, and dies with the process (see :mod:`peftkit.training.lock`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from peftkit.checkpoint import fsync_path
from peftkit.config import ConfigError
from peftkit.file_checks import CheckpointError
from peftkit.training.config import TrainConfig, drop_other_methods_defaults
from peftkit.training.lock import FolderLock

_CONFIG = "config.yaml"
_LABELS = "labels.json"
_METRICS = "metrics.jsonl"
_CURVES = "curves.png"
_CHECKPOINT = "checkpoint"
_PREVIOUS = "checkpoint.previous"
_STATE = "trainer_state.pt"
_BUILDING = ".checkpoint-"
_LOCK = "train.lock"
_ADAPTER = "adapter"
_RESULT = "result.json"
_LAB_RECORD = "lab_result.json"
_WORKER_LOG = "worker.log"


class RunFolder:
    """The files of one run under ``root``. Nothing is created until something is written."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    # --- settings and labels
    @property
    def config_path(self) -> Path:
        return self.root / _CONFIG

    @property
    def adapter_dir(self) -> Path:
        return self.root / _ADAPTER

    @property
    def curves_path(self) -> Path:
        return self.root / _CURVES

    @property
    def worker_log(self) -> Path:
        return self.root / _WORKER_LOG

    def lock(self) -> FolderLock:
        """The folder's writer lock (take it with ``acquire``; see :mod:`peftkit.training.lock`)."""
        return FolderLock(self.root / _LOCK)

    def writer(self) -> str | None:
        """The live process writing this run ("pid 12 on host h since ..."), or None. Reads only."""
        return self.lock().holder()

    def names(self) -> set[str]:
        """The names of the folder's entries (none when it does not exist)."""
        return {path.name for path in self.root.iterdir()} if self.root.is_dir() else set()

    def make(self) -> Path | None:
        """Create the folder (and its missing parents); the topmost folder created, None when it existed."""
        created = None
        for folder in (self.root, *self.root.parents):
            if folder.exists():
                break
            created = folder
        self.root.mkdir(parents=True, exist_ok=True)
        return created

    def remove_new(self, before: set[str], created: Path | None) -> None:
        """Undo a run that failed before training: remove the entries not in ``before`` (the lock file
        included), and the folders from the root up to ``created`` once empty (a run that made them)."""
        for name in self.names() - before:
            path = self.root / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        if created is None:
            return
        for folder in (self.root, *self.root.parents):
            with contextlib.suppress(OSError):  # not empty: something else was written there meanwhile
                folder.rmdir()
            if folder == created:
                break

    def is_empty(self) -> bool:
        """True when the folder holds nothing but (maybe) its lock file."""
        return all(path.name == _LOCK for path in self.root.iterdir())

    def is_finished(self) -> bool:
        """Settings and a saved adapter: what ``peftkit eval`` / ``predict`` need."""
        return self.config_path.is_file() and self.adapter_dir.is_dir()

    def save_config(self, config: TrainConfig) -> None:
        """Write ``config.yaml``: the effective settings, enough to repeat or resume the run."""
        config.save(self.config_path)

    def read_config(self) -> TrainConfig:
        """The settings the run was started with. Raises ConfigError, naming the file, for one that is not
        valid."""
        try:
            return TrainConfig.from_dict(
                drop_other_methods_defaults(TrainConfig.read_settings(self.config_path))
            )
        except ConfigError as error:
            if str(self.config_path) in str(error):
                raise
            raise ConfigError(f"{self.config_path}: {error}") from error

    def write_labels(self, task: str, label_names: list[str] | None) -> None:
        """Write ``labels.json``: the task and the label names the head was built for."""
        self._write_json(_LABELS, {"task": task, "label_names": label_names})

    def task(self) -> str | None:
        """The run's task name; None when the run wrote no labels (yet)."""
        path = self.root / _LABELS
        return json.loads(path.read_text()).get("task") if path.is_file() else None

    def read_labels(self) -> tuple[str, list[str] | None]:
        """(task name, label names) the run's head was built for; raises ConfigError naming the file for one
        that is not of that form (see :func:`~peftkit.data.labels_file.read_labels_file`)."""
        from peftkit.data.labels_file import read_labels_file

        return read_labels_file(self.root / _LABELS)

    # --- metrics log
    def log(self, **entry: Any) -> None:
        """Append one JSON line to the metrics log (``kind`` says what it is: train, eval, test)."""
        with (self.root / _METRICS).open("a") as handle:
            handle.write(json.dumps(entry, default=str) + "\n")

    def entries(self) -> list[dict[str, Any]]:
        """The metrics log, in order; a line still being written by a live run is skipped."""
        path = self.root / _METRICS
        if not path.is_file():
            return []
        entries = []
        for line in path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return entries

    def plot_curves(self, metric: str) -> Path:
        """``curves.png``: training loss against step, and the validation ``metric`` against step."""
        from peftkit.training.curves import plot_curves

        return plot_curves(self.entries(), metric, self.curves_path)

    def steps_logged(self) -> int:
        """Optimizer steps a (possibly live) run has logged so far."""
        return max((e["step"] for e in self.entries() if e.get("kind") == "train"), default=0)

    def keep_log_until(self, step: int) -> None:
        """Drop the log entries after optimizer step ``step`` (a resumed run redoes those steps), whole or
        not at all."""
        path = self.root / _METRICS
        if path.is_file():
            kept = [e for e in self.entries() if not isinstance(e.get("step"), int) or e["step"] <= step]
            temporary = path.with_suffix(".tmp")
            temporary.write_text("".join(json.dumps(e, default=str) + "\n" for e in kept))
            os.replace(temporary, path)

    # --- checkpoints
    def save_checkpoint(self, model, trainer_state: dict[str, Any]) -> Path:
        """Write ``checkpoint/`` (the adapter and ``trainer_state``) atomically: built aside, synced to disk,
        swapped in; the checkpoint it replaces becomes ``checkpoint.previous`` (the older one is removed)."""
        import torch

        target, previous = self.root / _CHECKPOINT, self.root / _PREVIOUS
        for stale in self.root.glob(_BUILDING + "*"):  # left by a killed run (the lock says none is running)
            shutil.rmtree(stale, ignore_errors=True)
        building = Path(tempfile.mkdtemp(prefix=_BUILDING, dir=self.root))
        try:
            model.save_pretrained(building / _ADAPTER)
            torch.save(trainer_state, building / _STATE)
            fsync_path(building / _STATE)
            if (target / _STATE).is_file():  # whole (only ever made by a rename): it becomes the previous one
                shutil.rmtree(previous, ignore_errors=True)
                target.rename(previous)
            else:
                shutil.rmtree(target, ignore_errors=True)
            building.rename(target)
            fsync_path(self.root)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        return target

    def find_checkpoint(self) -> Path | None:
        """The latest checkpoint that has its trainer state (a run killed between the two renames of a save
        left only ``.previous``); whether it is intact is :meth:`load_trainer_state`'s to say."""
        for name in (_CHECKPOINT, _PREVIOUS):
            if (self.root / name / _STATE).is_file():
                return self.root / name
        return None

    def checkpoints(self) -> list[Path]:
        """The checkpoint folders present, newest first (``checkpoint``, then ``checkpoint.previous``)."""
        return [self.root / name for name in (_CHECKPOINT, _PREVIOUS) if (self.root / name).is_dir()]

    @staticmethod
    def checkpoint_adapter(checkpoint: Path) -> Path:
        """The adapter folder inside ``checkpoint`` (from :meth:`find_checkpoint`)."""
        return checkpoint / _ADAPTER

    @staticmethod
    def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
        """The optimizer, scheduler, RNG and progress state saved with ``checkpoint`` (no code is loaded).

        Raises :class:`CheckpointError` naming the file when it is missing, cannot be read (truncated, not
        a torch file, a pickle of objects that ``weights_only`` refuses) or lacks the expected entries."""
        import torch

        from peftkit.training.state import check_trainer_state

        path = checkpoint / _STATE
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated zip, random bytes, refused globals: all the same to the user
            reason = " ".join(str(error).split())[:200]
            raise CheckpointError(f"{path} cannot be read ({type(error).__name__}: {reason})") from None
        check_trainer_state(state, path)
        return state

    # --- what a finished run reports
    def write_result(self, result: dict[str, Any]) -> None:
        """Write the run's record (:meth:`TrainResult.to_dict`), whole or not at all."""
        self._write_json(_RESULT, result)

    def read_result(self) -> dict[str, Any] | None:
        """The run's record as written by :meth:`write_result`; None before the run finished."""
        return self._read_json(_RESULT)

    def write_lab_record(self, record: dict[str, Any]) -> None:
        """Write a comparison's record of this run (see :mod:`peftkit.lab.worker`), whole or not at all."""
        self._write_json(_LAB_RECORD, record)

    def read_lab_record(self) -> dict[str, Any] | None:
        """A comparison's record of this run; None when its worker wrote none."""
        return self._read_json(_LAB_RECORD)

    def clear(self) -> None:
        """Remove the folder and everything in it, then create it empty (a comparison re-running a run)."""
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)

    def _write_json(self, name: str, value: Any) -> None:
        """Whole or not at all: written aside, then renamed over the old file."""
        target = self.root / name
        temporary = target.with_suffix(".tmp")
        temporary.write_text(json.dumps(value, indent=1, default=str))
        os.replace(temporary, target)

    def _read_json(self, name: str) -> Any:
        path = self.root / name
        return json.loads(path.read_text()) if path.is_file() else None
