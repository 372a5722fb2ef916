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
from peftkit.lab.plan import DEFAULT_DATA_SEED, RUNS_DIR, plan_runs
from peftkit.lab.progress import ComparisonProgress
from peftkit.lab.records import RunRecord, read_run
from peftkit.lab.runner import BASE_RETAINED, base_retention, finished_result, launch
from peftkit.lab.summary import MethodSummary, summarize
from peftkit.lab.tables import JSON, NOT_RUN, write_tables
from peftkit.planning import predicted_peaks
from peftkit.training.config import TrainConfig


@dataclass
class Comparison:
    rows: list[MethodSummary]  # one per method, in the order asked
    runs: list[RunRecord]  # one per (method, seed)
    files: list[Path]  # tables and charts written
    retained_base: dict[str, Any] | None = None  # the base model's retained ability (with --retain-eval)


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
    train_sizes: Sequence[int] | None = None,
    min_steps: int = 20,
    retain: Mapping[str, Any] | None = None,
    test_limit: int | None = None,
    report_only: bool = False,
) -> Comparison:
    """Train every method with every seed on ``base``'s model, data and budget, each run in a process of its
    own, and write ``results.{md,csv,json}`` and the charts into ``output_dir``.

    A run that fails (bad settings, a method the model refuses, a crash) becomes a failed row with its error;
    the comparison goes on. ``method_settings[method]`` overrides ``base`` for that method only (see
    :func:`peftkit.lab.defaults.default_method_settings`).

    ``train_sizes``: every method and seed also runs on each training-set size, nested subsets of one split
    with a budget that grows with the size (see :mod:`peftkit.lab.plan`). ``retain``
    (``{"text", "tokens", "length"}``): each trained model, and once the base model, is scored on that
    general text (see :mod:`peftkit.lab.retain`). ``test_limit``: only the first records of the test split
    (fixed by the data seed) are scored, to bound the time of many runs. ``report_only``: train nothing;
    tabulate the runs of an earlier comparison in ``output_dir`` that finished with these settings (a
    comparison cut short), the others as "not run"."""
    if not methods or not seeds:
        raise ConfigError("a comparison needs at least one method and one seed")
    if test_limit is not None and test_limit <= 0:
        raise ConfigError(f"--test-limit must be a positive integer, got {test_limit}")
    output_dir = Path(output_dir)
    _claim(output_dir, overwrite, resume or report_only)
    retain = dict(retain) if retain is not None else None
    specs = plan_runs(base, methods, seeds, output_dir, method_settings, train_sizes, min_steps)
    launch_settings = (latency_batch, latency_repeats, timeout, retain, test_limit)
    runs = _run_all(specs, launch_settings, resume, report_only, show_progress)
    retained_base = None
    if retain:
        retained_base = base_retention(specs, runs, output_dir, retain, resume or report_only)
    rows = summarize(runs)
    predicted = predicted_peaks(base, list(methods))
    for row in rows:
        row.predicted_peak_bytes = predicted.get(row.method)
    described = _describe(base, methods, seeds, context, train_sizes, min_steps, retain)
    if test_limit is not None:
        described["test records"] = f"the first {test_limit} of the test split"
    files = write_tables(rows, runs, output_dir, described, retained_base)
    files += write_charts(rows, runs, output_dir, _title(base, bool(train_sizes)), retained_base)
    return Comparison(rows, runs, files, retained_base)


def _run_all(specs, launch_settings: tuple, resume: bool, report_only: bool, show_progress: bool) -> list:
    """Each run's record, in ``specs``' order: reused when finished with the same settings (``resume``,
    ``report_only``), "not run" with ``report_only``, else launched in a process of its own."""
    retain, test_limit = launch_settings[3], launch_settings[4]
    progress = ComparisonProgress(specs, disable=not show_progress)
    runs = []
    try:
        for index, spec in enumerate(specs):
            progress.start(index, spec)
            result = finished_result(spec, retain, test_limit) if resume or report_only else None
            if result is not None:
                progress.reused(index)
            elif report_only:
                result = {"status": "failed", "error": f"not run: {NOT_RUN}"}
            else:
                on_steps = lambda steps, i=index: progress.steps_done(i, steps)  # noqa: E731
                result = launch(spec, on_steps, *launch_settings)
            record = read_run(spec.method, spec.seed, result, spec.train_size)
            runs.append(record)
            progress.finish(index, record.ok)
    finally:
        progress.close()
    return runs


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
        (output_dir / BASE_RETAINED).unlink(missing_ok=True)


def _length(base: TrainConfig) -> str:
    """The training budget in words: steps, or epochs when the steps are not capped."""
    return f"{base.max_steps} steps" if base.max_steps else f"{base.epochs:g} epochs"


def _title(base: TrainConfig, sized: bool = False) -> str:
    """The setting under every chart's title: a folder's name, not its path."""
    length = (
        f"{base.epochs:g} epochs of each size, capped at {base.max_steps} steps" if sized else _length(base)
    )
    return f"{Path(base.model).name} on {Path(base.dataset).name}, {length}"


def _describe(base, methods, seeds, context, train_sizes, min_steps, retain) -> dict[str, Any]:
    """The context lines of ``results.md``: model, data, methods, seeds, budget, date, machine."""
    length = _length(base)
    extra = {}
    if train_sizes:
        data_seed = DEFAULT_DATA_SEED if base.data_seed is None else base.data_seed
        extra["training-set sizes"] = (
            f"{', '.join(map(str, sorted(train_sizes)))}: the first N of the training split shuffled with "
            f"data seed {data_seed} (nested; the same for every method and seed; validation and test whole)"
        )
        ceiling = f", at most {base.max_steps}" if base.max_steps else ""
        length = f"ceil({base.epochs:g} epochs x size / global batch) steps, at least {min_steps}{ceiling}"
    if retain:
        extra["retained ability"] = (
            f"perplexity (causal LMs) or masked-LM loss (encoders with a masked-LM head) on "
            f"{retain['text']} (first {retain['tokens']} tokens' worth of "
            f"{retain['length']}-token windows), adapter active"
        )
    return {
        "model": base.model,
        "dataset": base.dataset,
        "task": base.task or "inferred from the dataset",
        "methods": ", ".join(methods),
        "seeds": ", ".join(str(s) for s in seeds),
        "budget": f"{length} of batch {base.batch_size} x {base.gradient_accumulation} accumulation, "
        f"max length {base.max_length or 'from the data (99th percentile)'}",
        **extra,
        **(context or {}),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine.describe(),
    }
