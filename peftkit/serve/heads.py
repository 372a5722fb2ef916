"""Per-adapter task heads for ``POST /v1/classify``: each classification adapter brings its own head (a
freshly trained ``classifier`` or ``score`` with its own number of labels), so heads cannot be gathered per
row the way LoRA's matrices are, nor stacked in one ``modules_to_save`` wrapper (their widths differ).

A :class:`HeadBank` takes the head's place in the task model: the model's own forward (BERT's pooler, a
decoder's pick of the last real token) runs unchanged and calls the bank where it would call its head; the
bank applies each row's adapter head to that row and pads the narrower outputs with zeros to the widest.
The caller reads row ``b``'s first ``n_b`` logits (``n_b``: its adapter's label count).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from peftkit.config import ConfigError
from peftkit.tasks.classification import HEAD_NAMES

KEY_PREFIX = "base_model.model."  # checkpoint keys of the model's own modules (peftkit and HF PEFT)


class HeadBank(nn.Module):
    """Stands where the task head was; ``rows`` (one adapter name per row) is set before each forward.

    The heads live in a plain dict, not as registered submodules, so that ``PeftModel``'s walks over the
    model (adapter layers, checkpoint keys, base parameters) never see them."""

    def __init__(self) -> None:
        super().__init__()
        self.heads: dict[str, nn.Module] = {}
        self.rows: list[str] = []

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``x`` (batch, ..., hidden) -> (batch, ..., widest head's labels), row b through its adapter's head."""
        if len(self.rows) != x.shape[0]:
            raise ValueError(f"HeadBank: {len(self.rows)} row names for a batch of {x.shape[0]} rows")
        outputs = {}
        for name in dict.fromkeys(self.rows):
            index = torch.tensor([i for i, row in enumerate(self.rows) if row == name], device=x.device)
            outputs[name] = (index, self.heads[name](x[index], *args, **kwargs))
        width = max(out.shape[-1] for _, out in outputs.values())
        first = next(iter(outputs.values()))[1]
        result = first.new_zeros((*x.shape[:-1], width))  # (batch, ..., widest)
        for index, out in outputs.values():
            result[index, ..., : out.shape[-1]] = out
        return result


def head_paths(model: nn.Module) -> list[str]:
    """The task head's attribute names on ``model`` (``classifier`` or ``score``)."""
    paths = [name for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]
    if not paths:
        raise ConfigError(f"{type(model).__name__} has none of the task heads {HEAD_NAMES}")
    return paths


def label_count(header: dict, paths: list[str], source) -> int:
    """The number of labels an adapter's saved head has (the out size of its last projection), from the
    safetensors header (``key -> (shape, dtype)``)."""
    for path in paths:
        for key in (f"{KEY_PREFIX}{path}.weight", f"{KEY_PREFIX}{path}.out_proj.weight"):
            if key in header:
                return int(header[key][0][0])
    raise ConfigError(
        f"{source} saves no task head ({', '.join(paths)}); a classification adapter must be trained with its "
        "head (modules_to_save, or task_type SEQ_CLS / TOKEN_CLS)"
    )


def fresh_heads(model: nn.Module, paths: list[str], labels: int) -> dict[str, nn.Module]:
    """Uninitialised heads of ``model``'s class with ``labels`` outputs (built on the meta device, then given
    storage on the model's device and dtype): the shape an adapter's saved head is loaded into."""
    config = copy.deepcopy(model.config)
    config.num_labels = labels
    with torch.device("meta"):
        shell = type(model)(config)
    parameter = next(model.parameters())
    return {
        path: shell.get_submodule(path).to_empty(device=parameter.device).to(parameter.dtype).eval()
        for path in paths
    }


def bio_entities(words: list[str], labels: list[str], scores: list[float]) -> list[dict]:
    """Entity spans from word labels in the BIO (IOB2) scheme: ``B-X`` opens an ``X`` span, ``I-X`` continues
    it (an ``I-X`` after another type opens a new one, as seqeval reads it), ``O`` closes it. Each span: its
    type, words ``[start, end)``, text (the words joined by spaces) and the mean of its words' scores."""
    spans: list[dict] = []
    current = None
    for index, (label, score) in enumerate(zip(labels, scores, strict=True)):
        prefix, _, kind = label.partition("-")
        if prefix in ("B", "I") and kind:
            if prefix == "B" or current is None or current["entity"] != kind:
                current = {"entity": kind, "start": index, "end": index, "scores": []}
                spans.append(current)
            current["end"] = index + 1
            current["scores"].append(score)
        else:
            current = None
    return [
        {
            "entity": span["entity"],
            "start": span["start"],
            "end": span["end"],
            "text": " ".join(words[span["start"] : span["end"]]),
            "score": sum(span["scores"]) / len(span["scores"]),
        }
        for span in spans
    ]
