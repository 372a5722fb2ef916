"""The trainer's state for ``--resume``: optimizer, scheduler, RNG states and the position in the data.

Where it is written (atomically, next to the adapter) is :class:`peftkit.training.layout.RunFolder`'s business;
the state holds only tensors, numbers and strings, so it is read back with ``weights_only=True``.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftkit.file_checks import CheckpointError


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


def check_trainer_state(state: Any, source: str | Path) -> None:
    """Raise :class:`CheckpointError` naming ``source`` and the entry when ``state`` is not what
    :func:`trainer_state` writes: a mapping of the optimizer's and scheduler's state dicts, the generator
    states and the progress (with a whole number of steps)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source} holds a {type(state).__name__}, not a trainer state")
    missing = [key for key in ("optimizer", "scheduler", "rng", "progress") if key not in state]
    if missing:
        raise CheckpointError(f"{source} lacks {', '.join(missing)}: it is not a whole trainer state")
    optimizer, rng, progress = state["optimizer"], state["rng"], state["progress"]
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= set(optimizer):
        raise CheckpointError(f"{source}: `optimizer` is not an optimizer's state dict")
    if not isinstance(state["scheduler"], dict):
        raise CheckpointError(f"{source}: `scheduler` is not a scheduler's state dict")
    if not isinstance(rng, dict) or not {"torch", "python", "numpy"} <= set(rng):
        raise CheckpointError(f"{source}: `rng` lacks the torch, python or numpy generator state")
    known = {f.name for f in fields(Progress)}
    if not isinstance(progress, dict) or set(progress) != known:
        raise CheckpointError(f"{source}: `progress` must hold exactly {sorted(known)}")
    step = progress["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{source}: `progress.step` must be a whole number of steps, got {step!r}")
