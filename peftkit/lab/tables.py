"""The comparison table in three forms: Markdown to read, CSV for spreadsheets, JSON for programs.

CSV and JSON hold raw numbers (bytes, milliseconds; empty / null where there is no value); the Markdown table
holds the same numbers formatted, "n/a" where a method cannot merge, and each failed method's error.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from peftkit.accounting import format_bytes
from peftkit.lab.records import RunRecord
from peftkit.lab.summary import COLUMNS, MethodSummary

MARKDOWN, CSV, JSON = "results.md", "results.csv", "results.json"


def write_tables(
    rows: list[MethodSummary], runs: list[RunRecord], directory: Path, context: dict[str, Any]
) -> list[Path]:
    """``results.md``, ``results.csv`` and ``results.json`` in ``directory``; their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / CSV).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})
    document = {
        "context": context,
        "methods": [asdict(r) for r in rows],
        "runs": [{k: v for k, v in asdict(r).items() if k != "loss_curve"} for r in runs],
    }
    (directory / JSON).write_text(json.dumps(document, indent=1, default=str) + "\n")
    (directory / MARKDOWN).write_text(markdown(rows, context))
    return [directory / name for name in (MARKDOWN, CSV, JSON)]


def markdown(rows: list[MethodSummary], context: dict[str, Any]) -> str:
    """``results.md``: a title, the setting (``context``), the table and what its columns mean."""
    model, dataset = (Path(str(context.get(k))).name for k in ("model", "dataset"))
    lines = [f"# peftkit compare: {model} on {dataset}", ""]
    lines += [f"- {k}: {v}" for k, v in context.items()]
    return "\n".join(lines) + "\n\n" + markdown_table(rows)


def markdown_table(rows: list[MethodSummary]) -> str:
    """The table, one row per method, and the paragraph saying what its columns mean."""
    metric = next((r.metric for r in rows if r.metric), "metric")
    header = [
        "method",
        f"test {metric}",
        "trainable params",
        "% of base",
        "adapter file",
        "peak memory",
        "predicted peak",
        "base weights",
        "step (ms)",
        "training (s)",
        "run (s)",
        "latency base (ms)",
        "unmerged (ms)",
        "merged (ms)",
        "learning rate",
        "load",
        "status",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r.method,
            _metric(r),
            _int(r.trainable),
            _number(r.trainable_percent, "{:.3f}%"),
            format_bytes(r.adapter_bytes) if r.adapter_bytes is not None else "",
            format_bytes(r.peak_memory_bytes) if r.peak_memory_bytes is not None else "",
            format_bytes(r.predicted_peak_bytes) if r.predicted_peak_bytes is not None else "",
            format_bytes(r.base_weight_bytes) if r.base_weight_bytes is not None else "",
            _number(r.step_ms, "{:.1f}"),
            _number(r.train_seconds, "{:.1f}"),
            _number(r.run_seconds, "{:.1f}"),
            _number(r.latency_base_ms, "{:.2f}"),
            _number(r.latency_unmerged_ms, "{:.2f}"),
            _number(r.latency_merged_ms, "{:.2f}") if r.latency_merged_ms is not None else _no_merge(r),
            _number(r.learning_rate, "{:g}"),
            _number(r.load_average, "{:.1f}"),
            r.status if r.error is None else f"{r.status}: {_cell(r.error)}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Step: median optimizer step after the first few (warm-up); training: all optimizer steps; run: the "
        "whole process (loading, training, evaluations, saving). Peak memory: the peak resident set size of "
        "the run's own process; predicted peak: what `peftkit plan` predicts before training for the method's "
        "default adapter config at the comparison's batch size and full max length (shorter rows need less). "
        "Base weights: what the frozen base model's weights hold in memory, from "
        "its tensors (QLoRA: 4-bit codes and their scales; the adapters not included). Latency: median no-grad forward pass of one fixed batch, the base model, "
        "the adapter unmerged and merged into the weights (n/a: the method cannot merge). With several seeds "
        "the metric is mean ± sample standard deviation. Load: the machine's mean 1-minute load average "
        "during the run; the run itself accounts for about its torch threads (by default one per core); more "
        "means other processes shared the CPU and its times are inflated.",
    ]
    return "\n".join(lines) + "\n"


def _metric(r: MethodSummary) -> str:
    if r.metric_mean is None:
        return ""
    return f"{r.metric_mean:.4f}" + (f" ± {r.metric_std:.4f}" if r.metric_std is not None else "")


def _no_merge(r: MethodSummary) -> str:
    return "n/a" if r.status != "failed" else ""


def _int(value: int | None) -> str:
    return f"{value:,}" if value is not None else ""


def _number(value: float | None, form: str) -> str:
    return form.format(value) if value is not None else ""


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())
