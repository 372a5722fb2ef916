"""One request's generation as the scheduler sees it: its tokens, its limits, and where its output goes."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from peftkit.serve.sampling import SamplingParams, TextStream

_ids = itertools.count()


@dataclass
class Event:
    """What a request learns after a step: new final text, and once it ends, why (OpenAI's finish_reason:
    ``"stop"`` at an end-of-sequence token or a stop string, ``"length"`` at ``max_tokens`` or the context's
    end) or the error that ended it."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Exception | None = None


@dataclass(eq=False)  # identity: two requests are never the same row
class Sequence:
    adapter: str  # the name the client asked for (an adapter, or the base model's name)
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    stream: TextStream
    emit: Callable[[Event], None]  # called from the scheduler's thread; must be thread-safe
    stop_ids: frozenset[int] = frozenset()
    context: int = 1 << 30  # positions the model has
    id: int = field(default_factory=lambda: next(_ids))
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    generator: torch.Generator | None = None
    routing_name: str = (
        ""  # the row's name in a mixed batch (the base row's for prompt methods after prefill)
    )
    length: int = 0  # tokens in its KV cache
    holds_adapter: bool = False  # counted as a user of its adapter (which then is not evicted)
    final_only: bool = False  # a whole response: one event when it ends, not one per token
    held: str = ""  # final text not yet emitted (final_only)

    def cancel(self) -> None:
        """Called from any thread (a client that went away): the scheduler drops the row at its next step."""
        self.cancelled = True

    def add_token(self, token: int) -> bool:
        """Record ``token``, tell the client what became final; True when the sequence has ended."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.generated.append(token)
        reason = None
        if token in self.stop_ids:
            reason = "stop"
        elif len(self.generated) >= self.max_tokens or self.length >= self.context:
            reason = "length"
        ids = self.generated[:-1] if token in self.stop_ids else self.generated
        text = self.stream.push(ids, final=reason is not None)
        if self.stream.stopped:
            reason = "stop"
        if self.final_only and reason is None:  # nothing to hand over before the end: no thread hand-off
            self.held += text
            return False
        text, self.held = self.held + text, ""
        self.emit(
            Event(
                text=text,
                finish_reason=reason,
                prompt_tokens=len(self.prompt_ids),
                completion_tokens=len(self.generated),
            )
        )
        return reason is not None

    def fail(self, error: Exception) -> None:
        self.emit(Event(finish_reason="error", error=error))
