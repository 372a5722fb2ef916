"""Choosing each row's next token (greedy, temperature, nucleus) and turning token ids into text with stops.

Sampling follows the OpenAI API's parameters: ``temperature`` 0 is greedy (argmax); otherwise the logits are
divided by the temperature and, with ``top_p`` < 1, cut to the smallest set of tokens whose probability
reaches ``top_p`` (nucleus sampling, Holtzman et al. 2019, arXiv:1904.09751). A request's ``seed`` seeds its
own generator, so its tokens do not depend on which other requests share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # go on past end-of-sequence tokens until max_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> torch.Generator | None:
        """The row's own random generator (None when greedy: nothing is drawn)."""
        if self.greedy:
            return None
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def next_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One token per row. ``logits`` (rows, vocab), any float dtype; greedy rows take the argmax, the others
    draw from their own generator (so a seeded request gives the same tokens in any batch)."""
    chosen = logits.argmax(dim=-1).tolist()
    for row, (param, generator) in enumerate(zip(params, generators, strict=True)):
        if not param.greedy:
            chosen[row] = _sample(logits[row].float(), param, generator)
    return chosen


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits / params.temperature, dim=-1)  # (vocab,)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # probability mass ranked above each token
        sorted_probs[before >= params.top_p] = 0.0  # keeps the first token whatever top_p is
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """A request's generated text, decoded incrementally, cut at the first stop string (not included).

    ``push(ids)`` gives the text that became final: whatever could still be the start of a stop string, or an
    incomplete UTF-8 character, is held back until the next token decides it. Only the newest tokens are
    decoded, in a window that starts one step back (as Hugging Face's ``TextStreamer`` and vLLM do: a
    tokenizer may render a window's first token differently, so the text a token adds is the window's text
    beyond what the window decoded without it); no clean-up of tokenization spaces, so the pieces joined
    equal the decoding of all ids at once."""

    def __init__(self, tokenizer, stop: tuple[str, ...], incremental: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        # nobody reads the pieces (a whole response) and no stop string to look for: decode once, at the end
        self.incremental = incremental or bool(self.stop)
        self.text = ""  # the text of ids[:read]
        self.sent = 0  # characters of it already given out
        self.stopped = False
        self._start = 0  # the decoding window: ids[start:read] gave the last piece
        self._read = 0

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, ids: list[int], final: bool = False) -> str:
        """The newly final text after ``ids`` (all generated ids so far); sets ``stopped`` at a stop string."""
        if not (self.incremental or final):
            return ""
        self._extend(ids, final)
        text = self.text
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped, final = text[:cut], True, True
        if not final:
            text = text[: len(text) - self._held_back(text)]
        if len(text) <= self.sent:
            return ""
        delta, self.sent = text[self.sent :], len(text)
        return delta

    def _extend(self, ids: list[int], final: bool) -> None:
        if len(ids) <= self._read:
            return
        before = self.decode(ids[self._start : self._read])
        after = self.decode(ids[self._start :])
        if after.endswith("\ufffd") and not final:  # a character split across tokens: wait for the rest
            return
        if after.startswith(before):
            self.text += after[len(before) :]
        else:  # a tokenizer whose decoding is not prefix-stable: decode everything (the text sent stays sent)
            self.text = self.decode(ids)
        self._start, self._read = self._read, len(ids)

    def _held_back(self, text: str) -> int:
        """How many trailing characters might still change: a stop string's start."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
