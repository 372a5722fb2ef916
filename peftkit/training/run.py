"""A training run's life cycle: prepare -> fit -> finish, and load (a finished run, for inference).

``TrainingRun.prepare(config)`` loads the data, task, tokenizer and base model, adds the method's adapter,
builds the optimizer and schedule and, with ``resume``, restores the state of the last checkpoint;
``fit()`` runs the explicit loop (optimizer steps, evaluations, checkpoints, early stopping); ``finish()``
saves the adapter, evaluates on the test split, plots the curves and returns the :class:`TrainResult`.
A run holds its folder's lock from ``prepare`` to ``finish`` (:meth:`TrainingRun.close` on an error), checks a
resume against the recorded settings and checkpoints (:mod:`peftkit.training.resume`), and stops on a
non-finite loss or parameter before saving (:mod:`peftkit.training.divergence`). A finished run is read back
by :func:`peftkit.training.finished.load_run`. Where the files go is
:class:`~peftkit.training.layout.RunFolder`'s business.

Two extension points, set in ``prepare`` (see :mod:`peftkit.training.efficiency`): ``TrainingRun.loss``
(micro-batch -> scalar loss: the model's own or the fused linear cross-entropy) and ``TrainingRun.sampler``
(step -> row indices: a seeded or length-grouped :class:`~peftkit.data.batching.StepOrder`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from peftkit.accounting import base_weight_bytes
from peftkit.checkpoint import WEIGHTS_NAME
from peftkit.config import ConfigError
from peftkit.data.model_checks import check_run
from peftkit.model import get_peft_model
from peftkit.tasks import TASKS
from peftkit.training import batches, efficiency, fsdp, lengths
from peftkit.training import state as run_state
from peftkit.training.config import TrainConfig
from peftkit.training.distributed import Distributed, gradient_sync
from peftkit.training.divergence import FiniteParameters, diverged, loss_problem
from peftkit.training.finished import LoadedRun, load_run  # noqa: F401  (re-exported: their old home)
from peftkit.training.layout import RunFolder
from peftkit.training.methods import adapter_config_for, prepare_base
from peftkit.training.optim import build_optimizer, head_parameters, linear_schedule
from peftkit.training.record import TrainResult
from peftkit.training.resume import check_same_run, recorded_settings, restore_checkpoint, with_absolute_paths
from peftkit.training.runtime import quiet_transformers, seed_everything, step_seed
from peftkit.training.validation import scalars, track_validation


class TrainingRun:
    """One run of ``peftkit train``: build it with :meth:`prepare`, then :meth:`fit` and :meth:`finish`."""

    def __init__(self, config: TrainConfig, say: Callable[[str], None]) -> None:
        self.config = with_absolute_paths(config)  # what config.yaml records: the same files from anywhere
        self.started = time.perf_counter()
        self.dist = Distributed.from_environment()
        self.say = say if self.dist.is_main else (lambda *_: None)
        self.folder = RunFolder(config.output_dir)
        self.progress = run_state.Progress()
        self.step_seconds: list[float] = []
        self.loss_curve: list[tuple[int, float]] = []
        self.lock = self.folder.lock()
        self.changed: dict[str, list] = {}  # settings a resume changed: {name: [recorded, now]}
        self.checkpoint: Path | None = None
        self.saved_step = 0  # the step of the last checkpoint written or resumed from
        self.length_recorded = False  # a resume's max_length is the one the run chose or was given
        self.before: set[str] | None = None  # the folder's entries before this run locked it (None: not yet)
        self.created: Path | None = None  # the topmost folder this run created, if any

    @classmethod
    def prepare(cls, config: TrainConfig, log: Callable[[str], None] = tqdm.write) -> TrainingRun:
        """Everything up to the first optimizer step; the folder stays locked until :meth:`finish` (or
        :meth:`close`). Raises ConfigError for settings the data, model or method refuse, a folder another
        run is writing, a folder holding an earlier run without ``resume``, and for ``resume`` without a run
        to continue, with other settings than it recorded, or without a whole checkpoint."""
        run = cls(config, log)
        try:
            seed_everything(config.seed)
            run._open_folder()
            with fsdp.in_turn(run.dist, config.fsdp):  # --fsdp: one process at a time holds the whole base
                run._load_data_and_model()
                run.sharded = fsdp.shard_run(run.model, config.fsdp, run.dist.world_size, run.say)
            run._build_optimizer()
            run._record_start()
        except BaseException:
            run.close()
            if run.dist.is_main and run.before is not None:  # nothing trained: leave the folder as it was
                run.folder.remove_new(run.before, run.created)
            raise
        return run

    def _open_folder(self) -> None:
        """Lock the folder, then check that what it holds fits a fresh run or a resume of its run."""
        config, folder = self.config, self.folder
        if self.dist.is_main:
            before = folder.names()
            if not config.resume:
                self.created = folder.make()
            elif not folder.root.is_dir():
                raise ConfigError(f"--resume: {folder.root} does not exist; train without --resume to start")
            self.lock.acquire(str(folder.root))
            self.before = before
            if config.resume:
                recorded = recorded_settings(folder)
                if config.max_length is None:  # the run chose it from its data when it began
                    config.max_length = recorded.max_length
                self.length_recorded = config.max_length == recorded.max_length
                self.changed = check_same_run(recorded, config, folder)
            elif folder.find_checkpoint() is not None or folder.is_finished():
                raise ConfigError(
                    f"{folder.root} holds an earlier run (a checkpoint or a trained adapter): pass --resume to "
                    "continue it, or choose another --output-dir"
                )
            elif folder.entries():
                self.say(f"{folder.root} holds a run stopped before its first checkpoint: starting it afresh")
                folder.keep_log_until(0)
        self.dist.barrier()

    def _record_start(self) -> None:
        """Once every check passed: the settings in ``config.yaml``, and a resume's mark in the log."""
        if not self.dist.is_main:
            return
        if self.checkpoint is not None:
            self.folder.keep_log_until(self.progress.step)  # the steps after the checkpoint are done again
            self.folder.log(
                kind="resume", step=self.progress.step, checkpoint=self.checkpoint.name, changed=self.changed
            )
        self.folder.save_config(self.config)

    def close(self) -> None:
        """Release the folder's lock (:meth:`finish` does; also on an error)."""
        self.lock.release()

    def _load_data_and_model(self) -> None:
        from peftkit.assets import resolve_model  # the asset and data modules are only needed for a run
        from peftkit.data import Columns, load_splits

        config = self.config
        self.splits = load_splits(
            config.dataset, config.task, Columns(**config.columns), seed=config.split_seed, limit=config.limit
        )
        if config.train_size is not None:
            self.splits = self.splits.with_train_size(config.train_size)
        self.task = TASKS[self.splits.task]
        if self.dist.is_main:
            self.folder.write_labels(self.splits.task, self.splits.label_names)
        model_dir = resolve_model(config.model, log=self.say)
        self.tokenizer = self.task.load_tokenizer(model_dir)
        with (
            quiet_transformers()
        ):  # its load report lists the fresh task head, which the adapter trains in full
            base = self.task.load_model(model_dir, self.splits.label_names, self.tokenizer)
        # chosen from the training examples unless given; the share it cuts is said (training/lengths.py)
        self.say(
            lengths.settle_max_length(
                config, self.task, self.splits.train, self.tokenizer, base.config, self.length_recorded
            )
        )
        check_run(config, self.splits, self.tokenizer, base)  # empty splits, all-[UNK] input, positions
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
        # counted before --fsdp shards the parameters (a sharded 4-bit weight no longer knows its shape)
        self.count, self.base_bytes = self.model.trainable_parameters(), base_weight_bytes(self.model)
        self.say(f"{config.method} on {config.model}: {self.count.summary()}")
        if config.resume:  # the trained values replace the fresh ones before the optimizer sees them
            self.checkpoint, self.saved_state = restore_checkpoint(
                self.folder, self.model, self.say, self.dist.world_size
            )

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
        # read now, after the adapter (a head trained in full is its copy), a resumed adapter (which replaced
        # the fresh one) and the sharding (which replaces parameters)
        head = head_parameters(self.model.base_model, self.heads)
        self.optimizer = build_optimizer(
            self.model, config.learning_rate, config.weight_decay, head, config.head_learning_rate
        )
        self.scheduler = linear_schedule(
            self.optimizer, self.total_steps, warmup_steps=round(config.warmup_ratio * self.total_steps)
        )
        if self.checkpoint is not None:
            if self.sharded:  # the checkpoint holds the full state: each process takes its shards
                fsdp.shard_optimizer_state(self.saved_state, self.optimizer)
            self._restore_progress()
        finite = fsdp.ShardedFiniteParameters if self.sharded else FiniteParameters
        self.finite = finite(self.model) if config.check_finite else None
        ddp = dist.world_size > 1 and not self.sharded
        self.trained = DistributedDataParallel(self.model) if ddp else self.model
        self.loss_function = efficiency.loss_function(
            config, self.task.name, self.trained, self.model, self.tokenizer, self.say
        )

    def _restore_progress(self) -> None:
        """The optimizer, scheduler, RNGs and position of the checkpoint; it must not be past the new end."""
        try:
            self.progress = run_state.restore_trainer_state(self.saved_state, self.optimizer, self.scheduler)
        except (KeyError, ValueError, TypeError, RuntimeError) as error:
            raise ConfigError(
                f"--resume: the trainer state in {self.checkpoint} does not fit this run's optimizer "
                f"({type(error).__name__}: {error})"
            ) from None
        self.saved_step = self.progress.step
        if self.progress.step > self.total_steps:
            raise ConfigError(
                f"--resume: {self.checkpoint} is at step {self.progress.step}, past the {self.total_steps} "
                "steps --max-steps / --epochs now ask for: give at least as many steps as were done"
            )
        self._restore_curves()
        changed = "".join(f"; {k}: {old!r} -> {new!r}" for k, (old, new) in self.changed.items())
        self.say(f"resuming from {self.checkpoint} at step {self.progress.step}{changed}")

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
            if progress.step % config.eval_every == 0 or last:  # sharded: every process runs the model
                stop = dist.broadcast(self._validate() if dist.is_main or self.sharded else None)
            if progress.step % config.save_every == 0 or last or stop:
                self._save_checkpoint()
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
            sync = gradient_sync(self.trained, final=micro == config.gradient_accumulation - 1)
            with sync, autocast:
                loss = self.loss(batch) / config.gradient_accumulation
                loss.backward()
            loss_total += loss.item()
        loss_total = dist.mean(loss_total)  # the global batch's loss: every process takes the same decision
        self._stop_if(loss_problem(loss_total))  # before the step: NaN gradients would reach the weights
        if config.max_grad_norm:
            trained = [p for p in self.model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(trained, config.max_grad_norm)
        self.optimizer.step()
        if self.finite is not None:
            self._stop_if(self.finite.problem())
        self.scheduler.step()
        self.progress.step += 1
        return loss_total

    def _save_checkpoint(self) -> None:
        """The adapter and trainer state, written by the main process; sharded, every process first takes
        part in gathering them whole (the files are those of a one-process run)."""
        state = run_state.trainer_state(self.optimizer, self.scheduler, self.progress)
        state["world_size"] = self.dist.world_size  # a resume with another one would change the global batch
        if self.sharded:
            state["optimizer"] = fsdp.full_optimizer_state(self.optimizer)
        with fsdp.whole_trained_parameters(self.model, keep=self.dist.is_main):
            if self.dist.is_main:
                self.folder.save_checkpoint(self.model, state)
        self.saved_step = self.progress.step

    def _stop_if(self, problem: str | None) -> None:
        """Raise :class:`~peftkit.training.divergence.TrainingDiverged` for ``problem`` (None: go on),
        logged; the step in progress is never checkpointed."""
        if problem is None:
            return
        step, learning_rate = self.progress.step + 1, self.scheduler.get_last_lr()[0]
        checkpoint = self.folder.find_checkpoint()
        kept = (
            f"the last checkpoint ({checkpoint}, step {self.saved_step}) and any saved adapter are kept"
            if checkpoint is not None
            else "no checkpoint had been written yet"
        )
        if self.dist.is_main:
            self.folder.log(kind="diverged", step=step, problem=problem, lr=learning_rate)
        raise diverged(problem, step, learning_rate, kept)

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
        if self.dist.is_main:
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
        with fsdp.whole_trained_parameters(self.model, keep=dist.is_main):
            if dist.is_main:
                self.model.save_pretrained(folder.adapter_dir)
                adapter_bytes = (folder.adapter_dir / WEIGHTS_NAME).stat().st_size
        if dist.is_main or self.sharded:  # sharded: every process runs the model, the main one reports
            metrics = self.evaluate(self.splits.test)
            metrics = metrics if dist.is_main else {}
        if dist.is_main:
            self.model.eval()
            folder.log(kind="test", step=self.progress.step, **scalars(metrics))
            folder.plot_curves(self.task.primary.name)
        dist.barrier()
        dist.shutdown()
        result = TrainResult.of_run(self, metrics, adapter_bytes)
        if dist.is_main:
            folder.write_result(result.to_dict())
        self.close()
        return result
