"""The settings of a training run: defaults, YAML file, command line; the effective config is saved with
the run so that it can be repeated and resumed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peftkit.config import ConfigError


@dataclass
class TrainConfig:
    # what
    model: str = "minilm"
    dataset: str = "rotten_tomatoes"
    task: str | None = None  # inferred for built-in datasets
    method: str = "lora"
    columns: dict[str, str] = field(default_factory=dict)  # e.g. {"text": "review", "label": "sentiment"}
    limit: int | None = None  # records read before splitting (None: all)
    # method options (each method reads those it understands; see peftkit/training/methods.py)
    r: int = 8
    alpha: float = 16
    dropout: float = 0.1
    target_modules: str | list[str] | None = "all-linear"  # None: the architecture's default
    top_k: int = 2
    placement: str = "pfeiffer"
    bottleneck_size: int = 32
    num_virtual_tokens: int = 20  # prompt_tuning, prefix_tuning, p_tuning, p_tuning_v2
    compute_dtype: str = "float32"  # qlora: the dtype 4-bit weights are de-quantized to, and the adapter's
    # optimisation
    epochs: float = 1.0
    max_steps: int | None = 400
    batch_size: int = 16
    gradient_accumulation: int = 1
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0
    max_length: int = 48
    bf16: bool = False
    gradient_checkpointing: bool = False
    # causal-LM / seq2seq training (see peftkit/training/efficiency.py)
    fused_loss: bool = True  # the fused linear cross-entropy where it equals the model's own loss
    group_by_length: bool | None = None  # None: on for causal-lm and seq2seq, off for classification
    packing: bool = False  # several causal-LM examples per row, attention and positions kept apart
    seed: int = 0
    # evaluation, checkpoints, output
    eval_every: int = 100
    eval_batch_size: int = 64
    eval_limit: int | None = 500  # validation records per evaluation (None: all)
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping
    save_every: int = 100
    output_dir: str = "runs/train"
    resume: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_sources(
        cls, yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None
    ) -> TrainConfig:
        """Defaults, then the YAML file, then command-line overrides (which win)."""
        values: dict[str, Any] = {}
        if yaml_path is not None:
            loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{yaml_path}: expected a mapping of settings, got {type(loaded).__name__}")
            values.update(loaded)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        config = cls(**{name: _coerce(name, value) for name, value in values.items()})
        config.validate()
        return config

    def validate(self) -> None:
        positive = [
            "batch_size",
            "gradient_accumulation",
            "max_length",
            "eval_every",
            "save_every",
            "eval_batch_size",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"`{name}` must be a positive integer, got {value!r}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"`max_steps` must be a positive integer or null, got {self.max_steps!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"`learning_rate` must be positive, got {self.learning_rate!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"`warmup_ratio` must be in [0, 1), got {self.warmup_ratio!r}")

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=True))


def _coerce(name: str, value: Any) -> Any:
    """YAML 1.1 reads ``3e-5`` (no dot) as a string; numbers for numeric settings are parsed here, with an
    error naming the setting when that fails."""
    kind = _NUMERIC.get(name)
    if kind is None or value is None or isinstance(value, bool) or not isinstance(value, str):
        return value
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"`{name}` must be {_ARTICLE[kind]}, got {value!r}") from None


_ARTICLE = {float: "a number", int: "an integer"}
_NUMERIC = {
    field.name: kind
    for field in dataclasses.fields(TrainConfig)
    for kind in (float, int)
    if kind.__name__ in str(field.type).split(" | ")
}
