"""The trainer's state for ``--resume``: optimizer, scheduler, RNG states and the position in the data.

Where it is written (atomically, next to the adapter) is :class:`peftkit.training.layout.RunFolder`'s business;
the state holds only tensors, numbers and strings, so it is read back with ``weights_only=True``.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    best_metric: float | None = None
    best_step: int = 0
    evals_without_improvement: int = 0


def rng_states() -> dict[str, Any]:
    """Python's, NumPy's and torch's generator states, as tensors, numbers and lists only."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore the generator states :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    random.setstate(_as_tuples(states["python"]))
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def trainer_state(optimizer, scheduler, progress: Progress) -> dict[str, Any]:
    """What a checkpoint holds besides the adapter: enough to continue exactly where the run stopped."""
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states(),
        "progress": asdict(progress),
    }


def restore_trainer_state(state: dict[str, Any], optimizer, scheduler) -> Progress:
    """Put ``state`` (from :func:`trainer_state`) back into the optimizer, scheduler and RNGs."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_states(state["rng"])
    return Progress(**state["progress"])
