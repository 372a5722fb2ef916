"""Loading an adapter together with its base model, named in the adapter's ``base_model_name_or_path``
(Hugging Face PEFT's ``AutoPeftModelFor...`` classes).

    model = AutoPeftModelForCausalLM.from_pretrained("adapter/")      # base from adapter_config.json

Only local folders: peftkit never downloads a model. A ``base_model_name_or_path`` that is not a folder on
this machine (a hub id) is refused with a message; load that base yourself and call
``PeftModel.from_pretrained(base, "adapter/")``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peftkit import checkpoint
from peftkit.adapter_names import check_adapter_name
from peftkit.file_checks import contained_file, read_config
from peftkit.model import PeftModel
from peftkit.task_type import TaskType, auto_class


class AutoPeftModel:
    """Base model class from the adapter's ``task_type`` (``AutoModel`` when it has none)."""

    task_type: str | None = None  # the subclasses' task; None: whatever the adapter says

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        **model_kwargs: Any,
    ) -> PeftModel:
        """The base model from the adapter's ``base_model_name_or_path`` (a local folder, loaded with the
        transformers auto class of the task, ``local_files_only=True`` and ``model_kwargs``) with the
        adapter in ``directory`` on it, active (frozen unless ``is_trainable``).

        Raises :class:`~peftkit.CheckpointError` when the adapter names no base, the base is not a local
        folder, or the adapter's ``task_type`` is not this class's."""
        directory = Path(directory)
        check_adapter_name(adapter_name)
        config_path = directory / checkpoint.CONFIG_NAME
        if not directory.is_dir() or contained_file(directory, checkpoint.CONFIG_NAME) is None:
            raise checkpoint.CheckpointError(
                f"no {checkpoint.CONFIG_NAME} in {directory} (is this an adapter directory?)"
            )
        config, _ = read_config(config_path)  # a JSON object, or an error naming the file
        base = config.get("base_model_name_or_path")
        if not base:
            raise checkpoint.CheckpointError(
                f"{config_path} names no `base_model_name_or_path`; load the base model yourself and call "
                f"PeftModel.from_pretrained(base, {str(directory)!r})"
            )
        if not Path(base).is_dir():
            raise checkpoint.CheckpointError(
                f"`base_model_name_or_path`={base!r} in {config_path} is not a folder on this machine, and peftkit "
                "never downloads models; download it with your own tools, then load it and call "
                "PeftModel.from_pretrained(base, adapter_dir)"
            )
        task = config.get("task_type")
        if cls.task_type is not None and task is not None and task != cls.task_type:
            raise checkpoint.CheckpointError(
                f"{directory} is a {task} adapter; {cls.__name__} loads {cls.task_type} adapters "
                f"(use AutoPeftModelFor... of that task, or AutoPeftModel)"
            )
        model = auto_class(cls.task_type or task).from_pretrained(base, local_files_only=True, **model_kwargs)
        return PeftModel.from_pretrained(model, directory, adapter_name, is_trainable=is_trainable)


class AutoPeftModelForCausalLM(AutoPeftModel):
    task_type = TaskType.CAUSAL_LM.value


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    task_type = TaskType.SEQ_2_SEQ_LM.value


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    task_type = TaskType.SEQ_CLS.value


class AutoPeftModelForTokenClassification(AutoPeftModel):
    task_type = TaskType.TOKEN_CLS.value


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    task_type = TaskType.QUESTION_ANS.value


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    task_type = TaskType.FEATURE_EXTRACTION.value
