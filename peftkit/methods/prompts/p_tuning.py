"""P-tuning (Liu et al. 2021, arXiv:2103.10385): virtual tokens produced by a prompt encoder, placed anywhere
in the input through a template.

The ``n`` virtual tokens are not free vectors as in prompt tuning: a small encoder makes them from ``n``
trained input embeddings ``E`` (n, d), so that they depend on each other:

    lstm:  h = W_2 relu(W_1 BiLSTM(E) + b_1) + b_2       (a 2-layer bidirectional LSTM, then an MLP)
    mlp:   h = MLP(E), three layers with ReLU            (each token on its own: cheaper, not coupled)

``h`` (n, d) enters the frozen model's input layer. Where it goes is set by a template, e.g.
``"[P] [P] {sentence} [P] It was [MASK]."``: :meth:`PTuningConfig.encode` tokenizes the text around the
``[P]`` slots and puts the reserved ``placeholder_token_id`` in each slot. The slots are real positions of
the input, so nothing is extended: :func:`prepare_inputs` embeds ``input_ids`` and writes ``h_1 .. h_n`` into
each row's slots, in order (masks, positions and padding, left or right, stay the user's). Labels at the
slots become -100 for per-token labels of a decoder or token classifier. Without a template the ``n`` tokens
go in front of the input, exactly as prompt tuning puts its prompt (masks, positions, labels extended; see
:mod:`.virtual_tokens`), which is what ``peftkit train --method p_tuning`` uses.

After training only ``h`` is needed: the checkpoint holds ``prompt_embeddings`` (n, d), the encoder's output,
and a loaded adapter keeps that tensor alone (the encoder is gone; further training trains ``h`` directly).

``generate()``: with slots, a decoder's first step reads the filled ``inputs_embeds`` (generate() keeps
``input_ids`` for its output) and decodes with the KV cache from there; an encoder-decoder gets the filled
embeddings as its encoder input. Without a template, as prompt tuning (the prompt runs into the cache once).
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.config import (
    AdapterConfig,
    ConfigError,
    as_name_tuple,
    check_choice,
    check_positive_int,
    register_config,
)
from peftkit.layer import find_or_wrap
from peftkit.method_spec import NUM_VIRTUAL_TOKENS, declare_method
from peftkit.methods.prompts import hf_files
from peftkit.methods.prompts.prompt_tuning import prepend_prompts, prompt_generation
from peftkit.methods.prompts.virtual_tokens import (
    IGNORE_INDEX,
    EncodersAtInputEmbedding,
    cached_length,
    input_embedding_adapter,
    input_embedding_path,
    is_encoder_decoder,
)
from peftkit.methods.registry import Method, no_base_parameters, register_method
from peftkit.prompt_tokens import special_tokens
from peftkit.task_type import task_type_value

SLOT = "[P]"


class LSTMHead(nn.Module):
    """BiLSTM then a 2-layer MLP (the paper's encoder): every output token sees all the others."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:  # (n, d) -> (n, d)
        return self.mlp(self.lstm(embeddings[None])[0][0])


class MLPHead(nn.Sequential):
    """Three linear layers with ReLU, token by token."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)
        )


ENCODERS: dict[str, type[nn.Module]] = {"lstm": LSTMHead, "mlp": MLPHead}


@register_config
@dataclass(frozen=True)
class PTuningConfig(AdapterConfig):
    """Fields:
    num_virtual_tokens: ``n``, the number of ``[P]`` slots.
    encoder: the prompt encoder, ``lstm`` (BiLSTM + MLP) or ``mlp``.
    encoder_hidden_size: the encoder's hidden width (None: the model's hidden size).
    template: where the virtual tokens go, e.g. ``"[P] [P] {sentence} [P] It was [MASK]."`` with exactly
        ``n`` ``[P]`` slots and ``{fields}`` filled from each record (None: the tokens go in front).
    placeholder_token_id: the id :meth:`encode` puts in each slot (template only); pick one the tokenizer
        never produces from your text, e.g. BERT's ``[unused0]`` (padding may use it: padding is masked).
    modules_to_save: modules trained in full next to the prompt (a fresh classification head).
    task_type: HF PEFT's task (``"SEQ_CLS"``, ``"CAUSAL_LM"``, ...): a classification task adds the model's
        head to ``modules_to_save``, as in HF PEFT; written to files (None: read from the model).
    """

    method: ClassVar[str] = "p_tuning"

    num_virtual_tokens: int = 20
    encoder: str = "lstm"
    encoder_hidden_size: int | None = None
    template: str | None = None
    placeholder_token_id: int | None = None
    modules_to_save: tuple[str, ...] | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self._set("task_type", task_type_value(self.task_type))
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        check_choice("encoder", self.encoder, tuple(ENCODERS))
        if self.encoder_hidden_size is not None:
            check_positive_int("encoder_hidden_size", self.encoder_hidden_size)
        self._set(
            "modules_to_save", as_name_tuple("modules_to_save", self.modules_to_save, allow_string=False)
        )
        if (self.template is None) != (self.placeholder_token_id is None):
            raise ConfigError(
                f"`template` and `placeholder_token_id` go together; got template={self.template!r} and "
                f"placeholder_token_id={self.placeholder_token_id!r}"
            )
        if self.template is None:
            return
        placeholder = self.placeholder_token_id
        if not isinstance(placeholder, int) or isinstance(placeholder, bool) or placeholder < 0:
            raise ConfigError(f"`placeholder_token_id` must be a token id (int >= 0), got {placeholder!r}")
        slots = self.template.count(SLOT)
        if slots != self.num_virtual_tokens:
            raise ConfigError(
                f"`template` {self.template!r} has {slots} {SLOT} slots; `num_virtual_tokens` is "
                f"{self.num_virtual_tokens}: they must be equal"
            )
        try:
            for piece in self.template.split(SLOT):
                list(string.Formatter().parse(piece))
        except ValueError as error:
            raise ConfigError(f"`template` {self.template!r} is not a valid format string: {error}") from None

    def fields(self) -> list[str]:
        """The ``{field}`` names of the template, in order."""
        pieces = (self.template or "").split(SLOT)
        return [f for piece in pieces for _, f, _, _ in string.Formatter().parse(piece) if f]

    def encode(
        self, tokenizer: Any, records: Sequence[Mapping[str, Any]], padding_side: str | None = None
    ) -> dict[str, torch.Tensor]:
        """``input_ids`` (B, L) and ``attention_mask`` for ``records`` (one dict of fields each) put through the
        template: the text between slots tokenized piece by piece (a field never straddles a slot), the
        tokenizer's special tokens around the whole, ``placeholder_token_id`` in each slot, rows padded
        to the longest (``padding_side``: the tokenizer's by default)."""
        if self.template is None:
            raise ConfigError("`encode` needs a config with a `template`")
        side = padding_side or getattr(tokenizer, "padding_side", "right")
        check_choice("padding_side", side, ("left", "right"))
        before, after = special_tokens(tokenizer)
        rows = []
        for index, record in enumerate(records):
            ids: list[int] = []
            for position, piece in enumerate(self.template.split(SLOT)):
                if position:
                    ids.append(self.placeholder_token_id)
                try:
                    text = piece.format(**record)
                except KeyError as error:
                    raise ConfigError(f"record {index} has no field {error} the template needs") from None
                if text.strip():
                    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
                    if self.placeholder_token_id in tokens:
                        raise ConfigError(
                            f"record {index}: the text {text!r} tokenizes to the placeholder id "
                            f"{self.placeholder_token_id}; choose an id the tokenizer never produces"
                        )
                    ids += tokens
            rows.append(before + ids + after)
        pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            start = width - len(row) if side == "left" else 0
            input_ids[index, start : start + len(row)] = torch.tensor(row)
            mask[index, start : start + len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}


class PromptEncoder(nn.Module):
    """One adapter's virtual tokens: ``head(E)`` while the encoder exists, the stored output after
    :meth:`fold`."""

    def __init__(self, config: PTuningConfig, table: torch.Tensor) -> None:
        super().__init__()
        self.config = config
        n, dim = config.num_virtual_tokens, table.shape[1]
        factory = {"dtype": table.dtype, "device": table.device}
        ids = torch.randint(0, table.shape[0], (n,), device=table.device)
        self.embeddings = nn.Parameter(table.detach()[ids].clone())  # E (n, d): vocabulary embeddings
        self.head = ENCODERS[config.encoder](dim, config.encoder_hidden_size or dim).to(**factory)
        self.register_parameter("prompt", None)  # the output alone, once folded

    def forward(self) -> torch.Tensor:  # (n, d)
        return self.prompt if self.head is None else self.head(self.embeddings)

    def fold(self, prompt: torch.Tensor) -> None:
        """Keep only the encoder's output (given), dropping the encoder and its input embeddings."""
        self.prompt = nn.Parameter(prompt.detach().clone())
        self.head = None
        self.embeddings = None


class PTuningEmbedding(EncodersAtInputEmbedding):
    """Each adapter's prompt encoder, at the model's input embedding; the virtual tokens enter through
    :func:`prepare_inputs`."""

    method = "p-tuning"

    def add_adapter(self, name: str, config: PTuningConfig) -> None:
        self.encoders[name] = PromptEncoder(config, self.base_layer.weight)

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The encoder's output, what inference needs, nothing more."""
        with torch.no_grad():
            return {"prompt_embeddings": self.encoders[name]()}

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        self.encoders[name].fold(tensors["prompt_embeddings"])


def _encoder(model: nn.Module, name: str) -> PromptEncoder:
    return input_embedding_adapter(model, PTuningEmbedding, "p-tuning").encoders[name]


def _inject(model: nn.Module, name: str, config: PTuningConfig) -> list[str]:
    path = input_embedding_path(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    if config.placeholder_token_id is not None and config.placeholder_token_id >= vocab:
        raise ConfigError(
            f"`placeholder_token_id` {config.placeholder_token_id} is outside the vocabulary (size {vocab})"
        )
    layer = find_or_wrap(model, path, PTuningEmbedding, PTuningEmbedding)
    layer.add_adapter(name, config)
    return [path]


def fill_slots(
    embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    placeholder: int,
    prompt: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``embeds`` (B, L, d) with ``prompt`` (n, d) written into each row's ``n`` slots (attended positions
    holding ``placeholder``), in order; and the slot mask (B, L)."""
    slots = input_ids == placeholder
    if attention_mask is not None:
        slots &= attention_mask.bool()
    counts = slots.sum(dim=1)
    wrong = (counts != prompt.shape[0]).nonzero().flatten().tolist()
    if wrong:
        raise ConfigError(
            f"p-tuning: every row needs exactly {prompt.shape[0]} slots (placeholder id {placeholder}); rows "
            f"{wrong[:5]} have {counts[wrong[:5]].tolist()} (build inputs with PTuningConfig.encode)"
        )
    batch = input_ids.shape[0]
    source = prompt.to(embeds.dtype).expand(batch, -1, -1)  # (B, n, d), consumed row by row, slot by slot
    return embeds.masked_scatter(slots[..., None], source), slots


def _fill(model: nn.Module, encoder: PromptEncoder, kwargs: dict[str, Any], keep_ids: bool) -> dict[str, Any]:
    ids = kwargs.get("input_ids")
    if ids is None:
        raise ConfigError(
            "p-tuning with a template needs `input_ids` as a keyword argument: the slots are marked by "
            f"placeholder id {encoder.config.placeholder_token_id}"
        )
    kwargs = dict(kwargs)
    if not keep_ids:
        del kwargs["input_ids"]
    embeds = model.get_input_embeddings()(ids)  # (B, L, d)
    kwargs["inputs_embeds"], slots = fill_slots(
        embeds, ids, kwargs.get("attention_mask"), encoder.config.placeholder_token_id, encoder()
    )
    labels = kwargs.get("labels")
    if labels is not None and labels.shape[:2] == ids.shape and not is_encoder_decoder(model):
        kwargs["labels"] = labels.masked_fill(
            slots.view(*slots.shape, *[1] * (labels.dim() - 2)), IGNORE_INDEX
        )
    return kwargs


def prepare_inputs(model: nn.Module, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Forward keyword arguments with the virtual tokens in the slots, or in front without a template."""
    encoder = _encoder(model, name)
    if encoder.config.template is None:
        return prepend_prompts(model, encoder()[None], kwargs)
    if cached_length(kwargs) > 0 or kwargs.get("encoder_outputs") is not None:
        return kwargs  # the slots were read in an earlier call
    return _fill(model, encoder, kwargs, keep_ids=False)


def prepare_generation(model: nn.Module, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``generate()`` keyword arguments (see the module doc)."""
    encoder = _encoder(model, name)
    if encoder.config.template is None:
        return prompt_generation(model, encoder(), kwargs)
    if cached_length(kwargs) > 0 or kwargs.get("encoder_outputs") is not None:
        return kwargs
    return _fill(model, encoder, kwargs, keep_ids=not is_encoder_decoder(model))


register_method(
    Method(
        name="p_tuning",
        config_class=PTuningConfig,
        inject=_inject,
        trained_base_parameters=no_base_parameters,
        prepare_inputs=prepare_inputs,
        prepare_generation=prepare_generation,
        file_type="P_TUNING",
        other_file_types=("PEFTKIT_P_TUNING",),
        to_file=hf_files.p_tuning_to_file,
        from_file=hf_files.from_file("p_tuning", "PEFTKIT_P_TUNING"),
    )
)


declare_method(
    "p_tuning",
    # without a template: the encoder's tokens go in front of the input, as prompt tuning's
    "virtual tokens made by a trained prompt encoder (Liu et al. 2021)",
    learning_rate=1e-2,
    options=(NUM_VIRTUAL_TOKENS,),
    build=lambda o, heads: PTuningConfig(
        num_virtual_tokens=o["num_virtual_tokens"], modules_to_save=heads or None
    ),
)
