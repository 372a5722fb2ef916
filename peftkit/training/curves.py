"""The loss / metric chart of one run (``curves.png``), drawn from its metrics log."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_curves(entries: list[dict[str, Any]], metric: str, target: Path) -> Path:
    """Training loss against step (left) and the validation ``metric`` against step (right), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    train = [e for e in entries if e.get("kind") == "train"]
    evals = [e for e in entries if e.get("kind") == "eval" and metric in e]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([e["step"] for e in train], [e["loss"] for e in train], label="training loss")
    if evals:
        left.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="validation loss")
        right.plot([e["step"] for e in evals], [e[metric] for e in evals], "o-", color="tab:green")
    left.set(xlabel="step", ylabel="loss", title="loss")
    left.legend()
    right.set(xlabel="step", ylabel=metric, title=f"validation {metric}")
    figure.tight_layout()
    figure.savefig(target, dpi=100)
    plt.close(figure)
    return target
