"""A training run's life cycle: prepare -> fit -> finish, and load (a finished run, for inference).

``TrainingRun.prepare(config)`` loads the data, task, tokenizer and base model, adds the method's adapter,
builds the optimizer and schedule and, with ``resume``, restores the state of the last checkpoint;
``fit()`` runs the explicit loop (optimizer steps, evaluations, checkpoints, early stopping); ``finish()``
saves the adapter, evaluates on the test split, plots the curves and returns the :class:`TrainResult`.
:func:`load_run` gives a finished run's model back for ``peftkit eval`` / ``predict`` / ``generate`` and the
lab's latency measurement. Where the files go is :class:`~peftkit.training.layout.RunFolder`'s business.

Two extension points, set in ``prepare`` (see :mod:`peftkit.training.efficiency`): ``TrainingRun.loss``
(micro-batch -> scalar loss: the model's own or the fused linear cross-entropy) and ``TrainingRun.sampler``
(step -> row indices: a seeded or length-grouped :class:`~peftkit.data.batching.StepOrder`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from peftkit.accounting import base_weight_bytes
from peftkit.checkpoint import WEIGHTS_NAME
from peftkit.config import ConfigError
from peftkit.model import PeftModel, get_peft_model
from peftkit.tasks import TASKS
from peftkit.training import batches, efficiency, lengths
from peftkit.training import state as run_state
from peftkit.training.config import TrainConfig
from peftkit.training.distributed import Distributed
from peftkit.training.layout import RunFolder
from peftkit.training.methods import adapter_config_for, prepare_base
from peftkit.training.optim import build_optimizer, head_parameters, linear_schedule
from peftkit.training.record import TrainResult
from peftkit.training.runtime import peak_memory_bytes, quiet_transformers, seed_everything, step_seed
from peftkit.training.validation import scalars, track_validation


class TrainingRun:
    """One run of ``peftkit train``: build it with :meth:`prepare`, then :meth:`fit` and :meth:`finish`."""

    def __init__(self, config: TrainConfig, say: Callable[[str], None]) -> None:
        self.config = config
        self.started = time.perf_counter()
        self.dist = Distributed.from_environment()
        self.say = say if self.dist.is_main else (lambda *_: None)
        self.folder = RunFolder(config.output_dir)
        self.progress = run_state.Progress()
        self.step_seconds: list[float] = []
        self.loss_curve: list[tuple[int, float]] = []

    @classmethod
    def prepare(cls, config: TrainConfig, log: Callable[[str], None] = tqdm.write) -> TrainingRun:
        """Everything up to the first optimizer step. Raises ConfigError for settings the data, model or
        method refuse, and for a folder holding an earlier run's checkpoint without ``resume``."""
        run = cls(config, log)
        seed_everything(config.seed)
        run._open_folder()
        run._load_data_and_model()
        run._build_optimizer()
        return run

    def _open_folder(self) -> None:
        config, folder = self.config, self.folder
        if self.dist.is_main:
            folder.root.mkdir(parents=True, exist_ok=True)
            if not config.resume and folder.find_checkpoint() is not None:
                raise ConfigError(
                    f"{folder.root} holds a checkpoint of an earlier run: pass --resume, or another --output-dir"
                )
            folder.save_config(config)
        self.dist.barrier()

    def _load_data_and_model(self) -> None:
        from peftkit.assets import resolve_model  # the asset and data modules are only needed for a run
        from peftkit.data import Columns, load_splits

        config = self.config
        self.splits = load_splits(
            config.dataset, config.task, Columns(**config.columns), seed=config.seed, limit=config.limit
        )
        self.task = TASKS[self.splits.task]
        if self.dist.is_main:
            self.folder.write_labels(self.splits.task, self.splits.label_names)
        model_dir = resolve_model(config.model, log=self.say)
        self.tokenizer = self.task.load_tokenizer(model_dir)
        with (
            quiet_transformers()
        ):  # its load report lists the fresh task head, which the adapter trains in full
            base = self.task.load_model(model_dir, self.splits.label_names, self.tokenizer)
        self._choose_max_length(base)
        prepare_base(config, base)
        if config.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.heads = self.task.head_modules(base)
        self.model = get_peft_model(base, adapter_config_for(config, self.heads))
        sizes = ", ".join(f"{k} {v:,}" for k, v in self.splits.sizes().items())
        limited = (
            f"; the first {config.limit:,} of a seeded shuffle (--limit none: all)" if config.limit else ""
        )
        self.say(f"data: {self.splits.source} ({self.splits.task}): {sizes}{limited}")
        self.say(f"{config.method} on {config.model}: {self.model.trainable_parameters().summary()}")
        self.checkpoint = self.folder.find_checkpoint() if config.resume else None
        if (
            self.checkpoint is not None
        ):  # the trained values replace the fresh ones before the optimizer sees them
            self.model.delete_adapter("default")
            self.model.load_adapter(
                RunFolder.checkpoint_adapter(self.checkpoint), "default", is_trainable=True
            )
            self.model.set_adapter("default")

    def _choose_max_length(self, base: torch.nn.Module) -> None:
        """``max_length`` from the training examples' token lengths unless given, and the share of them it
        cuts, said (see :mod:`peftkit.training.lengths`); a chosen one is saved with the settings."""
        config = self.config
        measured = lengths.token_lengths(self.task, self.splits.train[: lengths.SAMPLE], self.tokenizer)
        reserved = config.options.get("num_virtual_tokens") or 0  # positions a prompt method takes
        positions = lengths.model_positions(base.config)
        choice = lengths.choose_max_length(config.max_length, measured, positions, reserved)
        config.max_length = choice.max_length
        if (message := choice.message()) is not None:
            self.say(message)
        if choice.chosen and self.dist.is_main:
            self.folder.save_config(config)

    def _build_optimizer(self) -> None:
        config, dist = self.config, self.dist
        self.global_batch = batches.global_batch_size(
            config.batch_size, dist.world_size, config.gradient_accumulation
        )
        self.say(
            f"processes: {dist.world_size}; global batch {self.global_batch} = batch size {config.batch_size}"
            f" x {dist.world_size} processes x {config.gradient_accumulation} accumulation steps"
        )
        self.steps_per_epoch = batches.steps_per_epoch(len(self.splits.train), self.global_batch)
        self.total_steps = batches.total_steps(config.max_steps, config.epochs, self.steps_per_epoch)
        self.sampler: batches.BatchSampler = efficiency.batch_order(
            config, self.task, self.splits.train, self.tokenizer, self.global_batch
        )
        # read now, after a resumed adapter replaced the fresh one: a head trained in full is its copy
        head = head_parameters(self.model.base_model, self.heads)
        self.optimizer = build_optimizer(
            self.model, config.learning_rate, config.weight_decay, head, config.head_learning_rate
        )
        self.scheduler = linear_schedule(
            self.optimizer, self.total_steps, warmup_steps=round(config.warmup_ratio * self.total_steps)
        )
        if self.checkpoint is not None:
            saved = RunFolder.load_trainer_state(self.checkpoint)
            self.progress = run_state.restore_trainer_state(saved, self.optimizer, self.scheduler)
            self._restore_curves()
            self.say(f"resuming from {self.checkpoint} at step {self.progress.step}")
        self.trained = DistributedDataParallel(self.model) if dist.world_size > 1 else self.model
        self.loss_function = efficiency.loss_function(
            config, self.task.name, self.trained, self.model, self.tokenizer, self.say
        )

    def _restore_curves(self) -> None:
        """The steps before the checkpoint, from the log (a killed run may have logged a few more)."""
        done = [
            e for e in self.folder.entries() if e.get("kind") == "train" and e["step"] <= self.progress.step
        ]
        self.step_seconds = [e.get("seconds", 0.0) for e in done]
        self.loss_curve = [(e["step"], e["loss"]) for e in done]

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scalar training loss of one micro-batch: the model's own, or the fused linear cross-entropy
        (equal, without the logits), see :mod:`peftkit.training.efficiency`."""
        return self.loss_function(batch)

    def fit(self) -> None:
        """Optimizer steps until ``total_steps`` or early stopping, with evaluations and checkpoints."""
        config, dist, progress = self.config, self.dist, self.progress
        bar = tqdm(
            total=self.total_steps,
            initial=progress.step,
            desc="training",
            unit="step",
            disable=not dist.is_main,
            mininterval=1.0,
        )
        self.model.train()
        stop = False
        while progress.step < self.total_steps and not stop:
            tick = time.perf_counter()
            loss = self._step()
            seconds = time.perf_counter() - tick
            learning_rate = self.scheduler.get_last_lr()[0]
            self.step_seconds.append(seconds)
            self.loss_curve.append((progress.step, loss))
            if dist.is_main:
                self.folder.log(
                    kind="train", step=progress.step, loss=loss, lr=learning_rate, seconds=seconds
                )
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss:.4f}", lr=f"{learning_rate:.2e}", ex_s=f"{self.global_batch / seconds:.1f}"
            )
            last = progress.step == self.total_steps
            if progress.step % config.eval_every == 0 or last:
                stop = dist.broadcast(self._validate() if dist.is_main else None)
            if dist.is_main and (progress.step % config.save_every == 0 or last or stop):
                state = run_state.trainer_state(self.optimizer, self.scheduler, progress)
                self.folder.save_checkpoint(self.model, state)
            dist.barrier()
        bar.close()

    def _step(self) -> float:
        """One optimizer step (its micro-batches, clipping, update); the summed loss of the step."""
        config, dist = self.config, self.dist
        torch.manual_seed(step_seed(config.seed, dist.rank, self.progress.step))
        step_rows = self.sampler.step_rows(self.progress.step)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if config.bf16 else contextlib.nullcontext()
        loss_total = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        for micro in range(config.gradient_accumulation):
            mine = batches.micro_batch_rows(step_rows, micro, config.batch_size, dist.world_size, dist.rank)
            batch = self.task.collate([self.splits.train[i] for i in mine], self.tokenizer, config.max_length)
            sync = contextlib.nullcontext()
            if dist.world_size > 1 and micro < config.gradient_accumulation - 1:
                sync = self.trained.no_sync()  # average gradients across processes once per optimizer step
            with sync, autocast:
                loss = self.loss(batch) / config.gradient_accumulation
                loss.backward()
            loss_total += loss.item()
        if config.max_grad_norm:
            trained = [p for p in self.model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(trained, config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.progress.step += 1
        return loss_total

    def evaluate(self, records) -> dict[str, Any]:
        """The task's metrics of the current adapter on ``records``; the model is left in training mode."""
        config = self.config
        metrics = self.task.evaluate(
            self.model,
            records,
            self.tokenizer,
            batch_size=config.eval_batch_size,
            max_length=config.max_length,
            label_names=self.splits.label_names,
        )
        self.model.train()
        return metrics

    def _validate(self) -> bool:
        """Evaluate on (the first ``eval_limit`` of) the validation split; True when early stopping ends it."""
        limit = self.config.eval_limit
        metrics = self.evaluate(self.splits.validation[:limit] if limit else self.splits.validation)
        self.folder.log(kind="eval", step=self.progress.step, **scalars(metrics))
        return track_validation(
            metrics, self.task.primary, self.progress, self.config.early_stopping_patience, self.say
        )

    def finish(self) -> TrainResult:
        """Save the adapter, evaluate on the test split, plot the curves; the run's record (also written to
        the folder). Only the main process evaluates: the others' record has empty ``test_metrics``."""
        dist, folder = self.dist, self.folder
        metrics: dict[str, Any] = {}
        adapter_bytes = 0
        if dist.is_main:
            self.model.save_pretrained(folder.adapter_dir)
            adapter_bytes = (folder.adapter_dir / WEIGHTS_NAME).stat().st_size
            metrics = self.evaluate(self.splits.test)
            self.model.eval()
            folder.log(kind="test", step=self.progress.step, **scalars(metrics))
            folder.plot_curves(self.task.primary.name)
        dist.barrier()
        dist.shutdown()
        result = self._result(metrics, adapter_bytes)
        if dist.is_main:
            folder.write_result(result.to_dict())
        return result

    def _result(self, metrics: dict[str, Any], adapter_bytes: int) -> TrainResult:
        count = self.model.trainable_parameters()
        primary = self.task.primary.name
        return TrainResult(
            test_metrics=metrics,
            trainable=count.trainable,
            trainable_percent=count.trainable_percent,
            adapter_file_bytes=adapter_bytes,
            seconds=time.perf_counter() - self.started,
            peak_memory_bytes=peak_memory_bytes(),
            steps=self.progress.step,
            output_dir=self.folder.root,
            primary_metric=primary,
            best_validation={"step": self.progress.best_step, primary: self.progress.best_metric},
            method=self.config.method,
            seed=self.config.seed,
            learning_rate=self.config.learning_rate,
            base_params=count.base,
            adapter_params=count.adapter,
            base_weight_bytes=base_weight_bytes(self.model),
            step_seconds=list(self.step_seconds),
            loss_curve=list(self.loss_curve),
            world_size=self.dist.world_size,
            global_batch=self.global_batch,
        )


@dataclass
class LoadedRun:
    """A finished run's model with its adapter, and what is needed to feed it."""

    config: TrainConfig
    task: Any  # peftkit.tasks.Task
    tokenizer: Any
    model: PeftModel
    label_names: list[str] | None


def load_run(run_dir: str | Path) -> LoadedRun:
    """A finished run (``config.yaml``, ``labels.json`` and ``adapter/`` in ``run_dir``) on a fresh base.

    Raises ConfigError when ``run_dir`` is not a finished run."""
    from peftkit.assets import resolve_model

    folder = RunFolder(run_dir)
    if not folder.is_finished():
        raise ConfigError(
            f"{folder.root} is not a finished training run (config.yaml and adapter/ are expected)"
        )
    config = folder.read_config()
    task_name, label_names = folder.read_labels()
    task = TASKS[task_name]
    model_dir = resolve_model(config.model)
    tokenizer = task.load_tokenizer(model_dir)
    with quiet_transformers():
        base = task.load_model(model_dir, label_names, tokenizer)
    prepare_base(config, base)  # a QLoRA adapter is evaluated on the 4-bit base it was trained on
    model = PeftModel.from_pretrained(base, folder.adapter_dir)
    return LoadedRun(config, task, tokenizer, model, label_names)
