"""Process-level helpers of a run: seeding, the per-step seed, peak memory, a quiet transformers."""

from __future__ import annotations

import contextlib
import random
import resource

import numpy as np
import torch
from transformers.utils import logging as transformers_logging


@contextlib.contextmanager
def quiet_transformers():
    """Only errors from transformers' logger inside the block (its load reports list expected fresh heads)."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, rank: int, step: int) -> int:
    """A distinct, reproducible seed for each (run, process, optimizer step)."""
    return (seed * 1_000_003 + rank * 7_919 + step) % 2**63


def peak_memory_bytes() -> int:
    """Peak resident set size of this process, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
