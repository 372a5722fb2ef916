"""TRL's ``SFTTrainer`` training a peftkit model: :class:`PeftkitSFTTrainer`.

``SFTTrainer`` (TRL 1.16) patches the model's ``forward`` with a fused LM head that calls
``model.base_model`` as the transformer backbone and ``model.get_output_embeddings()`` as the head. It
patches the task model HF PEFT's ``get_base_model()`` returns, but only when ``isinstance(model,
peft.PeftModel)`` (accelerate's ``is_peft_model``); a peftkit model has its own ``forward`` patched, whose
``base_model`` is the whole task model, so the first step failed. This subclass moves the patch where TRL
puts it for HF PEFT: onto the task model, which then sees ``fused_lm_head=True`` passed through the wrapper.
Saving and resuming are those of :class:`~peftkit.integrations.trainer.PeftkitTrainerMixin`.
"""

from __future__ import annotations

from typing import Any

from trl import SFTTrainer
from trl.trainer.utils import add_fused_lm_head

from peftkit.integrations.trainer import PeftkitTrainerMixin
from peftkit.model import PeftModel

# what SFTTrainer asks of its fused head (trl/trainer/sft_trainer.py: `is_top1` feeds mean_token_accuracy)
_FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")


class PeftkitSFTTrainer(PeftkitTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` for a peftkit model: trains it and saves only the adapter (HF PEFT's layout)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        if isinstance(model, PeftModel) and "forward" in vars(model):
            del model.forward  # the wrapper's own forward again (an instance attribute was set by the patch)
            add_fused_lm_head(model.base_model, outputs=_FUSED_OUTPUTS)
