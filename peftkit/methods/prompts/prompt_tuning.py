"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691) and prompt ensembling.

The frozen model reads ``n`` learned vectors before the embedded input, at the input layer only:

    X = [E(x_1) .. E(x_L)]  (L, d)        ->        [P_1 .. P_n ; E(x_1) .. E(x_L)]  (n + L, d)

``P`` (n, d) is the only trained tensor: n·d parameters whatever the model's size. It starts from random
values (uniform in [-0.5, 0.5], as in the paper), from the embeddings of ``n`` tokens sampled from the
vocabulary, or from the embeddings of a text (e.g. "Classify the sentiment:"), cycled to fill ``n``.

Prompt ensembling (Lester et al. §7): ``k`` prompts ``P^(1) .. P^(k)`` for one task, stored as one (k, n, d)
tensor. Each example runs once with each prompt in one forward pass over a ``k``-times batch; the loss is
the mean of the k prompts' losses, so each prompt trains on its own loss. In eval mode the model's ``logits``
are the ensemble's, the mean over the prompts ``(1/k) Σ_i f(P^(i); x)``; the ``loss`` stays the mean of the
k single-prompt losses, other outputs keep all ``k·B`` rows.

How it runs: the layer wraps the model's input embedding and holds the prompts; the method's
``prepare_inputs`` hook embeds ``input_ids``, puts the prompts in front and passes ``inputs_embeds`` with the
masks / positions / labels extended (see :mod:`.virtual_tokens`). Output logits of a decoder or a token
classifier therefore carry the ``n`` virtual positions first (``logits[:, n:]`` are the real tokens').
``generate()`` on a decoder runs the prompts once into the KV cache (the virtual tokens come first and
attend only to each other, so their keys and values do not depend on the input) and decodes from there;
on an encoder-decoder the prompts extend the encoder input.
"""

from __future__ import annotations

import weakref
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
from peftkit.layer import AdapterLayer, find_or_wrap
from peftkit.method_spec import NUM_VIRTUAL_TOKENS, declare_method
from peftkit.methods.prompts import hf_files
from peftkit.methods.prompts.virtual_tokens import (
    cached_length,
    extend_over_virtual_tokens,
    generation_from_cache,
    input_embedding_adapter,
    input_embedding_path,
    is_encoder_decoder,
    refuse_mixed_batch,
)
from peftkit.methods.registry import Method, no_base_parameters, register_method
from peftkit.task_type import task_type_value

INIT_MODES = ("random", "vocab", "text")


@register_config
@dataclass(frozen=True)
class PromptTuningConfig(AdapterConfig):
    """Fields:
    num_virtual_tokens: prompt length ``n``.
    init: ``random`` (uniform in [-0.5, 0.5]), ``vocab`` (embeddings of tokens sampled from the vocabulary)
        or ``text`` (embeddings of ``init_token_ids``, cycled to fill ``n``; see :meth:`from_text`).
    init_token_ids: the token ids of the init text (``init="text"`` only).
    init_text: the text itself, kept for the record (the ids are what counts).
    num_prompts: ``k`` prompts trained jointly as an ensemble (1: plain prompt tuning).
    modules_to_save: modules trained in full next to the prompt (a fresh classification head).
    task_type: HF PEFT's task (``"SEQ_CLS"``, ``"CAUSAL_LM"``, ...): a classification task adds the model's
        head to ``modules_to_save``, as in HF PEFT; written to files (None: read from the model).
    """

    method: ClassVar[str] = "prompt_tuning"

    num_virtual_tokens: int = 20
    init: str = "random"
    init_token_ids: tuple[int, ...] | None = None
    init_text: str | None = None
    num_prompts: int = 1
    modules_to_save: tuple[str, ...] | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self._set("task_type", task_type_value(self.task_type))
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        check_positive_int("num_prompts", self.num_prompts)
        check_choice("init", self.init, INIT_MODES)
        self._set(
            "modules_to_save", as_name_tuple("modules_to_save", self.modules_to_save, allow_string=False)
        )
        ids = self.init_token_ids
        if ids is not None:
            if not isinstance(ids, (list, tuple)) or not ids or not all(_is_token_id(i) for i in ids):
                raise ConfigError(
                    f"`init_token_ids` must be a non-empty list of token ids (ints >= 0), got {ids!r}"
                )
            self._set("init_token_ids", tuple(ids))
        if (self.init == "text") != (ids is not None):
            raise ConfigError(
                f"`init_token_ids` goes with init='text' and only with it; got init={self.init!r} and "
                f"init_token_ids={ids!r} (PromptTuningConfig.from_text(tokenizer, text) fills both)"
            )
        if self.init == "text" and self.num_prompts > 1:
            raise ConfigError(
                f"init='text' with `num_prompts`={self.num_prompts}: every prompt of the ensemble would start "
                "equal and, with equal gradients, stay equal; use init='vocab' or 'random' for an ensemble"
            )

    @classmethod
    def from_text(cls, tokenizer: Any, text: str, **fields: Any) -> PromptTuningConfig:
        """A config whose prompt starts as the embeddings of ``text`` (tokenized without special tokens)."""
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return cls(init="text", init_text=text, init_token_ids=tuple(ids), **fields)


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class PromptEmbedding(AdapterLayer):
    """Wraps the model's input embedding (whose output it leaves unchanged) and holds each adapter's prompts
    ``prompt_embeddings`` (k, n, d). The prompts enter through :func:`prepare_inputs`, which reads them here.

    In eval mode a forward hook on the model replaces the logits of an ensemble's ``k·B`` rows by their mean
    over the prompts; :func:`prepare_inputs` arms it for exactly one forward pass.
    """

    adapter_holders = ("prompt_embeddings",)
    stack_order = 3  # leaves the embedding's output alone: around a LoRA adapter on the embedding

    def __init__(self, base_layer: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.prompt_embeddings = nn.ParameterDict()
        self.ensemble_pending: int | None = None  # k, armed by prepare_inputs for the next model forward
        layer = weakref.ref(self)
        self._hook = model.register_forward_hook(lambda m, a, out: _average_ensemble(layer(), m, out))

    def add_adapter(self, name: str, config: PromptTuningConfig) -> None:
        weight = self.base_layer.weight  # (vocab, d)
        k, n = config.num_prompts, config.num_virtual_tokens
        if config.init == "random":
            prompts = torch.empty(k, n, weight.shape[1], dtype=weight.dtype, device=weight.device)
            prompts.uniform_(-0.5, 0.5)
        else:
            if config.init == "vocab":
                ids = torch.randint(0, weight.shape[0], (k, n))
            else:
                ids = torch.tensor(config.init_token_ids).repeat(
                    (n + len(config.init_token_ids) - 1) // len(config.init_token_ids)
                )[:n]
                ids = ids[None]
            prompts = weight.detach()[ids.to(weight.device)].clone()  # (k, n, d)
        self.prompt_embeddings[name] = nn.Parameter(prompts)

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """``prompt_embeddings``: (n, d) as HF PEFT stores a prompt; an ensemble's (k, n, d)."""
        prompts = self.prompt_embeddings[name]
        return {"prompt_embeddings": prompts[0] if prompts.shape[0] == 1 else prompts}

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        prompts = self.prompt_embeddings[name]
        with torch.no_grad():
            prompts.copy_(tensors["prompt_embeddings"].reshape(prompts.shape))

    def unloaded(self, merge: bool) -> nn.Module:
        self._hook.remove()
        return self.base_layer

    def forward(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        refuse_mixed_batch(self, self.prompt_embeddings, "prompt-tuning")
        return self.base_layer(input_ids, *args, **kwargs)


def _average_ensemble(layer: PromptEmbedding | None, model: nn.Module, output: Any) -> Any:
    """Forward hook: in eval mode, an armed ensemble's logits (k·B, ...) become their mean over the k prompts."""
    if layer is None or layer.ensemble_pending is None:
        return None
    k, layer.ensemble_pending = layer.ensemble_pending, None
    logits = getattr(output, "logits", None)
    if model.training or logits is None:
        return None
    output.logits = logits.reshape(k, logits.shape[0] // k, *logits.shape[1:]).mean(dim=0)
    return output


def _layer(model: nn.Module) -> PromptEmbedding:
    return input_embedding_adapter(model, PromptEmbedding, "prompt-tuning")


def _inject(model: nn.Module, name: str, config: PromptTuningConfig) -> list[str]:
    path = input_embedding_path(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    too_big = [i for i in config.init_token_ids or () if i >= vocab]
    if too_big:
        raise ConfigError(f"`init_token_ids` {too_big[:5]} are outside the vocabulary (size {vocab})")
    layer = find_or_wrap(model, path, PromptEmbedding, lambda base: PromptEmbedding(base, model))
    layer.add_adapter(name, config)
    return [path]


def prepare_inputs(model: nn.Module, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Forward keyword arguments with the prompts in front of the embedded input (see the module doc)."""
    layer = _layer(model)
    prompts = layer.prompt_embeddings[name]  # (k, n, d)
    kwargs = prepend_prompts(model, prompts, kwargs)
    layer.ensemble_pending = prompts.shape[0] if prompts.shape[0] > 1 else None
    return kwargs


def prepend_prompts(model: nn.Module, prompts: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with ``prompts`` (k, n, d) in front of the embedded input, each example repeated once per
    prompt (prompt-major), and masks / positions / labels extended over the ``n`` virtual tokens."""
    k, n, d = prompts.shape
    starts = cached_length(kwargs) == 0 and kwargs.get("encoder_outputs") is None
    kwargs = dict(kwargs)
    if not starts:
        return extend_over_virtual_tokens(model, kwargs, n, starts=False, copies=k)
    ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
    if embeds is None:
        if ids is None:
            raise ConfigError("prompt methods need `input_ids` or `inputs_embeds` as keyword arguments")
        embeds = model.get_input_embeddings()(ids)  # (B, L, d)
    batch, length = embeds.shape[:2]
    kwargs = extend_over_virtual_tokens(model, kwargs, n, starts=True, copies=k, length=length)
    full = torch.cat(
        [
            prompts[:, None].expand(k, batch, n, d).to(embeds.dtype),
            embeds[None].expand(k, batch, length, d),
        ],
        dim=2,
    )  # (k, B, n + L, d)
    kwargs["inputs_embeds"] = full.reshape(k * batch, n + length, d)
    return kwargs


def prepare_generation(model: nn.Module, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``generate()`` keyword arguments (see :func:`prompt_generation`); an ensemble is refused."""
    prompts = _layer(model).prompt_embeddings[name]  # (k, n, d)
    if prompts.shape[0] > 1:
        raise ConfigError(
            f"adapter {name!r} is an ensemble of {prompts.shape[0]} prompts; its average is defined for "
            "forward() (scoring, classification), not for generate(); generate with a single-prompt adapter"
        )
    return prompt_generation(model, prompts[0], kwargs)


def prompt_generation(model: nn.Module, prompt: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``generate()`` keyword arguments for ``prompt`` (n, d) in front of the input: an encoder-decoder gets
    it in its encoder input; a decoder gets it as a KV cache computed once, with the mask extended over it."""
    if is_encoder_decoder(model):
        return prepend_prompts(model, prompt[None], kwargs)
    return generation_from_cache(
        model, kwargs, prompt.shape[0], prompt, lambda rows: _prompt_cache(model, prompt, rows)
    )


def _prompt_cache(model: nn.Module, prompt: torch.Tensor, rows: int):
    """The KV cache after the ``n`` virtual tokens at positions 0 .. n-1, one identical row per sequence."""
    n = prompt.shape[0]
    backbone = model.base_model  # transformers: the model without its head
    positions = torch.arange(n, device=prompt.device)[None]
    cache = backbone(inputs_embeds=prompt[None], position_ids=positions, use_cache=True).past_key_values
    cache.batch_repeat_interleave(rows)
    return cache


register_method(
    Method(
        name="prompt_tuning",
        config_class=PromptTuningConfig,
        inject=_inject,
        trained_base_parameters=no_base_parameters,
        prepare_inputs=prepare_inputs,
        prepare_generation=prepare_generation,
        file_type="PROMPT_TUNING",
        other_file_types=("PEFTKIT_PROMPT_TUNING",),
        to_file=hf_files.prompt_tuning_to_file,
        from_file=hf_files.from_file("prompt_tuning", "PEFTKIT_PROMPT_TUNING"),
    )
)


declare_method(
    "prompt_tuning",
    "trained virtual tokens in front of the input, initialised from the vocabulary (Lester et al. 2021)",
    # virtual tokens start far from a useful prompt and move slowly at adapter learning rates
    learning_rate=3e-2,
    options=(NUM_VIRTUAL_TOKENS,),
    build=lambda o, heads: PromptTuningConfig(
        num_virtual_tokens=o["num_virtual_tokens"], init="vocab", modules_to_save=heads or None
    ),
)
