"""transformers' ``Trainer`` saving and resuming a peftkit adapter, not the whole model.

Why a subclass: ``Trainer`` recognises a PEFT model only by ``isinstance(model, peft.PeftModel)``
(``transformers.trainer_utils._is_peft_model``) and offers no hook to register another wrapper. Everything
else works with plain ``Trainer`` (the forward signature keeps the input columns, ``labels`` gives eval_loss,
``accepts_loss_kwargs`` / ``loss_type`` give the gradient-accumulation normalisation HF PEFT gets); but plain
``Trainer._save`` writes the wrapper's full ``state_dict()`` (base weights included) and ``_load_from_checkpoint``
finds no weights it knows in an adapter folder. The mixin overrides exactly those two methods:

- ``_save``: ``model.save_pretrained(dir)`` (HF PEFT's layout: ``adapter_config.json`` and
  ``adapter_model.safetensors``; other adapters in sub-folders), plus the tokenizer and ``training_args.bin``.
- ``_load_from_checkpoint``: each adapter's tensors loaded in place (``load_adapter_weights``).

Any other model is handed to ``Trainer``'s own methods unchanged.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from peftkit.checkpoint import CONFIG_NAME
from peftkit.model import PeftModel


class PeftkitTrainerMixin:
    """Put before a ``Trainer`` class: ``class T(PeftkitTrainerMixin, MyTrainer)`` (TRL: :mod:`peftkit.integrations.trl`)."""

    def _peftkit_model(self) -> PeftModel | None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if isinstance(model, PeftModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._peftkit_model()
        if model is None:
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, state_dict=state_dict)
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        peft_model = self._peftkit_model() if model is None else model
        if not isinstance(peft_model, PeftModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        for name in peft_model.peft_config:
            folder = (
                resume_from_checkpoint if name == "default" else os.path.join(resume_from_checkpoint, name)
            )
            if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
                peft_model.load_adapter_weights(folder, name)
        return None


class PeftkitTrainer(PeftkitTrainerMixin, Trainer):
    """``transformers.Trainer`` whose ``save_model()`` and ``checkpoint-N/`` hold only the adapter."""


def peftkit_trainer_class(trainer_class: type[Trainer]) -> type[Trainer]:
    """``trainer_class`` with :class:`PeftkitTrainerMixin` in front."""
    return type(f"Peftkit{trainer_class.__name__}", (PeftkitTrainerMixin, trainer_class), {})
