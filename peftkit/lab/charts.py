"""PNG charts of a comparison, each readable on its own (title, axis labels, method names on the marks).

- ``metric_vs_params.png``: the test metric against trainable parameters (log scale), seed spread as bars;
- ``peak_memory.png`` and ``step_time.png``: one bar per method;
- ``latency.png``: inference latency per method, base / unmerged / merged side by side;
- ``loss_curves.png``: training loss against step, every method on one plot (mean over seeds, smoothed).
Failed methods are left out of the charts (the table says why).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from peftkit.lab.records import RunRecord
from peftkit.lab.summary import MethodSummary

MIB = 1024**2


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def write_charts(rows: list[MethodSummary], runs: list[RunRecord], directory: Path, title: str) -> list[Path]:
    """``title`` names the setting (model, data, budget) under every chart's own title."""
    directory.mkdir(parents=True, exist_ok=True)
    good = [r for r in rows if r.status != "failed"]
    if not good:
        return []
    return [
        _metric_vs_params(good, directory / "metric_vs_params.png", title),
        _bars(good, "peak_memory_bytes", 1 / MIB, "peak memory (MiB)", "Peak memory per method", directory / "peak_memory.png", title),
        _bars(good, "step_ms", 1.0, "median training step (ms)", "Training step time per method", directory / "step_time.png", title),
        _latency(good, directory / "latency.png", title),
        _loss_curves(good, runs, directory / "loss_curves.png", title),
    ]  # fmt: skip


def _finish(figure, axes, path: Path, heading: str, title: str) -> Path:
    axes.set_title(f"{heading}\n{title}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    _pyplot().close(figure)
    return path


def _metric_vs_params(rows: list[MethodSummary], path: Path, title: str) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    shown = [r for r in rows if r.trainable is not None and r.metric_mean is not None]
    values = [r.metric_mean for r in shown]
    y_span = (max(values) - min(values)) if values else 0.0
    labelled: list[tuple[float, float]] = []  # (log10 parameters, metric) of the labels already placed
    for row in shown:
        axes.errorbar(
            row.trainable, row.metric_mean, yerr=row.metric_std or 0, fmt="o", capsize=4, markersize=7
        )
        label = f"{row.method} ({row.trainable_percent:.2f}%)"
        here = (math.log10(row.trainable), row.metric_mean)
        # methods at (nearly) the same point would print their labels over each other: stack them
        crowd = sum(abs(x - here[0]) < 0.4 and abs(y - here[1]) <= 0.05 * y_span for x, y in labelled)
        labelled.append(here)
        axes.annotate(
            label, (row.trainable, row.metric_mean), textcoords="offset points", xytext=(6, 6 - 12 * crowd)
        )
    axes.set_xscale("log")
    metric = rows[0].metric or "metric"
    axes.set(xlabel="trainable parameters (log scale; % of the base in brackets)", ylabel=f"test {metric}")
    axes.grid(True, which="both", alpha=0.3)
    axes.margins(x=0.25, y=0.15)
    return _finish(figure, axes, path, f"Test {metric} against trainable parameters", title)


def _bars(rows, field: str, scale: float, ylabel: str, heading: str, path: Path, title: str) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    names = [r.method for r in rows]
    values = [(getattr(r, field) or 0) * scale for r in rows]
    bars = axes.bar(names, values, color="tab:blue")
    axes.bar_label(bars, fmt="%.0f" if max(values, default=0) >= 100 else "%.1f", padding=2)
    axes.set(xlabel="method", ylabel=ylabel)
    axes.margins(y=0.15)
    return _finish(figure, axes, path, heading, title)


def _latency(rows: list[MethodSummary], path: Path, title: str) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 4.5))
    x = np.arange(len(rows))
    width = 0.27
    variants = [
        ("base model", "latency_base_ms", "tab:gray"),
        ("adapter unmerged", "latency_unmerged_ms", "tab:orange"),
        ("merged into weights", "latency_merged_ms", "tab:green"),
    ]
    for offset, (label, field, color) in zip((-width, 0, width), variants, strict=True):
        values = [getattr(r, field) for r in rows]
        bars = axes.bar(x + offset, [v or 0 for v in values], width, label=label, color=color)
        axes.bar_label(bars, labels=["n/a" if v is None else f"{v:.1f}" for v in values], fontsize=7)
    axes.set_xticks(x, [r.method for r in rows])
    axes.set(xlabel="method", ylabel="forward pass, one batch (ms, median)")
    top = max((getattr(r, f) or 0 for r in rows for _, f, _ in variants), default=1)
    axes.set_ylim(0, 1.3 * top)  # room for the legend above the bars
    axes.legend(fontsize=8, loc="upper center", ncol=3)
    return _finish(figure, axes, path, "Inference latency: base, unmerged, merged (n/a: cannot merge)", title)


def _smooth(values: np.ndarray) -> np.ndarray:
    window = max(1, len(values) // 10)
    if window == 1:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def _loss_curves(rows: list[MethodSummary], runs: list[RunRecord], path: Path, title: str) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        curves = [dict(r.loss_curve) for r in runs if r.method == row.method and r.ok and r.loss_curve]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        mean = np.array([np.mean([c[s] for c in curves]) for s in steps])
        axes.plot(steps, _smooth(mean), label=row.method)
    axes.set(xlabel="optimizer step", ylabel="training loss (moving average)")
    axes.legend()
    axes.grid(True, alpha=0.3)
    return _finish(figure, axes, path, "Training loss, every method", title)
