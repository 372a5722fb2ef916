"""The run's metrics: one JSON object per line (``metrics.jsonl``) and a loss / metric curve (``curves.png``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class RunLog:
    def __init__(self, directory: Path, enabled: bool = True) -> None:
        self.path = directory / "metrics.jsonl"
        self.enabled = enabled

    def write(self, **entry: Any) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(entry, default=str) + "\n")

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def plot(self, metric: str) -> Path | None:
        """Training loss against step, and the validation ``metric`` against step, side by side."""
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        entries = self.entries()
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
        target = self.path.with_name("curves.png")
        figure.savefig(target, dpi=100)
        plt.close(figure)
        return target
