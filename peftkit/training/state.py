"""Checkpoints of a training run, for ``--resume``: adapter, optimizer, scheduler, RNG states and the
position in the data, written atomically.

Layout: ``<run>/checkpoint/`` holds the adapter (the usual ``adapter_config.json`` + safetensors) and
``trainer_state.pt``. A new checkpoint is built in a temporary folder and swapped in with renames, so a run
killed at any moment leaves the previous checkpoint (or the new one) whole. ``trainer_state.pt`` holds only
tensors, numbers and strings and is read back with ``torch.load(weights_only=True)``, which refuses code.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.pt"


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    best_metric: float | None = None
    best_step: int = 0
    evals_without_improvement: int = 0


def rng_states() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(_as_tuples(states["python"]))
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, progress: Progress) -> Path:
    """Write ``run_dir/checkpoint`` atomically (build aside, then swap in with renames)."""
    target = run_dir / CHECKPOINT
    building = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=run_dir))
    try:
        model.save_pretrained(building / "adapter")
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_states(),
            "progress": asdict(progress),
        }
        torch.save(state, building / STATE_FILE)
        previous = run_dir / f"{CHECKPOINT}.previous"
        if target.exists():  # whole (only ever made by a rename): an older .previous left by a kill is stale
            shutil.rmtree(previous, ignore_errors=True)
            target.rename(previous)
        building.rename(target)
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return target


def find_checkpoint(run_dir: Path) -> Path | None:
    """The latest whole checkpoint: a run killed between the two renames left it as ``.previous``."""
    for name in (CHECKPOINT, f"{CHECKPOINT}.previous"):
        if (run_dir / name / STATE_FILE).is_file():
            return run_dir / name
    return None


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
