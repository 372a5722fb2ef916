"""Hugging Face PEFT's ``TaskType``: what kind of model an adapter was trained on, written into adapter files.

peftkit itself does not need it (it wraps any model and reads its outputs as they are), but Hugging Face
PEFT's ``AutoPeftModelFor...`` classes and ``PeftModel.from_pretrained`` pick their wrapper from it, so
peftkit writes it into every ``adapter_config.json``: the one given in the config, otherwise the one the
model's class says (transformers' auto-class mappings).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: peftkit.config (and `peftkit --help`) must not import torch
    from torch import nn


class TaskType(enum.StrEnum):
    """The values of HF PEFT's ``TaskType`` (a ``str`` enum, so ``TaskType.CAUSAL_LM == "CAUSAL_LM"``)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


TASK_TYPES = tuple(t.value for t in TaskType)

# Tasks whose head HF PEFT always trains in full (adds to `modules_to_save`) and expects in the adapter file
TASK_HEADS: dict[str, tuple[str, ...]] = {
    TaskType.SEQ_CLS.value: ("classifier", "score"),
    TaskType.TOKEN_CLS.value: ("classifier", "score"),
    TaskType.QUESTION_ANS.value: ("qa_outputs",),
}

# TaskType -> the transformers auto-class mapping whose model classes are of that task, and the auto class
_MAPPINGS = {
    TaskType.CAUSAL_LM: ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    TaskType.SEQ_2_SEQ_LM: ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    TaskType.SEQ_CLS: (
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
        "AutoModelForSequenceClassification",
    ),
    TaskType.TOKEN_CLS: ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "AutoModelForTokenClassification"),
    TaskType.QUESTION_ANS: ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "AutoModelForQuestionAnswering"),
    TaskType.FEATURE_EXTRACTION: ("MODEL_MAPPING_NAMES", "AutoModel"),
}


def task_type_value(value: object) -> str | None:
    """``value`` (a ``TaskType``, its name or None) as the string written to files; ValueError otherwise."""
    if value is None:
        return None
    text = value.value if isinstance(value, TaskType) else value
    if text not in TASK_TYPES:
        raise ValueError(f"`task_type` must be one of {list(TASK_TYPES)} or None, got {value!r}")
    return text


def task_type_of(model: nn.Module) -> str | None:
    """The task of a transformers model from its class (``LlamaForCausalLM`` -> ``CAUSAL_LM``); None for a
    model that is not a transformers task model."""
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    for task, (mapping, _) in _MAPPINGS.items():
        classes = getattr(modeling_auto, mapping, {}).values()
        if any(name == c or (isinstance(c, tuple | list) and name in c) for c in classes):
            return task.value
    return None


def auto_class(task: str | None):
    """The transformers auto class that loads a model of task ``task`` (``AutoModel`` for None)."""
    import transformers

    return getattr(transformers, _MAPPINGS[TaskType(task)][1] if task else "AutoModel")


def with_task_heads(config, model: nn.Module):
    """``config`` with the task's head added to ``modules_to_save`` (what HF PEFT does for a config with
    ``task_type`` ``SEQ_CLS``, ``TOKEN_CLS`` or ``QUESTION_ANS``: a freshly initialised head must train)."""
    heads = TASK_HEADS.get(getattr(config, "task_type", None), ())
    saved = tuple(getattr(config, "modules_to_save", None) or ())
    names = [n for n, _ in model.named_modules()]
    extra = [h for h in heads if h not in saved and any(n == h or n.endswith("." + h) for n in names)]
    return config.replace(modules_to_save=saved + tuple(extra)) if extra else config


def file_task_type(model: nn.Module, modules_to_save) -> str | None:
    """The task to write for an adapter that does not name one: the model class's, unless HF PEFT would then
    expect a trained head in the file that this adapter does not save (None is written then)."""
    task = task_type_of(model)
    heads = TASK_HEADS.get(task)
    if heads and not set(heads) & set(modules_to_save or ()):
        return None
    return task
