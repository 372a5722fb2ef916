"""How many tokens an example keeps (``max_length``): chosen from the training data unless given, and said.

The rule, when ``max_length`` is not set: the 99th percentile of the training examples' token lengths (as the
task lays them out: special tokens, the prompt and the response of a causal LM, the longer of source and
target for seq2seq), rounded up to a multiple of 8, and at most :data:`CEILING` and the model's positions
(less the virtual tokens a prompt method puts before the text). The percentile keeps nearly every example
whole without letting a few very long ones set the padding of every batch; on Rotten Tomatoes with MiniLM it
gives 56 (1% of the snippets lose their last few tokens). When the setting cuts examples (given or chosen),
the run says which share of the training examples it cuts, so that nothing is silently dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PERCENTILE = 99  # of the training examples' token lengths
MULTIPLE = 8  # the chosen length is rounded up to a multiple of this (tensor shapes CPU kernels like)
CEILING = 512  # tokens: past this, attention's cost grows faster than most tasks gain
SAMPLE = 10_000  # training examples measured at most (the split is already shuffled)
CHUNK = 256  # examples tokenized at once
UNCUT = 1 << 20  # the truncation bound while measuring: no example is this long


@dataclass(frozen=True)
class LengthChoice:
    """The ``max_length`` a run uses, and what it does to the training examples."""

    max_length: int
    chosen: bool  # picked from the data (False: given by the user)
    cut_share: float  # share of the measured training examples longer than max_length
    percentile_length: int  # the PERCENTILE-th percentile of their lengths, in tokens
    longest: int
    measured: int  # how many examples were measured
    cap: int  # the most it could have been (CEILING or the model's positions)

    def message(self) -> str | None:
        """The line the run prints: always for a chosen length, for a given one only when it cuts."""
        cut = f"{self.cut_share:.1%} of the training examples are cut to it (the longest has {self.longest})"
        if self.chosen:
            return (
                f"max length {self.max_length} tokens: the {PERCENTILE}th percentile of {self.measured:,} "
                f"training examples' lengths ({self.percentile_length}), rounded up to a multiple of "
                f"{MULTIPLE}, at most {self.cap}; {cut}"
            )
        if self.cut_share > 0:
            return (
                f"warning: --max-length {self.max_length} cuts {self.cut_share:.1%} of the training examples "
                f"(their {PERCENTILE}th percentile is {self.percentile_length} tokens, the longest "
                f"{self.longest}); leave it unset to choose it from the data"
            )
        return None


def token_lengths(task: Any, records: Sequence[dict], tokenizer: Any) -> list[int]:
    """Each record's length in tokens as ``task.collate`` lays it out, uncut (seq2seq: the longer of source
    and target, which ``max_length`` cuts separately)."""
    lengths: list[int] = []
    for start in range(0, len(records), CHUNK):
        batch = task.collate(records[start : start + CHUNK], tokenizer, UNCUT)
        tokens = batch["attention_mask"].sum(dim=1)
        labels = batch.get("labels")
        if labels is not None and labels.dim() == 2 and labels.shape != batch["input_ids"].shape:
            tokens = tokens.maximum((labels != -100).sum(dim=1))  # seq2seq: the target's tokens
        lengths += tokens.tolist()
    return lengths


def model_positions(model_config: Any) -> int | None:
    """The most positions the model embeds (None: no fixed limit, e.g. T5's relative positions)."""
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def choose_max_length(
    given: int | None,
    lengths: Sequence[int],
    positions: int | None = None,
    reserved: int = 0,
) -> LengthChoice:
    """``given`` (the user's), or the rule of this module applied to ``lengths`` (tokens per training example,
    non-empty); ``positions``: the model's (None: no limit), ``reserved`` of them taken by virtual tokens."""
    ordered = sorted(lengths)
    rank = max(0, math.ceil(PERCENTILE / 100 * len(ordered)) - 1)  # nearest-rank percentile
    percentile = ordered[rank]
    cap = CEILING if positions is None else max(1, min(CEILING, positions - reserved))
    max_length = min(cap, MULTIPLE * math.ceil(percentile / MULTIPLE)) if given is None else given
    cut = sum(n > max_length for n in ordered) / len(ordered)
    return LengthChoice(max_length, given is None, cut, percentile, ordered[-1], len(ordered), cap)


def settle_max_length(
    config: Any, task: Any, records: Sequence[dict], tokenizer: Any, model_config: Any, recorded: bool = False
) -> str:
    """Set ``config.max_length`` (a :class:`~peftkit.training.config.TrainConfig`) from the first
    :data:`SAMPLE` of the training ``records`` when it is None, leave a given one; the line to print about
    it (for a given one that cuts nothing: its value only; for one ``recorded`` by the resumed run, which
    the user did not choose now: its value and where it came from, without a warning)."""
    if recorded and config.max_length is not None:
        return f"max length {config.max_length} tokens (recorded by the resumed run)"
    measured = token_lengths(task, records[:SAMPLE], tokenizer)
    reserved = config.options.get("num_virtual_tokens") or 0  # positions a prompt method puts first
    choice = choose_max_length(config.max_length, measured, model_positions(model_config), reserved)
    config.max_length = choice.max_length
    return choice.message() or f"max length {choice.max_length} tokens (given): no training example is cut"
