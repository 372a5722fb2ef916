"""How busy the shared machine is with work that is not ours, before and during a worker process.

The development machine has 2 cores shared with other sessions. A worker runs 2 threads, so any other busy
process makes it wait (and OpenMP's spinning threads make short waits long): a step can take 10x longer.
The driver therefore waits for a quiet machine before each worker, measures the load of everything else
while the worker runs (the machine's busy CPU time from /proc/stat minus the worker's own CPU time), and
runs a worker again when that load was high.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
TICK = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1


def busy_cpu_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (everything but idle and iowait)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / TICK


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def other_load(run: Callable[[], T]) -> tuple[T, float]:
    """``run()``'s value, and the fraction of the machine (0..1) that other processes used meanwhile."""
    wall0, busy0, ours0 = time.monotonic(), busy_cpu_seconds(), children_cpu_seconds()
    value = run()
    wall, busy, ours = time.monotonic() - wall0, busy_cpu_seconds() - busy0, children_cpu_seconds() - ours0
    return value, max(0.0, busy - ours) / (wall * CORES)


def wait_for_quiet(max_wait: float, threshold: float = 0.1, interval: float = 0.5) -> float:
    """Wait (at most ``max_wait`` seconds) until other processes use under ``threshold`` of the machine over
    ``interval`` seconds; return the last such load."""
    deadline = time.monotonic() + max_wait
    while True:
        _, busy = other_load(lambda: time.sleep(interval))
        if busy < threshold or time.monotonic() >= deadline:
            return busy
        time.sleep(1.0)
