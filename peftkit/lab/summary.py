"""One row per method (and training-set size): the runs of all seeds folded together."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from peftkit.lab.records import RunRecord


@dataclass
class MethodSummary:
    method: str
    status: str  # "ok", "failed", or "partial" (some seeds failed)
    seeds: str  # e.g. "0,1,2"; the seeds whose runs succeeded
    metric: str | None
    metric_mean: float | None
    metric_std: float | None  # sample standard deviation over seeds (None with one seed)
    trainable: int | None
    trainable_percent: float | None
    adapter_params: int | None
    adapter_bytes: int | None
    peak_memory_bytes: int | None  # the largest over seeds
    predicted_peak_bytes: int | None  # what `peftkit plan` predicts for the run's settings (None: no plan)
    base_weight_bytes: int | None  # the base's weights in memory (4-bit where quantized)
    step_ms: float | None  # median over seeds of each run's median step
    train_seconds: float | None  # mean over seeds; optimizer steps only
    run_seconds: float | None  # mean over seeds; loading, training, evaluation and saving
    latency_base_ms: float | None  # median over seeds
    latency_unmerged_ms: float | None
    latency_merged_ms: float | None  # None: the method cannot merge
    learning_rate: float | None
    load_average: float | None  # the largest over seeds of the machine's mean load during a run
    error: str | None  # the first failed seed's error
    train_size: int | None = None  # training examples (None: the whole training split)
    steps: int | None = None  # optimizer steps of the first successful seed
    retained_measure: str | None = None  # "perplexity" where retained ability was measured
    retained_mean: float | None = None  # mean over seeds, adapter active
    retained_std: float | None = None  # sample standard deviation over seeds (None with one seed)
    retained_note: str | None = None  # why there is no value


COLUMNS = list(MethodSummary.__dataclass_fields__)


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarize(records: list[RunRecord]) -> list[MethodSummary]:
    """One row per (method, training-set size), in the order they first appear in ``records``."""
    keys = list(dict.fromkeys((r.method, r.train_size) for r in records))
    return [_summarize_method(m, [r for r in records if (r.method, r.train_size) == (m, n)]) for m, n in keys]


def _spread(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation) of ``values``; None where there are too few."""
    mean = statistics.fmean(values) if values else None
    return mean, statistics.stdev(values) if len(values) > 1 else None


def _summarize_method(method: str, runs: list[RunRecord]) -> MethodSummary:
    good = [r for r in runs if r.ok]
    failed = [r for r in runs if not r.ok]
    status = "ok" if not failed else ("failed" if not good else "partial")
    error = f"seed {failed[0].seed}: {failed[0].error}" if failed else None
    values = [r.metric_value for r in good if r.metric_value is not None]
    first = good[0] if good else None
    retained = _spread([r.retained_value for r in good if r.retained_value is not None])
    return MethodSummary(
        method=method,
        status=status,
        seeds=",".join(str(r.seed) for r in good),
        metric=first.metric if first else None,
        metric_mean=statistics.fmean(values) if values else None,
        metric_std=statistics.stdev(values) if len(values) > 1 else None,
        trainable=first.trainable if first else None,
        trainable_percent=first.trainable_percent if first else None,
        adapter_params=first.adapter_params if first else None,
        adapter_bytes=first.adapter_bytes if first else None,
        peak_memory_bytes=max((r.peak_memory_bytes for r in good if r.peak_memory_bytes), default=None),
        predicted_peak_bytes=None,  # set by the comparison, which knows the settings
        base_weight_bytes=first.base_weight_bytes if first else None,
        step_ms=_median(r.step_ms for r in good),
        train_seconds=_mean(r.train_seconds for r in good),
        run_seconds=_mean(r.run_seconds for r in good),
        latency_base_ms=_median(r.latency_base_ms for r in good),
        latency_unmerged_ms=_median(r.latency_unmerged_ms for r in good),
        latency_merged_ms=_median(r.latency_merged_ms for r in good),
        learning_rate=first.learning_rate if first else None,
        load_average=max((r.load_average for r in good if r.load_average is not None), default=None),
        error=error,
        train_size=runs[0].train_size,
        steps=first.steps if first else None,
        retained_measure=first.retained_measure if first else None,
        retained_mean=retained[0],
        retained_std=retained[1],
        retained_note=first.retained_note if first else None,
    )
