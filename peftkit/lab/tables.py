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
    rows: list[MethodSummary],
    runs: list[RunRecord],
    directory: Path,
    context: dict[str, Any],
    retained_base: dict[str, Any] | None = None,
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
        "retained_base": retained_base,
        "methods": [asdict(r) for r in rows],
        "runs": [{k: v for k, v in asdict(r).items() if k != "loss_curve"} for r in runs],
    }
    (directory / JSON).write_text(json.dumps(document, indent=1, default=str) + "\n")
    (directory / MARKDOWN).write_text(markdown(rows, context, retained_base))
    return [directory / name for name in (MARKDOWN, CSV, JSON)]


def markdown(
    rows: list[MethodSummary], context: dict[str, Any], retained_base: dict[str, Any] | None = None
) -> str:
    """``results.md``: a title, the setting (``context``), the low-data table (with training-set sizes),
    the table and what its columns mean."""
    model, dataset = (Path(str(context.get(k))).name for k in ("model", "dataset"))
    lines = [f"# peftkit compare: {model} on {dataset}", ""]
    lines += [f"- {k}: {v}" for k, v in context.items()]
    if retained_base is not None:
        lines.append(f"- retained ability of the base model: {retained_text(retained_base)}")
    sized = size_table(rows)
    return "\n".join(lines) + "\n\n" + (sized + "\n" if sized else "") + markdown_table(rows, retained_base)


def retained_text(retained: dict[str, Any]) -> str:
    """``perplexity 21.37 (4,080 tokens)``, or why there is no value."""
    measure = retained.get("measure")
    if not measure:
        return str(retained.get("note") or "not measured")
    return f"{measure} {retained[measure]:.2f} ({retained.get('tokens', 0):,} tokens)"


def size_table(rows: list[MethodSummary]) -> str:
    """The low-data table: one row per method, one column per training-set size, the test metric's mean ±
    sample standard deviation over seeds; empty without sizes."""
    sizes = sorted({r.train_size for r in rows if r.train_size is not None})
    if not sizes:
        return ""
    metric = next((r.metric for r in rows if r.metric), "metric")
    cells = {(r.method, r.train_size): r for r in rows}
    lines = [
        f"## Test {metric} by training-set size (mean ± sample std over seeds)",
        "",
        "| method | " + " | ".join(f"{n:,} examples" for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for method in dict.fromkeys(r.method for r in rows):
        row = [cells.get((method, n)) for n in sizes]
        lines.append(f"| {method} | " + " | ".join(_size_cell(r) for r in row) + " |")
    steps = [next((r.steps for r in rows if r.train_size == n and r.steps), None) for n in sizes]
    lines.append("| (optimizer steps) | " + " | ".join(_int(s) for s in steps) + " |")
    return "\n".join(lines) + "\n"


def _size_cell(r: MethodSummary | None) -> str:
    """Mean ± std over the seeds that finished (how many, when not all did), or why there is none."""
    if r is None:
        return ""
    if r.metric_mean is None:
        return "not run" if (r.error or "").endswith(NOT_RUN) else "failed"
    finished = len(r.seeds.split(","))
    return _metric(r) + (f" ({finished} seed{'s' * (finished > 1)})" if r.status == "partial" else "")


NOT_RUN = "the comparison was cut short before it"


def markdown_table(rows: list[MethodSummary], retained_base: dict[str, Any] | None = None) -> str:
    """The table, one row per method (and training-set size), and the paragraph saying what its columns
    mean; a "retained" column when retained ability was measured (``retained_base``: the base's value)."""
    metric = next((r.metric for r in rows if r.metric), "metric")
    sized = any(r.train_size is not None for r in rows)
    retained = retained_base is not None or any(r.retained_measure or r.retained_note for r in rows)
    header = [
        "method",
        *(["train size", "steps"] if sized else []),
        f"test {metric}",
        *([_retained_header(rows, retained_base)] if retained else []),
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
            *([_int(r.train_size), _int(r.steps)] if sized else []),
            _metric(r),
            *([_retained(r)] if retained else []),
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
    lines += ["", _COLUMNS_NOTE + (_RETAINED_NOTE if retained else "")]
    return "\n".join(lines) + "\n"


_COLUMNS_NOTE = (
    "Step: median optimizer step after the first few (warm-up); training: all optimizer steps; run: the "
    "whole process (loading, training, evaluations, saving). Peak memory: the peak resident set size of "
    "the run's own process; predicted peak: what `peftkit plan` predicts before training for the method's "
    "default adapter config at the comparison's batch size and full max length (shorter rows need less). "
    "Base weights: what the frozen base model's weights hold in memory, from "
    "its tensors (QLoRA: 4-bit codes and their scales; the adapters not included). Latency: median no-grad forward pass of one fixed batch, the base model, "
    "the adapter unmerged and merged into the weights (n/a: the method cannot merge). With several seeds "
    "the metric is mean ± sample standard deviation. Load: the machine's mean 1-minute load average "
    "during the run; the run itself accounts for about its torch threads (by default one per core); more "
    "means other processes shared the CPU and its times are inflated."
)


def _metric(r: MethodSummary) -> str:
    if r.metric_mean is None:
        return ""
    return f"{r.metric_mean:.4f}" + (f" ± {r.metric_std:.4f}" if r.metric_std is not None else "")


_RETAINED_NOTE = (
    " Retained: the trained model (adapter active) scored on general text unrelated to the task, beside "
    "the base model's value in the header: perplexity for causal LMs, masked-LM loss (nats per masked "
    "token) for encoders (lower is better for both; above the base's value means the model forgot some of "
    "its general ability)."
)


def _retained_header(rows: list[MethodSummary], base: dict[str, Any] | None) -> str:
    measure = next((r.retained_measure for r in rows if r.retained_measure), None) or "ability"
    if base is not None and base.get("measure"):
        return f"retained {measure} (base {base[base['measure']]:.2f})"
    return f"retained {measure}"


def _retained(r: MethodSummary) -> str:
    if r.retained_mean is None:
        return "n/a" if r.retained_note else ""  # the reason: once, in the context lines
    return f"{r.retained_mean:.2f}" + (f" ± {r.retained_std:.2f}" if r.retained_std is not None else "")


def _no_merge(r: MethodSummary) -> str:
    return "n/a" if r.status != "failed" else ""


def _int(value: int | None) -> str:
    return f"{value:,}" if value is not None else ""


def _number(value: float | None, form: str) -> str:
    return form.format(value) if value is not None else ""


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())
