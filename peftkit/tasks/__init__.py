"""Tasks: what model class, batch layout, loss and metrics a fine-tuning run uses.

A task is chosen by name (``TASKS[name]``), never by branching in the training loop. Each one knows how to
load its model from a local folder, turn canonical records (see :mod:`peftkit.data`) into a batch, evaluate
a model on records, and answer for given inputs.
"""

from __future__ import annotations

from peftkit.tasks.base import Task
from peftkit.tasks.classification import SequenceClassification, TokenClassification
from peftkit.tasks.generation import CausalLM, Seq2Seq

TASKS: dict[str, Task] = {
    task.name: task for task in (SequenceClassification(), TokenClassification(), CausalLM(), Seq2Seq())
}

__all__ = ["TASKS", "Task"]
