"""PNG charts of a comparison, each readable on its own (title, axis labels, method names on the marks).

- ``metric_vs_params.png``: the test metric against trainable parameters (log scale), seed spread as bars;
- ``peak_memory.png`` and ``step_time.png``: one bar per method;
- ``latency.png``: inference latency per method, base / unmerged / merged side by side;
- ``loss_curves.png``: training loss against step, every method on one plot (mean over seeds, smoothed);
- with training-set sizes, ``metric_vs_train_size.png``: the test metric against the training-set size (log
  scale), one line per method through the means over seeds, a band of ± one standard deviation; the other
  charts then show the largest size;
- with retained ability measured, ``retained.png``: each method's value (mean over seeds, standard deviation
  as bars) beside the base model's as a dashed line.
Failed methods are left out of the charts (the table says why).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from peftkit.lab.records import RunRecord
from peftkit.lab.summary import MethodSummary

MIB = 1024**2


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def write_charts(
    rows: list[MethodSummary],
    runs: list[RunRecord],
    directory: Path,
    title: str,
    retained_base: dict[str, Any] | None = None,
) -> list[Path]:
    """``title`` names the setting (model, data, budget) under every chart's own title."""
    directory.mkdir(parents=True, exist_ok=True)
    good = [r for r in rows if r.status != "failed"]
    if not good:
        return []
    extra = []
    sizes = sorted({r.train_size for r in good if r.train_size is not None})
    if sizes:
        extra.append(_metric_vs_size(good, directory / "metric_vs_train_size.png", title))
        good = [r for r in good if r.train_size == sizes[-1]]  # the per-method charts: the largest size
        runs = [r for r in runs if r.train_size == sizes[-1]]
    if any(r.retained_mean is not None for r in good):
        extra.append(_retained(good, retained_base, directory / "retained.png", title))
    return [
        *extra,
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


def _metric_vs_size(rows: list[MethodSummary], path: Path, title: str) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    sizes = sorted({r.train_size for r in rows})
    for method in dict.fromkeys(r.method for r in rows):
        mine = sorted(
            (r for r in rows if r.method == method and r.metric_mean is not None), key=lambda r: r.train_size
        )
        if not mine:
            continue
        x = np.array([r.train_size for r in mine])
        mean = np.array([r.metric_mean for r in mine])
        spread = np.array([r.metric_std or 0.0 for r in mine])
        (line,) = axes.plot(x, mean, marker="o", label=method)
        axes.fill_between(x, mean - spread, mean + spread, color=line.get_color(), alpha=0.15)
    axes.set_xscale("log")
    axes.set_xticks(sizes, [f"{n:,}" for n in sizes])
    axes.minorticks_off()
    metric = next((r.metric for r in rows if r.metric), "metric")
    axes.set(xlabel="training examples (log scale)", ylabel=f"test {metric} (mean, band: ± 1 std over seeds)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    return _finish(figure, axes, path, f"Test {metric} against training-set size", title)


def _retained(rows: list[MethodSummary], base: dict[str, Any] | None, path: Path, title: str) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5))
    shown = [r for r in rows if r.retained_mean is not None]
    measure = shown[0].retained_measure
    bars = axes.bar(
        [r.method for r in shown],
        [r.retained_mean for r in shown],
        yerr=[r.retained_std or 0 for r in shown],
        capsize=4,
        color="tab:purple",
    )
    axes.bar_label(bars, fmt="%.2f", padding=2)
    if base is not None and base.get("measure") == measure:
        axes.axhline(base[measure], color="black", linestyle="--", label=f"base model: {base[measure]:.2f}")
        axes.legend(fontsize=8, loc="lower right")
    axes.set(xlabel="method", ylabel=f"{measure} on general text (lower: less forgotten)")
    axes.margins(y=0.15)
    return _finish(figure, axes, path, f"Retained ability: {measure} on held-out general text", title)
