"""One run of a comparison, in a process of its own (so that its peak memory is its own).

``python -m peftkit.lab.worker RUN_DIR`` trains with ``RUN_DIR/config.yaml`` (``peftkit train``'s loop),
then reloads the saved adapter and times inference, and writes everything the lab reports about the run to
``RUN_DIR/lab_result.json``; a run that fails writes its error there instead and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

RESULT_FILE = "lab_result.json"


def adapter_file_parameters(path: Path) -> int:
    """Values stored in a safetensors file (read from its header, not loaded)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            shape = handle.get_slice(key).get_shape()
            count = 1
            for size in shape:
                count *= size
            total += count
    return total


def base_weight_bytes(model) -> int:
    """Bytes the base model's own weights hold in memory, from its actual tensors (packed 4-bit codes and
    their scales for a quantized layer), without the adapters' tensors and trained module copies."""
    from peftkit.layer import added_parameter_ids
    from peftkit.quantization import storage_report

    added = added_parameter_ids(model)
    added_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) in added)
    return storage_report(model).total_bytes - added_bytes


def run(run_dir: Path, latency_batch: int, latency_repeats: int) -> dict[str, Any]:
    import torch

    from peftkit.checkpoint import WEIGHTS_NAME
    from peftkit.data import Columns, load_splits
    from peftkit.lab.latency import measure_latency
    from peftkit.training.config import TrainConfig
    from peftkit.training.loop import load_run, train

    config = TrainConfig.from_sources(run_dir / "config.yaml")
    result = train(config)

    _, task, tokenizer, model, _ = load_run(run_dir)  # the adapter as saved, on a fresh base
    splits = load_splits(
        config.dataset, config.task, Columns(**config.columns), seed=config.seed, limit=config.limit
    )
    records = (splits.test or splits.validation or splits.train)[:latency_batch]
    torch.manual_seed(config.seed)
    latency = measure_latency(
        model, task.collate(records, tokenizer, config.max_length), repeats=latency_repeats
    )
    return {
        "status": "ok",
        "method": config.method,
        "seed": config.seed,
        "primary_metric": result.primary_metric,
        "test_metrics": {k: v for k, v in result.test_metrics.items() if isinstance(v, int | float)},
        "trainable": result.trainable,
        "trainable_percent": result.trainable_percent,
        "base_params": model.trainable_parameters().base,
        "adapter_params": adapter_file_parameters(run_dir / "adapter" / WEIGHTS_NAME),
        "adapter_bytes": result.adapter_file_bytes,
        "peak_memory_bytes": result.peak_memory_bytes,
        "base_weight_bytes": base_weight_bytes(model),
        "steps": result.steps,
        "run_seconds": result.seconds,
        "global_batch": config.batch_size * config.gradient_accumulation,
        "learning_rate": config.learning_rate,
        "latency": asdict(latency),
        "latency_batch": len(records),
        "torch_threads": torch.get_num_threads(),
    }


def write_result(run_dir: Path, result: dict[str, Any]) -> None:
    target = run_dir / RESULT_FILE
    temporary = target.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=1, default=str))
    os.replace(temporary, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftkit.lab.worker", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--latency-batch", type=int, default=16, help="rows of the timed inference batch")
    parser.add_argument("--latency-repeats", type=int, default=20, help="timed forward passes per variant")
    args = parser.parse_args(argv)
    try:
        result = run(args.run_dir, args.latency_batch, args.latency_repeats)
    except Exception as error:  # reported as a failed run in the comparison, never raised past it
        traceback.print_exc()
        write_result(args.run_dir, {"status": "failed", "error": f"{type(error).__name__}: {error}"})
        return 1
    write_result(args.run_dir, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
