"""The allowed range of every numeric and switch setting of a training run, declared once.

:class:`~peftkit.training.config.TrainConfig` checks its values against :data:`SETTING_RANGES` (whether they
came from Python, a YAML file or a saved run), and the command line reads each flag through the same range,
so that ``--learning-rate inf``, ``learning_rate: .inf`` and ``TrainConfig(learning_rate=math.inf)`` are the
same error: "`learning_rate` must be a finite number > 0, got inf".

Bounds that depend on the model (``max_length`` within its positions) are checked when the model is loaded,
see :mod:`peftkit.data.model_checks`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from peftkit.config import ConfigError


@dataclass(frozen=True)
class Range:
    """Values a setting takes: ``kind`` (int, float or bool) within ``[low, high]`` (an end excluded when
    ``low_open`` / ``high_open``); ``none`` says what None means where it is allowed."""

    kind: type
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    none: str | None = None

    def allowed(self) -> str:
        """What is allowed, in words: "an integer >= 1, or none (all records)"."""
        if self.kind is bool:
            text = "true or false"
        else:
            what = "an integer" if self.kind is int else "a finite number"
            low = f"{self.low:g}" if self.low != -math.inf else None
            high = f"{self.high:g}" if self.high != math.inf else None
            if low is not None and high is not None:
                text = (
                    f"{what} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
                )
            elif low is not None:
                text = f"{what} {'>' if self.low_open else '>='} {low}"
            elif high is not None:
                text = f"{what} {'<' if self.high_open else '<='} {high}"
            else:
                text = what
        return f"{text}, or none ({self.none})" if self.none is not None else text

    def check(self, name: str, value: Any) -> Any:
        """``value`` if it is allowed (an int given for a float setting becomes a float); else ConfigError
        naming ``name``, the value and what is allowed."""
        if value is None and self.none is not None:
            return None
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise ConfigError(f"`{name}` must be {self.allowed()}, got {value!r}")
        ok_type = isinstance(value, int | float) if self.kind is float else isinstance(value, int)
        if isinstance(value, bool) or not ok_type or not self._within(value):
            raise ConfigError(f"`{name}` must be {self.allowed()}, got {value!r}")
        return float(value) if self.kind is float else value

    def _within(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


POSITIVE_INT = Range(int, 1)
SETTING_RANGES: dict[str, Range] = {
    "limit": Range(int, 1, none="all records"),
    "train_size": Range(int, 1, none="the whole training split"),
    "data_seed": Range(int, 0, 2**63, high_open=True, none="`seed`"),
    "epochs": Range(float, 0, low_open=True),  # fractional: that share of an epoch, rounded up to a step
    "max_steps": Range(int, 1, none="run `epochs` epochs"),
    "batch_size": POSITIVE_INT,
    "gradient_accumulation": POSITIVE_INT,
    "learning_rate": Range(float, 0, low_open=True),
    "head_learning_rate": Range(float, 0, low_open=True),
    "weight_decay": Range(float, 0),
    "warmup_ratio": Range(float, 0, 1, high_open=True),
    # 0 also turns clipping off, as in Hugging Face's Trainer; a negative norm would flip the gradient
    "max_grad_norm": Range(float, 0, none="no clipping"),
    "max_length": Range(int, 1, none="chosen from the training data"),
    "seed": Range(int, 0, 2**63, high_open=True),
    "eval_every": POSITIVE_INT,
    "eval_batch_size": POSITIVE_INT,
    "eval_limit": Range(int, 1, none="the whole validation split"),
    "early_stopping_patience": Range(int, 1, none="never stop early"),
    "save_every": POSITIVE_INT,
    "bf16": Range(bool),
    "gradient_checkpointing": Range(bool),
    "fused_loss": Range(bool),
    "group_by_length": Range(
        bool, none="on for causal-lm and seq2seq only, as runs recorded before it was the default"
    ),
    "packing": Range(bool),
    "check_finite": Range(bool),
    "fsdp": Range(bool),
    "resume": Range(bool),
}


def check_setting(name: str, value: Any) -> Any:
    """``value`` checked against the range of setting ``name`` (unchanged for a setting without one)."""
    found = SETTING_RANGES.get(name)
    return found.check(name, value) if found is not None else value


def check_weight_decay_step(learning_rate: float, weight_decay: float) -> None:
    """AdamW multiplies each decayed weight by ``1 - learning_rate * weight_decay`` per step (Loshchilov &
    Hutter 2019, arXiv:1711.05101, Algorithm 2): at 1 or more it zeroes or flips the sign of the weights."""
    if learning_rate * weight_decay >= 1:
        raise ConfigError(
            f"`learning_rate` x `weight_decay` must be below 1, got {learning_rate:g} x {weight_decay:g}: "
            "AdamW multiplies the weights by 1 - learning_rate x weight_decay each step"
        )
