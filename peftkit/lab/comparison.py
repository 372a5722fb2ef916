"""``peftkit compare`` as a library call: plan the runs, run each in its own process, tabulate, chart."""

from __future__ import annotations

import datetime
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.config import ConfigError
from peftkit.lab import machine
from peftkit.lab.charts import write_charts
from peftkit.lab.plan import RUNS_DIR, plan_runs
from peftkit.lab.progress import ComparisonProgress
from peftkit.lab.records import RunRecord, read_run
from peftkit.lab.runner import finished_result, launch
from peftkit.lab.summary import MethodSummary, summarize
from peftkit.lab.tables import JSON, write_tables
from peftkit.planning import predicted_peaks
from peftkit.training.config import TrainConfig


@dataclass
class Comparison:
    rows: list[MethodSummary]  # one per method, in the order asked
    runs: list[RunRecord]  # one per (method, seed)
    files: list[Path]  # tables and charts written


def run_comparison(
    base: TrainConfig,
    methods: Sequence[str],
    seeds: Sequence[int],
    output_dir: str | Path,
    method_settings: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    show_progress: bool = True,
    latency_batch: int = 16,
    latency_repeats: int = 20,
    timeout: float | None = None,
    context: Mapping[str, Any] | None = None,
) -> Comparison:
    """Train every method with every seed on ``base``'s model, data and budget, each run in a process of its
    own, and write ``results.{md,csv,json}`` and the charts into ``output_dir``.

    A run that fails (bad settings, a method the model refuses, a crash) becomes a failed row with its error;
    the comparison goes on. ``method_settings[method]`` overrides ``base`` for that method only (see
    :func:`peftkit.lab.defaults.default_method_settings`)."""
    if not methods or not seeds:
        raise ConfigError("a comparison needs at least one method and one seed")
    output_dir = Path(output_dir)
    _claim(output_dir, overwrite, resume)
    specs = plan_runs(base, methods, seeds, output_dir, method_settings)
    progress = ComparisonProgress(specs, disable=not show_progress)
    runs = []
    try:
        for index, spec in enumerate(specs):
            progress.start(index, spec)
            result = finished_result(spec) if resume else None
            if result is not None:
                progress.reused(index)
            else:
                on_steps = lambda steps, i=index: progress.steps_done(i, steps)  # noqa: E731
                result = launch(spec, on_steps, latency_batch, latency_repeats, timeout)
            record = read_run(spec.method, spec.seed, result)
            runs.append(record)
            progress.finish(index, record.ok)
    finally:
        progress.close()
    rows = summarize(runs)
    predicted = predicted_peaks(base, list(methods))
    for row in rows:
        row.predicted_peak_bytes = predicted.get(row.method)
    files = write_tables(rows, runs, output_dir, _describe(base, methods, seeds, context))
    files += write_charts(rows, runs, output_dir, _title(base))
    return Comparison(rows, runs, files)


def _claim(output_dir: Path, overwrite: bool, resume: bool) -> None:
    """Make ``output_dir`` ready: an earlier comparison there is replaced (``overwrite``) or reused
    (``resume``), never overwritten by accident (ConfigError)."""
    if overwrite and resume:
        raise ConfigError(
            "--overwrite and --resume exclude each other: replace the earlier runs, or reuse them"
        )
    previous = [output_dir / JSON, output_dir / RUNS_DIR]
    if any(p.exists() for p in previous) and not resume:
        if not overwrite:
            raise ConfigError(
                f"{output_dir} holds an earlier comparison: pass --resume to reuse its finished runs, "
                "--overwrite to replace it, or another --output-dir"
            )
        shutil.rmtree(output_dir / RUNS_DIR, ignore_errors=True)


def _length(base: TrainConfig) -> str:
    """The training budget in words: steps, or epochs when the steps are not capped."""
    return f"{base.max_steps} steps" if base.max_steps else f"{base.epochs:g} epochs"


def _title(base: TrainConfig) -> str:
    """The setting under every chart's title: a folder's name, not its path."""
    return f"{Path(base.model).name} on {Path(base.dataset).name}, {_length(base)}"


def _describe(base, methods, seeds, context) -> dict[str, Any]:
    """The context lines of ``results.md``: model, data, methods, seeds, budget, date, machine."""
    length = _length(base)
    return {
        "model": base.model,
        "dataset": base.dataset,
        "task": base.task or "inferred from the dataset",
        "methods": ", ".join(methods),
        "seeds": ", ".join(str(s) for s in seeds),
        "budget": f"{length} of batch {base.batch_size} x {base.gradient_accumulation} accumulation, "
        f"max length {base.max_length or 'from the data (99th percentile)'}",
        **(context or {}),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine.describe(),
    }
