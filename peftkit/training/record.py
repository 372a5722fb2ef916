"""What a finished run reports: returned by ``train``, written to its folder, and read back by the lab."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.accounting import format_bytes
from peftkit.training.layout import RunFolder
from peftkit.training.runtime import peak_memory_bytes


@dataclass
class TrainResult:
    """One run's outcome. Sizes in parameters and bytes, times in seconds, memory in bytes."""

    test_metrics: dict[str, Any]  # the test split's metrics (empty on processes other than the main one)
    trainable: int  # parameters that received gradients
    trainable_percent: float  # of the base model's parameters
    adapter_file_bytes: int  # the saved adapter's safetensors file
    seconds: float  # the whole run: loading, training, evaluations, saving
    peak_memory_bytes: int  # peak resident set size of the process
    steps: int  # optimizer steps done
    output_dir: Path
    primary_metric: str  # the task's headline metric (accuracy, f1, loss, rougeL)
    best_validation: dict[str, Any] = field(default_factory=dict)
    method: str = ""
    seed: int = 0
    learning_rate: float = 0.0  # the peak learning rate of the schedule
    base_params: int = 0  # the base model's parameters (adapters and trained copies left out)
    adapter_params: int = 0  # values the adapter stores (what its file holds)
    base_weight_bytes: int = 0  # the base's weights as held in memory (4-bit where quantized)
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step, in order
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss)
    world_size: int = 1  # training processes (torchrun / accelerate launch)
    global_batch: int = 0  # examples per optimizer step: batch size x processes x accumulation steps

    @classmethod
    def of_run(cls, run, metrics: dict[str, Any], adapter_bytes: int) -> TrainResult:
        """The result of a finished :class:`~peftkit.training.run.TrainingRun` ``run``: its test ``metrics``
        and its saved adapter's size in bytes, with what the run counted and timed."""
        count = run.count
        primary = run.task.primary.name
        return cls(
            test_metrics=metrics,
            trainable=count.trainable,
            trainable_percent=count.trainable_percent,
            adapter_file_bytes=adapter_bytes,
            seconds=time.perf_counter() - run.started,
            peak_memory_bytes=peak_memory_bytes(),
            steps=run.progress.step,
            output_dir=run.folder.root,
            primary_metric=primary,
            best_validation={"step": run.progress.best_step, primary: run.progress.best_metric},
            method=run.config.method,
            seed=run.config.seed,
            learning_rate=run.config.learning_rate,
            base_params=count.base,
            adapter_params=count.adapter,
            base_weight_bytes=run.base_bytes,
            step_seconds=list(run.step_seconds),
            loss_curve=list(run.loss_curve),
            world_size=run.dist.world_size,
            global_batch=run.global_batch,
        )

    @property
    def train_seconds(self) -> float:
        """Time spent in optimizer steps (evaluations, checkpoints and loading left out)."""
        return sum(self.step_seconds)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (paths as strings)."""
        values = dataclasses.asdict(self)
        values["output_dir"] = str(self.output_dir)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainResult:
        """Back from :meth:`to_dict`'s form (keys this version does not know are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        values["output_dir"] = Path(values["output_dir"])
        values["loss_curve"] = [tuple(point) for point in values.get("loss_curve", [])]
        return cls(**values)

    def summary(self) -> str:
        """The table ``peftkit train`` prints at the end: test metrics, sizes, steps, time, memory."""
        primary = self.primary_metric
        value = self.test_metrics.get(primary)
        rows = [
            (f"test {primary}", f"{value:.4f}" if isinstance(value, float) else str(value)),
            *[
                (f"test {k}", f"{v:.4f}")
                for k, v in self.test_metrics.items()
                if k != primary and isinstance(v, float)
            ],
            ("trainable parameters", f"{self.trainable:,} ({self.trainable_percent:.3f}% of the base)"),
            ("adapter size on disk", format_bytes(self.adapter_file_bytes)),
            ("optimizer steps", str(self.steps)),
            ("wall time", f"{self.seconds:.1f} s"),
            ("peak memory (RSS)", format_bytes(self.peak_memory_bytes)),
            ("saved to", str(RunFolder(self.output_dir).adapter_dir)),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
