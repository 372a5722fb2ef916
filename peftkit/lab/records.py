"""What the lab keeps of one run: the worker's result plus timings and the loss curve from ``metrics.jsonl``."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    loss_curve: list[tuple[int, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def step_seconds(entries: list[dict[str, Any]], global_batch: int) -> list[float]:
    """Seconds of each optimizer step, from the examples per second the loop logs."""
    return [global_batch / e["examples_per_s"] for e in entries if e.get("kind") == "train"]


def median_after_warmup(values: list[float], warmup: int = WARMUP_STEPS) -> float | None:
    if not values:
        return None
    kept = values[min(warmup, len(values) - 1) :]  # at least one value, however short the run
    return statistics.median(kept)


def read_run(method: str, seed: int, run_dir: Path, result: dict[str, Any]) -> RunRecord:
    if result.get("status") != "ok":
        return RunRecord(method, seed, "failed", error=result.get("error") or "unknown error")
    metrics_path = run_dir / "metrics.jsonl"
    entries = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    seconds = step_seconds(entries, result["global_batch"])
    latency = result["latency"]
    median = median_after_warmup(seconds)
    return RunRecord(
        method=method,
        seed=seed,
        status="ok",
        metric=result["primary_metric"],
        metric_value=result["test_metrics"].get(result["primary_metric"]),
        trainable=result["trainable"],
        trainable_percent=result["trainable_percent"],
        base_params=result["base_params"],
        adapter_params=result["adapter_params"],
        adapter_bytes=result["adapter_bytes"],
        peak_memory_bytes=result["peak_memory_bytes"],
        base_weight_bytes=result.get("base_weight_bytes"),
        step_ms=1000 * median if median is not None else None,
        train_seconds=sum(seconds),
        run_seconds=result["run_seconds"],
        steps=result["steps"],
        learning_rate=result["learning_rate"],
        latency_base_ms=latency["base_ms"],
        latency_unmerged_ms=latency["unmerged_ms"],
        latency_merged_ms=latency["merged_ms"],
        merge_note=latency["merge_note"],
        load_average=result.get("load_average"),
        loss_curve=[(e["step"], e["loss"]) for e in entries if e.get("kind") == "train"],
    )
