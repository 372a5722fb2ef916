"""What ``peftkit train`` does to spend less memory and time on generation tasks, chosen once per run.

- the batch order (:func:`batch_order`): length-grouped (``group_by_length``, on by default for every task),
  so a batch pads to its own examples' length rather than to the longest of a random draw. For sequence
  classification the grouping keeps each batch's label mix (:class:`~peftkit.data.batching.StepOrder` with
  ``labels``): a text's length can go with its label, and batches of one length must not become batches of
  one label. ``group_by_length: null``, as runs recorded before it was on by default, keeps their rule: on
  for causal-LM and seq2seq only.
- the loss (:func:`loss_function`): the fused linear cross-entropy when ``fused_loss`` is on and it equals
  the model's own loss (:func:`~peftkit.losses.language_model.fused_loss_unsupported`), else the model's
  own; with ``packing`` (causal LM only) each micro-batch is first packed into fuller rows, each example
  keeping its own positions and attention, so the loss is the same and only the padding goes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from peftkit.config import ConfigError
from peftkit.data.batching import StepOrder, pack_batch
from peftkit.losses.language_model import (
    fused_loss_unsupported,
    fused_training_loss,
    input_changing_method,
    transformers_model,
)

GENERATION_TASKS = ("causal-lm", "seq2seq")
# Architectures whose attention takes a 4-D block-diagonal mask as given (transformers' masking utilities),
# checked in tests/test_batching.py.
PACKING_MODEL_TYPES = ("llama", "mistral", "qwen2")
LENGTH_BATCH = 256  # records tokenized at once while measuring lengths

Batch = dict[str, torch.Tensor]


def groups_by_length(config, task_name: str) -> bool:
    """``group_by_length`` as set, or (None: the rule of runs recorded before it was on by default) on for
    the generation tasks only."""
    return config.group_by_length if config.group_by_length is not None else task_name in GENERATION_TASKS


def class_labels(records: Sequence[dict]) -> list[int] | None:
    """Each record's class (sequence classification: one integer ``label`` per record), or None for records
    without one (token tags, generation), whose batches need no label mix kept."""
    labels = [r.get("label") for r in records]
    return labels if all(isinstance(y, int) and not isinstance(y, bool) for y in labels) else None


def batch_order(config, task, records: Sequence[dict], tokenizer, global_batch: int) -> StepOrder:
    """The run's :class:`~peftkit.data.batching.StepOrder`: seeded, length-grouped when asked (lengths are
    the tokens the task's collate gives each record, truncated to ``max_length``), keeping each batch's mix
    of class labels where the records have them."""
    lengths = None
    if groups_by_length(config, task.name):
        lengths = []
        for start in range(0, len(records), LENGTH_BATCH):
            batch = task.collate(records[start : start + LENGTH_BATCH], tokenizer, config.max_length)
            tokens = batch["attention_mask"].sum(dim=1)
            if batch["labels"].dim() == 2 and batch["labels"].shape != batch["input_ids"].shape:
                tokens = tokens + (batch["labels"] != -100).sum(dim=1)  # seq2seq: the target's tokens too
            lengths += tokens.tolist()
    labels = class_labels(records) if lengths is not None else None
    return StepOrder(len(records), global_batch, config.seed, lengths=lengths, labels=labels)


def fused_loss_off_reason(enabled: bool, task_name: str, model) -> str | None:
    """Why a run of ``task_name`` on ``model`` (a ``PeftModel``) trains with the model's own loss rather than
    the fused one, or None when the fused loss is used. Train and ``peftkit plan`` both ask here."""
    if not enabled:
        return "switched off"
    if task_name not in GENERATION_TASKS:
        return f"the {task_name} task has no language-model loss"
    return fused_loss_unsupported(model)


def loss_function(
    config, task_name: str, forward: Callable, model, tokenizer, say: Callable[[str], None]
) -> Callable[[Batch], torch.Tensor]:
    """batch -> scalar training loss for this run (``forward`` runs ``model``, perhaps wrapped in DDP).

    Raises :class:`~peftkit.config.ConfigError` for ``packing`` where it is not exact: a task other than
    causal-lm, an architecture not in :data:`PACKING_MODEL_TYPES`, or a method that changes the inputs."""
    reason = fused_loss_off_reason(config.fused_loss, task_name, model)
    fused = reason is None
    if config.fused_loss and task_name in GENERATION_TASKS and not fused:
        say(f"fused loss off: {reason}; the model's own loss is used")
    pack = _packer(config, task_name, model, tokenizer) if config.packing else None

    def loss(batch: Batch) -> torch.Tensor:
        if pack is not None:
            batch = pack(batch)
        if task_name == "causal-lm" and not bool((batch["labels"][:, 1:] != -100).any()):
            return _nothing_scored(forward, batch)
        return fused_training_loss(forward, model, batch) if fused else forward(**batch).loss

    return loss


def _nothing_scored(forward: Callable, batch: Batch) -> torch.Tensor:
    """Loss 0 with zero gradients for a causal-LM micro-batch whose rows all lost their response to
    ``max_length`` (the mean over no scored token would be 0/0 = NaN). The model still runs, so that every
    process of a distributed run takes part in the same gradient reduction."""
    logits = forward(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return logits.sum() * 0.0


def _packer(config, task_name: str, model, tokenizer) -> Callable[[Batch], Batch]:
    if task_name != "causal-lm":
        raise ConfigError(f"`packing` is for causal-lm training, not {task_name}")
    model_type = getattr(transformers_model(model).config, "model_type", None)
    if model_type not in PACKING_MODEL_TYPES:
        raise ConfigError(
            f"`packing` is checked for the model types {', '.join(PACKING_MODEL_TYPES)}, not {model_type!r}"
        )
    method = input_changing_method(model)
    if method is not None:
        raise ConfigError(f"`packing` cannot be used with {method}: the method changes the model's inputs")
    return lambda batch: pack_batch(batch, config.max_length, tokenizer.pad_token_id)
