"""``peftkit train``: an explicit training loop, from a config to a saved, evaluated adapter.

Data order is a pure function of (seed, epoch): every epoch is a seeded permutation of the training set,
and optimizer step ``s`` of an epoch consumes the next ``batch_size x world_size x gradient_accumulation``
examples, rank ``r`` taking its slice of each micro-batch. The random state is re-seeded from
(seed, rank, step) before every step. A resumed run, or ``N`` processes with batch ``b`` instead of one with
batch ``N·b``, therefore sees exactly the same examples in the same order.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from peftkit.accounting import format_bytes
from peftkit.checkpoint import WEIGHTS_NAME
from peftkit.config import ConfigError
from peftkit.model import PeftModel, get_peft_model
from peftkit.tasks import TASKS
from peftkit.training import state as run_state
from peftkit.training.config import TrainConfig
from peftkit.training.distributed import Distributed
from peftkit.training.methods import adapter_config_for, prepare_base
from peftkit.training.optim import build_optimizer, linear_schedule
from peftkit.training.run_log import RunLog

LABELS_FILE = "labels.json"


@dataclass
class TrainResult:
    test_metrics: dict[str, Any]
    trainable: int
    trainable_percent: float
    adapter_file_bytes: int
    seconds: float
    peak_memory_bytes: int
    steps: int
    output_dir: Path
    primary_metric: str  # the task's headline metric (accuracy, f1, loss, rougeL)
    best_validation: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        primary = self.primary_metric
        value = self.test_metrics.get(primary)
        rows = [
            (f"test {primary}", f"{value:.4f}" if isinstance(value, float) else str(value)),
            *[
                (f"test {k}", f"{v:.4f}")
                for k, v in self.test_metrics.items()
                if k != primary and isinstance(v, float)
            ],
            ("trainable parameters", f"{self.trainable:,} ({self.trainable_percent:.3f}% of the base)"),
            ("adapter size on disk", format_bytes(self.adapter_file_bytes)),
            ("optimizer steps", str(self.steps)),
            ("wall time", f"{self.seconds:.1f} s"),
            ("peak memory (RSS)", format_bytes(self.peak_memory_bytes)),
            ("saved to", str(self.output_dir / "adapter")),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


@contextlib.contextmanager
def quiet_transformers():
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, rank: int, step: int) -> int:
    """A distinct, reproducible seed for each (run, process, optimizer step)."""
    return (seed * 1_000_003 + rank * 7_919 + step) % 2**63


def peak_memory_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def train(config: TrainConfig, log=tqdm.write) -> TrainResult:  # tqdm.write keeps the bar whole
    from peftkit.assets import resolve_model  # the asset and data modules are only needed for a run
    from peftkit.data import Columns, load_splits

    start = time.perf_counter()
    dist = Distributed.from_environment()
    say = log if dist.is_main else (lambda *_: None)
    seed_everything(config.seed)
    run_dir = Path(config.output_dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not config.resume and run_state.find_checkpoint(run_dir) is not None:
            raise ConfigError(
                f"{run_dir} holds a checkpoint of an earlier run: pass --resume, or another --output-dir"
            )
        config.save(run_dir / "config.yaml")
    dist.barrier()

    splits = load_splits(
        config.dataset, config.task, Columns(**config.columns), seed=config.seed, limit=config.limit
    )
    task = TASKS[splits.task]
    if dist.is_main:
        (run_dir / LABELS_FILE).write_text(
            json.dumps({"task": splits.task, "label_names": splits.label_names})
        )
    model_dir = resolve_model(config.model, log=say)
    tokenizer = task.load_tokenizer(model_dir)
    with quiet_transformers():  # its load report lists the fresh task head, which the adapter trains in full
        base = task.load_model(model_dir, splits.label_names, tokenizer)
    prepare_base(config, base)
    if config.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, adapter_config_for(config, task.head_modules(base)))
    sizes = ", ".join(f"{k} {v:,}" for k, v in splits.sizes().items())
    limited = f"; the first {config.limit:,} of a seeded shuffle (--limit none: all)" if config.limit else ""
    say(f"data: {splits.source} ({splits.task}): {sizes}{limited}")
    say(f"{config.method} on {config.model}: {model.trainable_parameters().summary()}")

    checkpoint = run_state.find_checkpoint(run_dir) if config.resume else None
    if (
        checkpoint is not None
    ):  # the adapter's trained values replace the fresh ones before the optimizer sees them
        model.delete_adapter("default")
        model.load_adapter(checkpoint / "adapter", "default", is_trainable=True)
        model.set_adapter("default")

    global_batch = config.batch_size * dist.world_size * config.gradient_accumulation
    steps_per_epoch = len(splits.train) // global_batch
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the training split has {len(splits.train)} examples, fewer than one batch of {global_batch}"
        )
    total_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    optimizer = build_optimizer(model, config.learning_rate, config.weight_decay)
    scheduler = linear_schedule(optimizer, total_steps, warmup_steps=round(config.warmup_ratio * total_steps))
    progress = run_state.Progress()
    if checkpoint is not None:
        saved = run_state.load_trainer_state(checkpoint)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        run_state.set_rng_states(saved["rng"])
        progress = run_state.Progress(**saved["progress"])
        say(f"resuming from {checkpoint} at step {progress.step}")

    trained = DistributedDataParallel(model) if dist.world_size > 1 else model
    run_log = RunLog(run_dir, enabled=dist.is_main)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if config.bf16 else contextlib.nullcontext()
    validation = splits.validation[: config.eval_limit] if config.eval_limit else splits.validation

    def evaluate(records) -> dict[str, Any]:
        metrics = task.evaluate(
            model,
            records,
            tokenizer,
            batch_size=config.eval_batch_size,
            max_length=config.max_length,
            label_names=splits.label_names,
        )
        model.train()
        return metrics

    bar = tqdm(
        total=total_steps,
        initial=progress.step,
        desc="training",
        unit="step",
        disable=not dist.is_main,
        mininterval=1.0,
    )
    model.train()
    stop = False
    while progress.step < total_steps and not stop:
        step = progress.step
        torch.manual_seed(step_seed(config.seed, dist.rank, step))
        epoch, position = divmod(step, steps_per_epoch)
        order = torch.randperm(
            len(splits.train), generator=torch.Generator().manual_seed(config.seed + epoch)
        )
        step_rows = order[position * global_batch : (position + 1) * global_batch].tolist()
        tick = time.perf_counter()
        loss_total = 0.0
        optimizer.zero_grad(set_to_none=True)
        for micro in range(config.gradient_accumulation):
            rows = step_rows[micro * config.batch_size * dist.world_size :][
                : config.batch_size * dist.world_size
            ]
            mine = rows[dist.rank * config.batch_size : (dist.rank + 1) * config.batch_size]
            batch = task.collate([splits.train[i] for i in mine], tokenizer, config.max_length)
            sync = contextlib.nullcontext()
            if dist.world_size > 1 and micro < config.gradient_accumulation - 1:
                sync = trained.no_sync()  # average gradients across processes once per optimizer step
            with sync, autocast:
                loss = trained(**batch).loss / config.gradient_accumulation
                loss.backward()
            loss_total += loss.item()
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], config.max_grad_norm
            )
        optimizer.step()
        scheduler.step()
        progress.step += 1
        examples_per_second = global_batch / (time.perf_counter() - tick)
        learning_rate = scheduler.get_last_lr()[0]
        run_log.write(
            kind="train",
            step=progress.step,
            loss=loss_total,
            lr=learning_rate,
            examples_per_s=examples_per_second,
        )
        bar.update(1)
        bar.set_postfix(
            loss=f"{loss_total:.4f}", lr=f"{learning_rate:.2e}", ex_s=f"{examples_per_second:.1f}"
        )

        if progress.step % config.eval_every == 0 or progress.step == total_steps:
            stop = dist.broadcast(
                _evaluate_and_track(evaluate, validation, task, progress, config, run_log, say)
                if dist.is_main
                else None
            )
        if dist.is_main and (progress.step % config.save_every == 0 or progress.step == total_steps or stop):
            run_state.save_checkpoint(run_dir, model, optimizer, scheduler, progress)
        dist.barrier()
    bar.close()

    result_metrics: dict[str, Any] = {}
    adapter_bytes = 0
    if dist.is_main:
        model.save_pretrained(run_dir / "adapter")
        adapter_bytes = (run_dir / "adapter" / WEIGHTS_NAME).stat().st_size
        result_metrics = evaluate(splits.test)
        model.eval()
        run_log.write(kind="test", step=progress.step, **_scalars(result_metrics))
        run_log.plot(task.primary.name)
    dist.barrier()
    dist.shutdown()
    count = model.trainable_parameters()
    return TrainResult(
        test_metrics=result_metrics,
        trainable=count.trainable,
        trainable_percent=count.trainable_percent,
        adapter_file_bytes=adapter_bytes,
        seconds=time.perf_counter() - start,
        peak_memory_bytes=peak_memory_bytes(),
        steps=progress.step,
        output_dir=run_dir,
        primary_metric=task.primary.name,
        best_validation={"step": progress.best_step, task.primary.name: progress.best_metric},
    )


def _evaluate_and_track(evaluate, validation, task, progress, config, run_log, say) -> bool:
    """Evaluate on the validation split, log it, and say whether early stopping ends the run."""
    metrics = evaluate(validation)
    value = metrics[task.primary.name]
    run_log.write(kind="eval", step=progress.step, **_scalars(metrics))
    say(
        f"step {progress.step}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in _scalars(metrics).items())
    )
    for sample in metrics.get("samples", [])[:1]:
        say(f"  sample: {sample}")
    improved = progress.best_metric is None or (
        value > progress.best_metric if task.primary.higher_is_better else value < progress.best_metric
    )
    if improved:
        progress.best_metric, progress.best_step, progress.evals_without_improvement = value, progress.step, 0
    else:
        progress.evals_without_improvement += 1
    patience = config.early_stopping_patience
    if patience is not None and progress.evals_without_improvement >= patience:
        say(f"early stopping: no better validation {task.primary.name} for {patience} evaluations")
        return True
    return False


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


def load_run(run_dir: str | Path):
    """(config, task, tokenizer, model with the run's adapter, label names) of a finished run, for
    ``peftkit eval`` and ``peftkit predict``."""
    from peftkit.assets import resolve_model

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "adapter").is_dir():
        raise ConfigError(f"{run_dir} is not a finished training run (config.yaml and adapter/ are expected)")
    config = TrainConfig.from_sources(run_dir / "config.yaml")
    labels = json.loads((run_dir / LABELS_FILE).read_text())
    task = TASKS[labels["task"]]
    model_dir = resolve_model(config.model)
    tokenizer = task.load_tokenizer(model_dir)
    with quiet_transformers():
        base = task.load_model(model_dir, labels["label_names"], tokenizer)
    prepare_base(config, base)  # a QLoRA adapter is evaluated on the 4-bit base it was trained on
    return (
        config,
        task,
        tokenizer,
        PeftModel.from_pretrained(base, run_dir / "adapter"),
        labels["label_names"],
    )
