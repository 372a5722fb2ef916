"""Validation during a run: what is reported, and when early stopping ends the run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peftkit.tasks.base import Metric
from peftkit.training.state import Progress


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics (generated samples and other lists left out), as logged."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


def track_validation(
    metrics: dict[str, Any],
    primary: Metric,
    progress: Progress,
    patience: int | None,
    say: Callable[[str], None],
) -> bool:
    """Report one validation, update the best value in ``progress``; True when ``patience`` evaluations in a
    row brought no improvement of the ``primary`` metric (early stopping)."""
    value = metrics[primary.name]
    say(f"step {progress.step}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in scalars(metrics).items()))
    for sample in metrics.get("samples", [])[:1]:
        say(f"  sample: {sample}")
    best = progress.best_metric
    improved = best is None or (value > best if primary.higher_is_better else value < best)
    if improved:
        progress.best_metric, progress.best_step, progress.evals_without_improvement = value, progress.step, 0
    else:
        progress.evals_without_improvement += 1
    if patience is not None and progress.evals_without_improvement >= patience:
        say(f"early stopping: no better validation {primary.name} for {patience} evaluations")
        return True
    return False
