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

    def prefill(self, sequences: list[Sequence], adapters: list[str | None]) -> tuple[torch.Tensor, object]:
        """Run the prompts, each through its adapter (None: the base model); (last logits (rows, vocab), their
        cache, right-aligned). Prompts of adapters entering at the inputs run alone (one row each) through
        their method; the others run together in one left-padded mixed batch."""
        methods = [self.input_methods.get(a) if a is not None else None for a in adapters]
        if len(sequences) == 1 and methods[0] is not None:
            return self._prefill_virtual(sequences[0], adapters[0], methods[0])
        if any(method is not None for method in methods):
            raise ValueError("adapters entering at the inputs are prefilled one at a time")
        longest = max(len(s.prompt_ids) for s in sequences)
        ids = torch.zeros(len(sequences), longest, dtype=torch.long)  # (rows, longest), padded on the left
        mask = torch.zeros_like(ids)
        for row, sequence in enumerate(sequences):
            ids[row, longest - len(sequence.prompt_ids) :] = torch.tensor(sequence.prompt_ids)
            mask[row, longest - len(sequence.prompt_ids) :] = 1
            sequence.routing_name = BASE_ROW if adapters[row] is None else adapters[row]
            sequence.length = len(sequence.prompt_ids)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each row's real tokens at 0 .. length-1
        output = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            adapter_names=[s.routing_name for s in sequences],
            **self.extra,
        )
        check_cache(output.past_key_values)
        return output.logits[:, -1], output.past_key_values

    def _prefill_virtual(self, sequence: Sequence, adapter: str, method) -> tuple[torch.Tensor, object]:
        """A prompt-method row: its virtual tokens put in front by the method (as ``PeftModel.generate``
        does), after which the row is a base-model row whose cache holds them."""
        ids = torch.tensor([sequence.prompt_ids], dtype=torch.long, device=self.device)  # (1, L)
        kwargs = method.prepare_generation(
            self.model.base_model, adapter, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        )
        if kwargs.get("inputs_embeds") is not None:
            kwargs.pop("input_ids", None)  # the embeddings carry the virtual tokens (P-tuning's slots)
        sequence.routing_name = BASE_ROW
        output = self.model(**kwargs, use_cache=True, adapter_names=[BASE_ROW], **self.extra)
        check_cache(output.past_key_values)
        sequence.length = output.past_key_values.get_seq_length()
        return output.logits[:, -1], output.past_key_values

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
