"""How many tokens an example keeps (``max_length``): chosen from the training data unless given, and said.

The rule, when ``max_length`` is not set: the 99th percentile of the training examples' token lengths (as the
task lays them out: special tokens, the prompt and the response of a causal LM, the longer of source and
target for seq2seq), rounded up to a multiple of 8, and at most :data:`CEILING` and the model's positions
(less the virtual tokens a prompt method puts before the text). The percentile keeps nearly every example
whole without letting a few very long ones set the padding of every batch; on Rotten Tomatoes with MiniLM it
gives 56 (1% of the snippets lose their last few tokens). When the setting cuts examples (given or chosen),
the run says which share of the training examples it cuts, so that nothing is silently dropped.

A causal LM is scored on the response only, after the prompt: a length that ends within an example's prompt
leaves it nothing to learn from. When that is so for more than :data:`MOST_LOST` of the training examples
(most steps would learn nothing) the run is refused before its first step (a
:class:`~peftkit.config.ConfigError` naming the smallest length that keeps them all); for fewer it warns (such rows add nothing to the loss; a micro-batch of only such rows has loss 0, see
:mod:`peftkit.training.efficiency`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from peftkit.config import ConfigError

PERCENTILE = 99  # of the training examples' token lengths
MULTIPLE = 8  # the chosen length is rounded up to a multiple of this (tensor shapes CPU kernels like)
CEILING = 512  # tokens: past this, attention's cost grows faster than most tasks gain
SAMPLE = 10_000  # training examples measured at most (the split is already shuffled)
CHUNK = 256  # examples tokenized at once
UNCUT = 1 << 20  # the truncation bound while measuring: no example is this long
IGNORE = -100  # a label the loss does not score
MOST_LOST = 0.5  # share of the training examples left no response token past which a run is refused


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


def response_needs(task: Any, records: Sequence[dict], tokenizer: Any) -> list[int]:
    """For a task whose labels are laid out along the inputs (causal LM: -100 on the prompt), the smallest
    ``max_length`` (tokens) that leaves each record at least one scored token; [] for other tasks (seq2seq
    cuts its target separately, classification has one label per example). The loss scores position t+1
    from t, so a first scored label at index i needs i + 1 tokens."""
    needs: list[int] = []
    for start in range(0, len(records), CHUNK):
        batch = task.collate(records[start : start + CHUNK], tokenizer, UNCUT)
        labels = batch.get("labels")
        if labels is None or labels.shape != batch["input_ids"].shape:
            return []
        scored = labels[:, 1:] != IGNORE  # (rows, seq - 1): the labels the shifted loss reads
        first = scored.int().argmax(dim=1)  # the first scored label's index, less one
        needs += [
            int(i) + 2 if row_scored else 0 for i, row_scored in zip(first, scored.any(dim=1), strict=True)
        ]
    return needs


def check_responses(max_length: int, needs: Sequence[int]) -> str | None:
    """The warning for examples that ``max_length`` leaves without a scored token (None: there are none);
    raises :class:`~peftkit.config.ConfigError` when that is more than :data:`MOST_LOST` of them (most
    steps would train on nothing). ``needs``: :func:`response_needs` of the measured training examples."""
    lost = [n for n in needs if n > max_length]
    if not lost:
        return None
    keep_all = max(needs)
    said = (
        f"--max-length {max_length} leaves no response token to train on for {{share}} of the training "
        f"examples (their prompt and special tokens alone take {max_length} or more tokens); "
        f"--max-length {keep_all} or more keeps a response token of every one"
    )
    share = f"all {len(needs):,}" if len(lost) == len(needs) else f"{len(lost) / len(needs):.1%}"
    if len(lost) > MOST_LOST * len(needs):
        raise ConfigError(said.format(share=share))
    return "warning: " + said.format(share=share) + "; those examples add no loss"


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
    the user did not choose now: its value and where it came from, without a warning), and a warning line
    when it leaves some examples no response token. Raises :class:`~peftkit.config.ConfigError` when it
    leaves none of them one."""
    measured = token_lengths(task, records[:SAMPLE], tokenizer)
    reserved = config.options.get("num_virtual_tokens") or 0  # positions a prompt method puts first
    choice = choose_max_length(config.max_length, measured, model_positions(model_config), reserved)
    lost = check_responses(choice.max_length, response_needs(task, records[:SAMPLE], tokenizer))
    config.max_length = choice.max_length
    said = choice.message() or f"max length {choice.max_length} tokens (given): no training example is cut"
    if recorded:
        said = f"max length {choice.max_length} tokens (recorded by the resumed run)"
    return said if lost is None else f"{said}\n{lost}"
