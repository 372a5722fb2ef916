"""A model's language-model training loss through :func:`linear_cross_entropy`, without the logits.

The model's own forward runs unchanged up to its output head; the head is stood in for by an identity for
the duration of the call, so the "logits" that come back are the hidden states the head would have read
(after whatever the architecture does to them first, e.g. T5's rescaling of tied outputs). The fused loss
then takes the head's weight and bias. Used only for training: evaluation and generation keep the ordinary
forward.

It is exact only where the architecture's loss is ``cross_entropy(head(hidden), labels)`` with nothing done to
the logits after the head (no soft-capping, no logit scale): :data:`EXACT_MODEL_TYPES` lists those checked
against the ordinary loss in ``tests/test_fused_loss.py``. :func:`fused_loss_unsupported` says why a model
is not eligible, so a caller falls back to ``model(**batch).loss``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from peftkit.losses.linear_cross_entropy import IGNORE_INDEX, linear_cross_entropy, shift_labels
from peftkit.module_paths import replace_module

# model_type -> whether its labels are shifted (causal LM) or scored in place (encoder-decoder)
EXACT_MODEL_TYPES: dict[str, bool] = {
    "llama": True,
    "mistral": True,
    "qwen2": True,
    "gpt2": True,
    "t5": False,
    "mt5": False,
}

__all__ = [
    "EXACT_MODEL_TYPES",
    "fused_loss_unsupported",
    "fused_training_loss",
    "input_changing_method",
    "transformers_model",
]


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peftkit ``PeftModel`` (or ``model`` itself)."""
    from peftkit.model import PeftModel

    return model.base_model if isinstance(model, PeftModel) else model


def input_changing_method(model: nn.Module) -> str | None:
    """The name of the active adapter's method when it rewrites the model's inputs (prompt and prefix
    tuning), else None."""
    from peftkit.methods import method_for_config
    from peftkit.model import PeftModel

    if isinstance(model, PeftModel) and model.active_adapter is not None:
        method = method_for_config(model.peft_config[model.active_adapter])
        if method.prepare_inputs is not None:
            return method.name
    return None


def fused_loss_unsupported(model: nn.Module) -> str | None:
    """Why the fused loss would not equal ``model(**batch).loss`` for ``model`` (a ``PeftModel`` or a
    transformers model), or None when it does."""
    hf = transformers_model(model)
    config = getattr(hf, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in EXACT_MODEL_TYPES:
        return f"model type {model_type!r} is not one checked for it ({', '.join(EXACT_MODEL_TYPES)})"
    head = hf.get_output_embeddings()
    if type(head) is not nn.Linear:
        return f"the output head is a {type(head).__name__} (an adapter on it?), not a plain Linear layer"
    method = input_changing_method(model)
    if method is not None:
        return f"the {method} method changes the model's inputs"
    return None


def fused_training_loss(
    forward: Callable[..., Any],
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    label_smoothing: float = 0.0,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``forward(**batch).loss`` (mean over the non-ignored label tokens), computed by the fused loss.

    ``forward`` is what runs the model (``model`` itself, or its ``DistributedDataParallel`` wrapper);
    ``model`` is the ``PeftModel`` or transformers model it runs, which :func:`fused_loss_unsupported` must
    accept. ``batch`` holds ``labels`` ``(batch, seq)`` (``-100`` where not scored, unshifted for a causal
    LM: shifted here as transformers does) and the model's inputs. Raises ``KeyError`` without labels.
    """
    hf = transformers_model(model)
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    causal = EXACT_MODEL_TYPES[hf.config.model_type]
    if not causal and inputs.get("decoder_input_ids") is None:
        inputs["decoder_input_ids"] = hf.prepare_decoder_input_ids_from_labels(labels=labels)
    head = hf.get_output_embeddings()
    with _head_bypassed(hf, head):
        hidden = forward(**inputs).logits  # (batch, seq, hidden): what the head would have read
    targets = shift_labels(labels, IGNORE_INDEX) if causal else labels
    return linear_cross_entropy(
        hidden,
        head.weight,
        targets.to(hidden.device),
        head.bias,
        label_smoothing=label_smoothing,
        backend=backend,
        chunk_size=chunk_size,
    )


@contextlib.contextmanager
def _head_bypassed(hf: nn.Module, head: nn.Module) -> Iterator[None]:
    path = next(name for name, module in hf.named_modules() if module is head)
    replace_module(hf, path, nn.Identity())
    try:
        yield
    finally:
        replace_module(hf, path, head)
