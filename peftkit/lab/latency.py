"""Inference latency of a trained adapter: the base model, the adapter unmerged, and merged into the weights.

The three are timed in interleaved rounds (base, unmerged, merged, base, ...) on one fixed batch, so that a
slow moment of a busy machine falls on all three alike; each figure is the median over the rounds of a
no-grad forward pass, after warm-up passes that are not timed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from peftkit.model import AdapterError, PeftModel


@dataclass
class Latency:
    base_ms: float
    unmerged_ms: float
    merged_ms: float | None  # None: the method cannot merge
    merge_note: str | None = None  # why not


def _forward_ms(model: PeftModel, batch: dict[str, torch.Tensor]) -> float:
    tick = time.perf_counter()
    model(**batch)
    return 1000 * (time.perf_counter() - tick)


@torch.no_grad()
def measure_latency(
    model: PeftModel, batch: dict[str, torch.Tensor], repeats: int = 20, warmup: int = 3
) -> Latency:
    """Median milliseconds of one no-grad forward pass of ``batch`` (``(rows, tokens)`` ids and mask;
    labels dropped) with the adapter disabled, unmerged and merged, in interleaved rounds after ``warmup``
    untimed ones. The model is left unmerged, in eval mode."""
    model.eval()
    batch = {k: v for k, v in batch.items() if k != "labels"}  # no loss: inference only
    try:
        model.merge_adapter()
        model.unmerge_adapter()
        note = None
    except (AdapterError, NotImplementedError) as error:  # a method that cannot merge says so
        note = str(error)
    times: dict[str, list[float]] = {"base": [], "unmerged": [], "merged": []}
    for round_ in range(warmup + repeats):
        keep = round_ >= warmup
        with model.disable_adapter():
            base = _forward_ms(model, batch)
        unmerged = _forward_ms(model, batch)
        if note is None:
            model.merge_adapter()
            merged = _forward_ms(model, batch)
            model.unmerge_adapter()
        if keep:
            times["base"].append(base)
            times["unmerged"].append(unmerged)
            if note is None:
                times["merged"].append(merged)
    return Latency(
        base_ms=statistics.median(times["base"]),
        unmerged_ms=statistics.median(times["unmerged"]),
        merged_ms=statistics.median(times["merged"]) if note is None else None,
        merge_note=note,
    )
