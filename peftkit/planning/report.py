"""A plan as a table: rows per method, JSON, a terminal table and a stacked memory chart."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.accounting import format_bytes
from peftkit.planning.advice import Recommendation, fits
from peftkit.planning.estimate import Memory, MethodPlan, Settings


@dataclass(frozen=True)
class Plan:
    """Every method's prediction for one model, task and batch, and the recommended method."""

    settings: Settings
    task: str
    model_type: str
    layers: int | None
    base_parameters: int
    rows: tuple[MethodPlan, ...]
    recommendation: Recommendation

    def row(self, method: str) -> MethodPlan:
        for row in self.rows:
            if row.method == method:
                return row
        raise KeyError(f"no row for method {method!r}; methods: {[r.method for r in self.rows]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": dataclasses.asdict(self.settings),
            "task": self.task,
            "model_type": self.model_type,
            "layers": self.layers,
            "base_parameters": self.base_parameters,
            "methods": [_row_dict(r, self.settings) for r in self.rows],
            "recommendation": self.recommendation.to_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def render(self) -> str:
        """A terminal table (one row per method) and the recommendation with its reasons."""
        s = self.settings
        head = (
            f"{s.model} ({self.model_type}, {self.layers} layers, {self.base_parameters / 1e6:,.1f}M parameters), "
            f"task {self.task}, batch {s.batch_size} x {s.max_length} tokens, {s.dtype} on {s.device}"
            + (f", memory {format_bytes(s.memory)}" if s.memory is not None else "")
        )
        columns = (
            "method",
            "trainable",
            "%",
            "adapter file",
            "peak memory",
            "with ckpt",
            "fits",
            "inference",
        )
        lines = [_table_row(r, s) for r in self.rows]
        widths = [max(len(str(x)) for x in col) for col in zip(columns, *lines, strict=True)]
        out = [head, ""]
        out += [
            "  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)).rstrip()
            for line in (columns, *lines)
        ]
        out += ["", "peak memory by component (without / with gradient checkpointing):"]
        out += [_components(r) for r in self.rows if r.applicable]
        rec = self.recommendation
        out += ["", f"recommended: {rec.method or 'none'}"]
        out += [f"  - {reason}" for reason in rec.reasons]
        out += [f"  not {method}: {why}" for method, why in rec.ruled_out.items()]
        return "\n".join(out)

    def chart(self, path: str | Path) -> Path:
        """A PNG: predicted peak memory per method, stacked by component, with the ``--memory`` line."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.rows if r.applicable]
        figure, axes = plt.subplots(figsize=(max(7, 0.9 * len(rows) + 3.5), 4.5))
        bottoms = [0.0] * len(rows)
        for name in Memory.COMPONENTS:
            values = [getattr(r.memory, name) / 2**30 for r in rows]
            axes.bar([r.method for r in rows], values, bottom=bottoms, label=name)
            bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
        if self.settings.memory is not None:
            axes.axhline(self.settings.memory / 2**30, color="black", linestyle="--", label="--memory")
        axes.set_ylabel("predicted peak training memory (GiB)")
        axes.set_title(
            f"{self.settings.model}: batch {self.settings.batch_size} x {self.settings.max_length}"
        )
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars
        axes.tick_params(axis="x", rotation=45)
        figure.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return path


def _row_dict(row: MethodPlan, settings: Settings) -> dict[str, Any]:
    if not row.applicable:
        return {"method": row.method, "error": row.error}
    return {
        "method": row.method,
        "trainable": row.trainable,
        "trainable_percent": row.trainable_percent,
        "adapter_parameters": row.adapter_parameters,
        "adapter_file_bytes": row.adapter_file_bytes,
        "memory": row.memory.to_dict(),
        "memory_checkpointed": row.memory_checkpointed.to_dict() if row.memory_checkpointed else None,
        "fits": fits(row, settings.memory) if settings.memory is not None else None,
        "inference_overhead": row.overhead,
    }


def _table_row(row: MethodPlan, settings: Settings) -> tuple[str, ...]:
    if not row.applicable:
        return (row.method, "-", "-", "-", "-", "-", "no", f"not applicable: {row.error[:70]}")
    checkpointed = format_bytes(row.memory_checkpointed.total) if row.memory_checkpointed else "n/a"
    fit = "-" if settings.memory is None else ("yes" if fits(row, settings.memory) else "no")
    return (
        row.method,
        f"{row.trainable:,}",
        f"{row.trainable_percent:.3f}",
        format_bytes(row.adapter_file_bytes),
        format_bytes(row.memory.total),
        checkpointed,
        fit,
        row.overhead.get("text", ""),
    )


def _components(row: MethodPlan) -> str:
    def parts(memory: Memory | None) -> str:
        if memory is None:
            return "n/a (refuses gradient checkpointing)"
        return ", ".join(f"{n} {format_bytes(getattr(memory, n))}" for n in Memory.COMPONENTS)

    return f"  {row.method}: {parts(row.memory)}\n  {' ' * len(row.method)}  ckpt: {parts(row.memory_checkpointed)}"
