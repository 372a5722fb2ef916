"""The machine a comparison ran on, for the record next to its numbers."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe() -> str:
    """Cores, CPU, GPU if any, OS and torch version, in one line for a comparison's record."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = f", CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cores} cores, {cpu_model()}{device}; {platform.system()} {platform.release()}; torch {torch.__version__}"
