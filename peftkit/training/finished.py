"""A finished run read back: its model with the adapter for ``peftkit eval`` / ``predict`` / ``generate``
and the lab's latency measurement, and errors that say which record a missing model or data set came from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.config import ConfigError
from peftkit.data.model_checks import check_labels_fit_head
from peftkit.model import PeftModel
from peftkit.tasks import TASKS
from peftkit.training.config import TrainConfig
from peftkit.training.layout import RunFolder
from peftkit.training.methods import prepare_base
from peftkit.training.runtime import quiet_transformers


@dataclass
class LoadedRun:
    """A finished run's model with its adapter, and what is needed to feed it."""

    config: TrainConfig
    task: Any  # peftkit.tasks.Task
    tokenizer: Any
    model: PeftModel
    label_names: list[str] | None


def load_run(run_dir: str | Path, log: Callable[[str], None] = lambda _: None) -> LoadedRun:
    """A finished run (``config.yaml``, ``labels.json`` and ``adapter/`` in ``run_dir``) on a fresh base.

    A run being resumed meanwhile is read as its last finish left it (``log`` says so): its adapter folder
    is swapped whole, and the settings read here cannot change on a resume. Raises ConfigError when
    ``run_dir`` is not a finished run, and for a recorded model that cannot be loaded (naming the record)."""
    from peftkit.assets import resolve_model

    folder = finished_folder(run_dir, log)
    config = folder.read_config()
    task_name, label_names = folder.read_labels()
    check_labels_fit_head(label_names, folder.adapter_dir, f"the labels file of {folder.root}")
    task = TASKS[task_name]
    model_dir = from_record(folder, f"model {config.model!r}", lambda: resolve_model(config.model, log=log))
    tokenizer = task.load_tokenizer(model_dir)
    with quiet_transformers():
        base = task.load_model(model_dir, label_names, tokenizer)
    prepare_base(config, base)  # a QLoRA adapter is evaluated on the 4-bit base it was trained on
    model = PeftModel.from_pretrained(base, folder.adapter_dir)
    return LoadedRun(config, task, tokenizer, model, label_names)


def finished_folder(run_dir: str | Path, log: Callable[[str], None] = lambda _: None) -> RunFolder:
    """``run_dir`` as a finished run's folder; ``log`` notes a run being trained in it now. Raises
    ConfigError when it holds no finished run (naming the process training it, if one is)."""
    folder = RunFolder(run_dir)
    writer = folder.writer()
    if not folder.is_finished():
        training = f"; it is being trained now ({writer}) and gets its adapter when it ends" if writer else ""
        raise ConfigError(
            f"{folder.root} is not a finished training run (config.yaml and adapter/ are expected){training}"
        )
    if writer is not None:
        log(
            f"note: {folder.root} is being trained further now ({writer}); using the adapter it last finished with"
        )
    return folder


def from_record(folder: RunFolder, what: str, load: Callable[[], Any]) -> Any:
    """``load()``, with an error naming where ``what`` came from: "model 'x' recorded in RUN/config.yaml"."""
    try:
        return load()
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"{what} recorded in {folder.config_path}: {error}") from error
