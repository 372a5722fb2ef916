"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190): learned keys and values in front of every layer's
attention.

For layer ``l`` with learned ``P_K^l, P_V^l`` (heads, n, head_dim) and the layer's own keys and values of
the ``L`` real tokens, each head attends over ``n + L`` positions:

    softmax(q [P_K^l ; K]^T / sqrt(d)) [P_V^l ; V]

No weight changes and no input token is added: the prefixes reach the model as an already filled KV cache
(``past_key_values``), the attention mask grows by ``n`` ones in front and the real tokens sit at positions
``n .. n + L - 1`` (what the model derives from a cache of ``n``, and what generate() derives from the mask).
Stored per adapter: ``prefix`` (layers, 2, kv_heads, n, head_dim) [keys, values]; an encoder-decoder also
has ``cross_prefix`` for the decoder's cross-attention (over the ``n`` prefixes and the encoder output) and
``encoder_prefix`` for the encoder's self-attention.

Reparameterization (Li & Liang §4.3): training ``P`` directly is unstable, so with ``projection_size`` set
the prefix is an MLP of a smaller matrix, ``P = W_2 tanh(W_1 P' + b_1) + b_2`` with ``P'`` (n, hidden).
Only ``P`` is needed afterwards: the checkpoint holds the folded prefix, and a loaded adapter keeps the
prefix tensors alone (training it further trains them directly).

Where the prefix goes, by architecture (the routes of :mod:`.prefix_layout`):
- decoders (GPT-2, LLaMA, Falcon, ...) and BERT-style encoders: every self-attention layer, through the KV
  cache their forward reads (``heads``: the cache's key/value heads, one with multi-query attention);
- encoders whose forward takes no cache (DistilBERT, ALBERT, ModernBERT, DeBERTa-v2): every self-attention
  layer, through the attention function or hooks, for the one forward pass (:mod:`.prefix_attention`);
  their masks, positions and labels stay the user's, and the output has no virtual positions;
- encoder-decoders (T5, BART): the encoder's self-attention, the decoder's self-attention and the
  cross-attention. The encoder runs first, inside :func:`prepare_inputs`, with its prefixes handed to its
  attention (:mod:`.prefix_attention`), and its output is what the cross-attention prefix extends.
Gradient checkpointing in transformers drops ``past_key_values`` in training, which would silently drop the
prefix: with checkpointing on, training is refused with an error.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from peftkit.config import AdapterConfig, ConfigError, as_name_tuple, check_positive_int, register_config
from peftkit.layer import find_or_wrap
from peftkit.method_spec import NUM_VIRTUAL_TOKENS, declare_method
from peftkit.methods.prompts import hf_files
from peftkit.methods.prompts.prefix_attention import PrefixCall
from peftkit.methods.prompts.prefix_layout import PrefixLayout, prefix_layout
from peftkit.methods.prompts.virtual_tokens import (
    EncodersAtInputEmbedding,
    cached_length,
    extend_over_virtual_tokens,
    generation_from_cache,
    input_embedding_adapter,
    input_embedding_path,
    is_encoder_decoder,
    rows_per_input,
)
from peftkit.methods.registry import Method, no_base_parameters, register_method
from peftkit.task_type import task_type_value


@register_config
@dataclass(frozen=True)
class PrefixTuningConfig(AdapterConfig):
    """Fields:
    num_virtual_tokens: prefix length ``n`` (per layer).
    projection_size: hidden size of the reparameterization MLP (``None``: train the prefix directly).
    modules_to_save: modules trained in full next to the prefix (a fresh classification head).
    task_type: HF PEFT's task (``"SEQ_CLS"``, ``"CAUSAL_LM"``, ...): a classification task adds the model's
        head to ``modules_to_save``, as in HF PEFT; written to files (None: read from the model).
    """

    method: ClassVar[str] = "prefix_tuning"

    num_virtual_tokens: int = 20
    projection_size: int | None = None
    modules_to_save: tuple[str, ...] | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        self._set("task_type", task_type_value(self.task_type))
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        if self.projection_size is not None:
            check_positive_int("projection_size", self.projection_size)
        self._set(
            "modules_to_save", as_name_tuple("modules_to_save", self.modules_to_save, allow_string=False)
        )


class PrefixEncoder(nn.Module):
    """One adapter's prefixes: trained directly, or through the reparameterization MLP until folded."""

    def __init__(self, config: PrefixTuningConfig, shapes: dict[str, tuple[int, ...]], like: torch.Tensor):
        super().__init__()
        self.shapes = shapes
        n = config.num_virtual_tokens
        factory = {"dtype": like.dtype, "device": like.device}
        if config.projection_size is None:
            self.prefixes = nn.ParameterDict(
                {key: nn.Parameter(torch.randn(shape, **factory)) for key, shape in shapes.items()}
            )
            self.mlp = None
        else:
            out = sum(math.prod(shape) for shape in shapes.values()) // n
            hidden = like.shape[1]
            self.prefixes = nn.ParameterDict()
            self.prompt = nn.Parameter(torch.randn(n, hidden, **factory))  # P' (n, hidden)
            self.mlp = nn.Sequential(
                nn.Linear(hidden, config.projection_size), nn.Tanh(), nn.Linear(config.projection_size, out)
            ).to(**factory)

    def values(self) -> dict[str, torch.Tensor]:
        if self.mlp is None:
            return dict(self.prefixes.items())  # dict(ParameterDict) stops torch.compile (dynamo)
        flat = self.mlp(self.prompt)  # (n, sum of layers·2·heads·head_dim)
        result, start = {}, 0
        for key, shape in self.shapes.items():
            layers, two, heads, n, head_dim = shape
            width = layers * two * heads * head_dim
            part = flat[:, start : start + width].reshape(n, layers, two, heads, head_dim)
            result[key] = part.permute(1, 2, 3, 0, 4)  # (layers, 2, heads, n, head_dim)
            start += width
        return result

    def fold(self, tensors: dict[str, torch.Tensor]) -> None:
        """Keep only the final prefixes (given), dropping the MLP and ``P'``."""
        self.prefixes = nn.ParameterDict({k: nn.Parameter(t.detach().clone()) for k, t in tensors.items()})
        self.mlp = None
        self.prompt = None


PREFIX_KEY = "peftkit_prefix_adapter"  # forward keyword argument that opens a prefix call (see PrefixStore)


class PrefixStore(EncodersAtInputEmbedding):
    """Each adapter's prefixes, held at the model's input embedding; they enter through :func:`prepare_inputs`
    as a filled cache, or, on an encoder whose forward reads none, through a :class:`PrefixCall` that this
    store opens around the model's forward pass (a pre-hook takes the adapter name from the keyword arguments,
    a hook that runs even when the pass fails closes it)."""

    method = "prefix-tuning"

    def __init__(self, base_layer: nn.Module, model: nn.Module, layout: PrefixLayout) -> None:
        super().__init__(base_layer)
        self.layout = layout
        self._calls: list[PrefixCall | None] = []  # open calls, innermost last
        self._hooks = []
        if not layout.cross and layout.route != "cache":
            store = weakref.ref(self)
            self._hooks = [
                model.register_forward_pre_hook(lambda m, a, k: store()._open(m, a, k), with_kwargs=True),
                model.register_forward_hook(
                    lambda m, a, k, out: store()._close(out), with_kwargs=True, always_call=True
                ),
            ]

    def add_adapter(self, name: str, config: PrefixTuningConfig) -> None:
        n = config.num_virtual_tokens
        shapes = {"prefix": self.layout.shape(n)}
        if self.layout.cross:
            shapes["cross_prefix"] = self.layout.shape(n)
            shapes["encoder_prefix"] = self.layout.shape(n, encoder=True)
        self.encoders[name] = PrefixEncoder(config, shapes, self.base_layer.weight)

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The final prefixes (through the MLP when reparameterized): what inference needs, nothing more.
        Without cross-attention, as HF PEFT stores them: ``prompt_embeddings`` (n, layers·2·heads·head_dim)."""
        values = self.encoders[name].values()
        if self.layout.cross:
            return values
        prefix = values["prefix"]  # (layers, 2, heads, n, head_dim)
        return {"prompt_embeddings": prefix.permute(3, 0, 1, 2, 4).reshape(prefix.shape[3], -1)}

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        shapes = self.encoders[name].shapes
        if not self.layout.cross:
            layers, two, heads, n, head_dim = shapes["prefix"]
            flat = tensors["prompt_embeddings"].reshape(n, layers, two, heads, head_dim)
            tensors = {"prefix": flat.permute(1, 2, 3, 0, 4)}
        self.encoders[name].fold({key: tensors[key] for key in shapes})

    def unloaded(self, merge: bool) -> nn.Module:
        for hook in self._hooks:
            hook.remove()
        return self.base_layer

    def _open(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self._calls.append(None)  # first, so that the closing hook always has its entry
        name = kwargs.pop(PREFIX_KEY, None)
        if name is not None:
            prefix = self.encoders[name].values()["prefix"]
            self._calls[-1] = PrefixCall(model, model, self.layout.route, prefix)
            self._calls[-1].open()
        return args, kwargs

    def _close(self, output: Any) -> None:
        call = self._calls.pop() if self._calls else None
        if call is not None:
            call.close(completed=output is not None)


def _store(model: nn.Module) -> PrefixStore:
    return input_embedding_adapter(model, PrefixStore, "prefix-tuning")


def inject(model: nn.Module, name: str, config: PrefixTuningConfig) -> list[str]:
    layout = prefix_layout(model)  # refuses, before anything changes, a model prefixes cannot reach
    path = input_embedding_path(model)
    layer = find_or_wrap(model, path, PrefixStore, lambda base: PrefixStore(base, model, layout))
    layer.add_adapter(name, config)
    return [path]


def _fill(cache: Any, prefix: torch.Tensor, rows: int) -> None:
    """Append ``prefix`` (layers, 2, heads, n, head_dim) to ``cache``, the same for each of ``rows``."""
    for index in range(prefix.shape[0]):
        keys, values = prefix[index]  # (heads, n, head_dim) each
        cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), index)


def _cache(model: nn.Module, prefixes: dict[str, torch.Tensor], rows: int, into: Any = None) -> Any:
    if is_encoder_decoder(model):
        cache = into or EncoderDecoderCache(
            DynamicCache(config=model.config), DynamicCache(config=model.config)
        )
        _fill(cache.self_attention_cache, prefixes["prefix"], rows)
        _fill(cache.cross_attention_cache, prefixes["cross_prefix"], rows)
        return cache
    cache = into or DynamicCache(config=model.config)
    _fill(cache, prefixes["prefix"], rows)
    return cache


def _run_encoder(model: nn.Module, prefixes: dict[str, torch.Tensor], inputs: dict, attention_mask) -> Any:
    """An encoder-decoder's encoder, run with the prefix in every self-attention layer and the user's mask
    (the prefix is attended by every token; see :mod:`.prefix_attention`)."""
    encoder = model.get_encoder()
    call = PrefixCall(model, encoder, _store(model).layout.route, prefixes["encoder_prefix"])
    call.open()
    completed = False
    try:
        output = encoder(**inputs, attention_mask=attention_mask)
        completed = True
    finally:
        call.close(completed)
    return output


def prepare_inputs(model: nn.Module, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Forward keyword arguments with the prefixes in a cache and the mask / positions extended over them."""
    if model.training and getattr(model, "is_activation_checkpointing", False):
        raise ConfigError(
            "prefix tuning cannot train with gradient checkpointing: transformers drops `past_key_values` in "
            "checkpointed layers, which would drop the prefixes; call gradient_checkpointing_disable()"
        )
    store = _store(model)
    encoder = store.encoders[name]
    n = next(iter(encoder.shapes.values()))[3]
    kwargs = dict(kwargs)
    if not store.layout.cross and store.layout.route != "cache":
        kwargs[PREFIX_KEY] = name  # the store's pre-hook opens the call (inputs stay the user's)
        return kwargs
    if cached_length(kwargs) > 0:  # decoding with a cache that already holds the prefixes
        return extend_over_virtual_tokens(model, kwargs, n, starts=False)
    prefixes = encoder.values()
    if is_encoder_decoder(model) and kwargs.get("encoder_outputs") is None:
        # the encoder runs first, with its own prefixes and the user's mask (see the module doc)
        inputs = {k: kwargs.pop(k) for k in ("input_ids", "inputs_embeds") if kwargs.get(k) is not None}
        kwargs["encoder_outputs"] = _run_encoder(model, prefixes, inputs, kwargs.get("attention_mask"))
    rows = _rows(kwargs)
    kwargs = extend_over_virtual_tokens(model, kwargs, n, starts=False)
    if is_encoder_decoder(model) and kwargs.get("attention_mask") is None:
        encoded = kwargs["encoder_outputs"][0]
        kwargs["attention_mask"] = torch.ones(
            rows, n + encoded.shape[1], dtype=torch.long, device=encoded.device
        )
    kwargs["past_key_values"] = _cache(model, prefixes, rows, into=kwargs.get("past_key_values"))
    return kwargs


def _rows(kwargs: dict[str, Any]) -> int:
    for key in (
        "input_ids",
        "inputs_embeds",
        "decoder_input_ids",
        "decoder_inputs_embeds",
        "encoder_outputs",
    ):
        value = kwargs.get(key)
        if value is not None:
            return (value[0] if key == "encoder_outputs" else value).shape[0]
    raise ConfigError("prefix tuning needs `input_ids` or `inputs_embeds` as keyword arguments")


def prepare_generation(model: nn.Module, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``generate()`` keyword arguments: the prefixes in the cache it starts from."""
    encoder = _store(model).encoders[name]
    prefixes = encoder.values()
    n = prefixes["prefix"].shape[3]
    if not is_encoder_decoder(model):
        filler = prefixes["prefix"].new_zeros(n, model.get_input_embeddings().weight.shape[1])
        return generation_from_cache(model, kwargs, n, filler, lambda rows: _cache(model, prefixes, rows))
    kwargs = dict(kwargs)
    if kwargs.get("encoder_outputs") is None:
        inputs = {k: kwargs.pop(k) for k in ("input_ids", "inputs_embeds") if kwargs.get(k) is not None}
        if not inputs:
            raise ConfigError(
                "prefix tuning's generate() needs `input_ids=` (or `inputs_embeds=`) as a keyword argument"
            )
        kwargs["encoder_outputs"] = _run_encoder(model, prefixes, inputs, kwargs.get("attention_mask"))
    encoded = kwargs["encoder_outputs"][0]  # (B, L, d)
    batch, length = encoded.shape[:2]
    if kwargs.get("attention_mask") is None:
        kwargs["attention_mask"] = torch.ones(batch, length, dtype=torch.long, device=encoded.device)
    kwargs = extend_over_virtual_tokens(model, kwargs, n, starts=False)
    rows = batch * rows_per_input(model, kwargs)
    kwargs["past_key_values"] = _cache(model, prefixes, rows)
    return kwargs


register_method(
    Method(
        name="prefix_tuning",
        config_class=PrefixTuningConfig,
        inject=inject,
        trained_base_parameters=no_base_parameters,
        prepare_inputs=prepare_inputs,
        prepare_generation=prepare_generation,
        file_type="PREFIX_TUNING",
        other_file_types=("PEFTKIT_PREFIX_TUNING",),
        to_file=hf_files.prefix_to_file("PEFTKIT_PREFIX_TUNING"),
        from_file=hf_files.from_file("prefix_tuning", "PEFTKIT_PREFIX_TUNING"),
    )
)


declare_method(
    "prefix_tuning",
    "trained keys and values prepended at every attention layer (Li & Liang 2021)",
    learning_rate=1e-2,
    options=(NUM_VIRTUAL_TOKENS,),
    build=lambda o, heads: PrefixTuningConfig(
        num_virtual_tokens=o["num_virtual_tokens"], modules_to_save=heads or None
    ),
)
