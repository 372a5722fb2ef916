"""``peftkit train`` as one call: prepare, fit, finish (see :mod:`peftkit.training.run`)."""

from __future__ import annotations

from collections.abc import Callable

from tqdm.auto import tqdm

from peftkit.training.config import TrainConfig
from peftkit.training.finished import LoadedRun, load_run
from peftkit.training.record import TrainResult
from peftkit.training.run import TrainingRun

__all__ = ["LoadedRun", "TrainResult", "load_run", "train"]


def train(config: TrainConfig, log: Callable[[str], None] = tqdm.write) -> TrainResult:
    """Train ``config.method`` on ``config.model`` and ``config.dataset``; the run's record.

    Writes the run's folder (``config.output_dir``, see :class:`~peftkit.training.layout.RunFolder`). Raises
    ConfigError (or DataError) for settings, data or a folder that cannot be used. ``log`` receives the
    progress messages (``tqdm.write`` keeps the bar whole)."""
    config.validate()  # again: a config's fields may have been changed since it was built
    run = TrainingRun.prepare(config, log)
    try:
        run.fit()
        return run.finish()
    finally:
        run.close()  # the folder's lock, also when the run stopped on an error
