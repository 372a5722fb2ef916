"""Prefill of one request and one decode step of the running batch, every row through its own adapter.

A decode step is one forward pass of the whole batch, one token per row: ``PeftModel``'s mixed batch
routing (one adapter name per row) sends each row through its adapter, and the batch cache
(:mod:`peftkit.serve.kv`) gives each row its own keys and values. Prefills go through
``PeftModel.forward(adapter_names=...)``, which checks every name; a decode step runs thousands of times
over rows already checked, so it sets the same routing itself on the adapter layers, which it finds once
per change of the resident adapters (walking the model's modules cost a tenth of a step), and calls the
base model directly. Methods whose adapter enters through the
inputs (prompt tuning, prefix tuning, P-tuning) are prefilled on their own, with the virtual tokens their
method puts in front (the same ``prepare_generation`` that ``PeftModel.generate`` uses); after that the
virtual tokens are in the row's cache and the row decodes as a base-model row of the shared batch.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator

import torch
from torch import nn

from peftkit.layer import BASE_ROW, Routing, routed
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

    def __init__(
        self, model: PeftModel, input_methods: dict[str, object], version: Callable[[], int] = lambda: 0
    ) -> None:
        self.model = model
        self.device = next(model.base_model.parameters()).device
        self.extra = _logits_kwargs(model.base_model)
        self.input_methods = input_methods  # adapter name -> its method, for adapters entering at the inputs
        self.version = version  # changes whenever adapters are loaded or unloaded (the registry's count)
        self._layers: tuple[int, list] | None = None  # (version, the model's adapter layers)
        self._routing: tuple[tuple[str, ...], Routing] | None = None  # the last batch's row names, routing

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
        logits = self.step_logits(rows, cache)
        return next_tokens(logits, [row.params for row in rows], [row.generator for row in rows])

    def step_logits(self, rows: list[Sequence], cache: BatchCache) -> torch.Tensor:
        """The next-token logits (rows, vocab) after each row's last token; every row's cache and
        ``length`` advance by one."""
        mask, positions = cache.step_inputs(self.device)
        ids = torch.tensor([[row.generated[-1]] for row in rows], dtype=torch.long, device=self.device)
        with self._routed(tuple(row.routing_name for row in rows)):
            output = self.model.base_model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache.cache,
                use_cache=True,
                **self.extra,
            )
        cache.advance()
        for row, length in zip(rows, cache.lengths, strict=True):
            row.length = length
        return output.logits[:, -1]

    @contextlib.contextmanager
    def _routed(self, names: tuple[str, ...]) -> Iterator[None]:
        """Row ``b`` through adapter ``names[b]`` (names a prefill already checked) for one forward pass:
        what ``PeftModel``'s mixed batch sets up, with the layer list and the routing kept between steps."""
        if self._layers is None or self._layers[0] != self.version():
            self._layers = (self.version(), [layer for _, layer in self.model.adapter_layers()])
        if self._routing is None or self._routing[0] != names:
            self._routing = (names, Routing.from_row_names(names, self.device))
        with routed(self._layers[1], self._routing[1]):
            yield
