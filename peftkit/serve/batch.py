"""Prefill of one request and one decode step of the running batch, every row through its own adapter.

A decode step is one forward pass of the whole batch, one token per row: ``PeftModel``'s mixed batch
(``adapter_names=``, one name per row) routes each row through its adapter, and the batch cache
(:mod:`peftkit.serve.kv`) gives each row its own keys and values. Methods whose adapter enters through the
inputs (prompt tuning, prefix tuning, P-tuning) are prefilled on their own, with the virtual tokens their
method puts in front (the same ``prepare_generation`` that ``PeftModel.generate`` uses); after that the
virtual tokens are in the row's cache and the row decodes as a base-model row of the shared batch.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from peftkit.layer import BASE_ROW
from peftkit.model import PeftModel
from peftkit.serve.kv import BatchCache, check_cache
from peftkit.serve.sampling import next_tokens
from peftkit.serve.sequence import Sequence


def _logits_kwargs(model: nn.Module) -> dict:
    """Ask for the last position's logits only, where the model can (the vocabulary projection is big)."""
    accepted = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}


class Runner:
    """Runs prefills and decode steps on one ``PeftModel``; used by the scheduler's thread only."""

    def __init__(self, model: PeftModel, input_methods: dict[str, object]) -> None:
        self.model = model
        self.device = next(model.base_model.parameters()).device
        self.extra = _logits_kwargs(model.base_model)
        self.input_methods = input_methods  # adapter name -> its method, for adapters entering at the inputs

    def prefill(self, sequence: Sequence, adapter: str | None) -> tuple[torch.Tensor, object]:
        """Run the prompt alone through ``adapter`` (None: the base model); (last logits (vocab,), the
        row's single-row cache)."""
        ids = torch.tensor([sequence.prompt_ids], dtype=torch.long, device=self.device)  # (1, L)
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        method = self.input_methods.get(adapter) if adapter is not None else None
        if method is not None:
            kwargs = method.prepare_generation(self.model.base_model, adapter, kwargs)
            if kwargs.get("inputs_embeds") is not None:
                kwargs.pop("input_ids", None)  # the embeddings carry the virtual tokens (P-tuning's slots)
            sequence.routing_name = BASE_ROW
        else:
            sequence.routing_name = BASE_ROW if adapter is None else adapter
        output = self.model(**kwargs, use_cache=True, adapter_names=[sequence.routing_name], **self.extra)
        cache = output.past_key_values
        check_cache(cache)
        sequence.length = cache.get_seq_length()
        return output.logits[0, -1], cache

    def decode(self, rows: list[Sequence], cache: BatchCache) -> list[int]:
        """One token for every row (all rows' caches advance by one)."""
        mask, positions = cache.step_inputs(self.device)
        ids = torch.tensor([[row.generated[-1]] for row in rows], dtype=torch.long, device=self.device)
        output = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache.cache,
            use_cache=True,
            adapter_names=[row.routing_name for row in rows],
            **self.extra,
        )
        cache.advance()
        for row, length in zip(rows, cache.lengths, strict=True):
            row.length = length
        return next_tokens(
            output.logits[:, -1], [row.params for row in rows], [row.generator for row in rows]
        )
