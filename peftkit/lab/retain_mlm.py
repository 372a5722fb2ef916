"""Retained ability of an encoder: its masked-LM loss on general text, with the task's adapter active.

An encoder tuned for classification or tagging keeps its pretrained masked-LM head only in the checkpoint it
came from: the task model drops it. When the base checkpoint has that head, the head is loaded again
(``AutoModelForMaskedLM``) and fed by the *task model's* encoder, adapted layers included, so the loss
measures what the tuned encoder still knows about language (Devlin et al. 2019, arXiv:1810.04805, section
3.1: predict masked tokens from their context). Without the head, or for a method that works on the task
model's inputs (prompt-style methods prepend virtual tokens there, which a bare encoder does not see), the
measure does not apply and the record says why.

Masking is deterministic, so the base and every method score the same positions: 15% of the tokens of each
window (at least one), drawn with a fixed seed, replaced by the mask token (no 80/10/10 mix: a measurement,
not training).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

MEASURE = "mlm_loss"  # nats per masked token
MASK_RATE = 0.15
MASK_SEED = 0


def masked_windows(windows: torch.Tensor, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)``, both ``(n, length + 2)``: each window between the tokenizer's CLS and SEP,
    15% of its tokens (seeded; at least one) replaced by the mask token; labels -100 except there."""
    n, length = windows.shape
    framed = torch.cat(
        [
            torch.full((n, 1), tokenizer.cls_token_id),
            windows,
            torch.full((n, 1), tokenizer.sep_token_id),
        ],
        dim=1,
    )  # (n, length + 2)
    generator = torch.Generator().manual_seed(MASK_SEED)
    chosen = torch.rand(n, length, generator=generator) < MASK_RATE  # (n, length)
    chosen[torch.arange(n), torch.randint(length, (n,), generator=generator)] = True
    masked = torch.zeros_like(framed, dtype=torch.bool)
    masked[:, 1:-1] = chosen
    labels = framed.masked_fill(~masked, -100)
    return framed.masked_fill(masked, tokenizer.mask_token_id), labels


def load_mlm_head(model_dir: str | Path) -> tuple[Any, str | None]:
    """(the base checkpoint as a masked-LM model, None), or (None, why not) when it holds no MLM head."""
    from transformers import AutoModelForMaskedLM

    from peftkit.training.runtime import quiet_transformers

    try:
        with quiet_transformers():
            model, info = AutoModelForMaskedLM.from_pretrained(
                model_dir, dtype=torch.float32, output_loading_info=True
            )
    except ValueError as error:  # an architecture without a masked-LM class
        return None, f"not applicable: the base model has no masked-LM head ({error})"
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        return None, (
            f"not applicable: the base checkpoint has no masked-LM head ({len(missing)} of its weights are "
            f"missing, e.g. {missing[0]})"
        )
    return model, None


def encoder_mlm_ability(task_model, model_dir, tokenizer, windows: torch.Tensor) -> dict[str, Any]:
    """``{"measure": "mlm_loss", "mlm_loss": nats per masked token, "tokens": masked tokens}`` of
    ``task_model``'s encoder (a PeftModel's adapter active) under the base checkpoint's masked-LM head, or
    ``{"measure": None, "note": why}``."""
    from peftkit.methods.registry import method_for_config
    from peftkit.model import PeftModel

    model = task_model
    if isinstance(task_model, PeftModel):
        config = task_model.peft_config[task_model.active_adapters[0]]
        if method_for_config(config).prepare_inputs is not None:
            return {"measure": None, "note": "not applicable: the method works on the task model's inputs"}
        model = task_model.base_model
    mlm, why = load_mlm_head(model_dir)
    if mlm is None:
        return {"measure": None, "note": why}
    prefix = mlm.base_model_prefix
    setattr(mlm, prefix, getattr(model, prefix))  # the tuned encoder under the pretrained head
    if getattr(mlm.config, "tie_word_embeddings", False):
        mlm.get_output_embeddings().weight = mlm.get_input_embeddings().weight  # tied to the tuned embeddings
    return _mlm_loss(mlm.eval(), *masked_windows(windows, tokenizer))


@torch.no_grad()
def _mlm_loss(mlm, input_ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 8) -> dict[str, Any]:
    total, count = 0.0, 0
    for start in range(0, len(input_ids), batch_size):
        ids, target = input_ids[start : start + batch_size], labels[start : start + batch_size]
        loss = mlm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=target).loss
        masked = int((target != -100).sum())
        total, count = total + loss.item() * masked, count + masked
    return {"measure": MEASURE, MEASURE: total / count, "tokens": count}
