"""What the lab keeps of one run: the run's own record (:class:`TrainResult`) with the worker's latency and the
machine's load."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from peftkit.training.record import TrainResult

WARMUP_STEPS = 5  # first optimizer steps left out of the step time (allocator, caches, lazy init)


@dataclass
class RunRecord:
    method: str
    seed: int
    status: str  # "ok" or "failed"
    error: str | None = None
    metric: str | None = None  # the task's primary metric (accuracy, f1, ...)
    metric_value: float | None = None
    trainable: int | None = None
    trainable_percent: float | None = None
    base_params: int | None = None
    adapter_params: int | None = None  # values in the saved adapter file
    adapter_bytes: int | None = None
    peak_memory_bytes: int | None = None
    base_weight_bytes: int | None = (
        None  # the frozen base's weights as held in memory (4-bit where quantized)
    )
    step_ms: float | None = None  # median optimizer step after warm-up
    train_seconds: float | None = None  # sum of all optimizer steps
    run_seconds: float | None = None  # the whole run: loading, training, evaluation, saving
    steps: int | None = None
    learning_rate: float | None = None
    latency_base_ms: float | None = None
    latency_unmerged_ms: float | None = None
    latency_merged_ms: float | None = None  # None: cannot merge
    merge_note: str | None = None
    load_average: float | None = None  # mean 1-minute load average of the machine during the run
    train_size: int | None = None  # training examples (None: the whole training split)
    retained_measure: str | None = None  # "perplexity" (causal LMs); None: not measured or not applicable
    retained_value: float | None = None  # the measure on the general text, adapter active
    retained_note: str | None = None  # why there is no value
    loss_curve: list[tuple[int, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def median_after_warmup(values: list[float], warmup: int = WARMUP_STEPS) -> float | None:
    """Median of ``values`` without the first ``warmup`` (at least one value kept); None for none."""
    if not values:
        return None
    kept = values[min(warmup, len(values) - 1) :]  # at least one value, however short the run
    return statistics.median(kept)


def read_run(method: str, seed: int, record: dict[str, Any], train_size: int | None = None) -> RunRecord:
    """The lab's row of one run, from the record its worker wrote (see :mod:`peftkit.lab.worker`)."""
    if record.get("status") != "ok":
        error = record.get("error") or "unknown error"
        return RunRecord(method, seed, "failed", error=error, train_size=train_size)
    result = TrainResult.from_dict(record["result"])
    latency = record["latency"]
    median = median_after_warmup(result.step_seconds)
    return RunRecord(
        method=method,
        seed=seed,
        status="ok",
        metric=result.primary_metric,
        metric_value=result.test_metrics.get(result.primary_metric),
        trainable=result.trainable,
        trainable_percent=result.trainable_percent,
        base_params=result.base_params,
        adapter_params=result.adapter_params,
        adapter_bytes=result.adapter_file_bytes,
        peak_memory_bytes=result.peak_memory_bytes,
        base_weight_bytes=result.base_weight_bytes,
        step_ms=1000 * median if median is not None else None,
        train_seconds=result.train_seconds,
        run_seconds=result.seconds,
        steps=result.steps,
        learning_rate=result.learning_rate,
        latency_base_ms=latency["base_ms"],
        latency_unmerged_ms=latency["unmerged_ms"],
        latency_merged_ms=latency["merged_ms"],
        merge_note=latency["merge_note"],
        load_average=record.get("load_average"),
        train_size=train_size,
        **_retained(record.get("retained")),
        loss_curve=list(result.loss_curve),
    )


def _retained(retained: dict[str, Any] | None) -> dict[str, Any]:
    """The record's retained-ability fields (see :mod:`peftkit.lab.retain`); none when it was not measured."""
    if not retained:
        return {}
    measure = retained.get("measure")
    return {
        "retained_measure": measure,
        "retained_value": retained.get(measure) if measure else None,
        "retained_note": retained.get("note"),
    }
