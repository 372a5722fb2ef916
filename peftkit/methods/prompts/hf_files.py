"""Prompt methods' ``adapter_config.json`` in Hugging Face PEFT's own format (``PROMPT_TUNING``, ``P_TUNING``,
``PREFIX_TUNING``), both directions, read against peft 0.21's ``PromptTuningConfig``, ``PromptEncoderConfig``
and ``PrefixTuningConfig`` and its ``get_prompt``.

What a file holds (keys translated by :mod:`peftkit.checkpoint` for these types):
- ``prompt_embeddings``: prompt tuning's prompt (n, d); P-tuning's encoder output (n, d), what HF PEFT reads
  in inference mode; prefix tuning's folded prefix (n, layers·2·kv_heads·head_dim), per token the layers'
  keys and values in HF PEFT's order (``view(n, layers·2, heads, head_dim)``).
- modules trained beside them (a classifier) as ``base_model.<path>``.
- HF PEFT's fields (``num_virtual_tokens``, ``token_dim``, ``num_layers``, ``num_attention_heads`` = the cache's
  heads, ``num_transformer_submodules`` = 1, ...) and, in the peftkit-only field ``peftkit`` (which HF PEFT
  ignores), peftkit's whole config, so a peftkit file reads back exactly (init text ids, P-tuning v2, ...).

Kept in peftkit's own format (``PEFTKIT_*``; HF PEFT has no equivalent, so it refuses the file): prompt
ensembles (k prompts), P-tuning through a template (HF PEFT always puts the tokens in front), and prefixes on
encoder-decoders (peftkit gives the encoder its own prefix and the cross-attention another; HF PEFT gives the
encoder none and reuses the self-attention prefix for cross-attention). Such HF PEFT files (``PROMPT_TUNING``
or ``PREFIX_TUNING`` with two transformer submodules) are refused when read, for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from peftkit.config import AdapterConfig, ConfigError
from peftkit.methods.prompts.prefix_layout import prefix_layout
from peftkit.methods.prompts.virtual_tokens import is_encoder_decoder

PEFTKIT_FIELD = "peftkit"  # peftkit's own config, in a field HF PEFT ignores


def _common(
    config: AdapterConfig, model: nn.Module, peft_type: str, n: int, token_dim: int
) -> dict[str, Any]:
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return {
        "peft_type": peft_type,
        "task_type": config.task_type,  # None: the PeftModel writes the model's
        "inference_mode": True,
        "num_virtual_tokens": n,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(text, "num_attention_heads", None),
        "num_layers": getattr(text, "num_hidden_layers", None),
        "modules_to_save": list(config.modules_to_save) if config.modules_to_save else None,
        PEFTKIT_FIELD: config.to_dict(),
    }


def prompt_tuning_to_file(config: Any, targets: list[str], model: nn.Module) -> dict[str, Any]:
    if config.num_prompts > 1:
        return {"peft_type": "PEFTKIT_PROMPT_TUNING", **config.to_dict()}
    d = model.get_input_embeddings().weight.shape[1]
    data = _common(config, model, "PROMPT_TUNING", config.num_virtual_tokens, d)
    data["prompt_tuning_init"] = {"vocab": "SAMPLE_VOCAB"}.get(
        config.init, "RANDOM"
    )  # TEXT needs a tokenizer
    data["prompt_tuning_init_text"] = config.init_text
    return data


def p_tuning_to_file(config: Any, targets: list[str], model: nn.Module) -> dict[str, Any]:
    if config.template is not None:
        return {"peft_type": "PEFTKIT_P_TUNING", **config.to_dict()}
    d = model.get_input_embeddings().weight.shape[1]
    data = _common(config, model, "P_TUNING", config.num_virtual_tokens, d)
    data["encoder_reparameterization_type"] = config.encoder.upper()
    data["encoder_hidden_size"] = config.encoder_hidden_size or d
    return data


def prefix_to_file(native_type: str) -> Callable[[Any, list[str], nn.Module], dict[str, Any]]:
    def to_file(config: Any, targets: list[str], model: nn.Module) -> dict[str, Any]:
        if is_encoder_decoder(model):
            return {"peft_type": native_type, **config.to_dict()}
        layout = prefix_layout(model).attention
        data = _common(
            config, model, "PREFIX_TUNING", config.num_virtual_tokens, layout.kv_heads * layout.head_dim
        )
        data["num_attention_heads"] = layout.kv_heads
        data["num_layers"] = layout.layers
        data["prefix_projection"] = False  # saved folded: the prefix itself
        data["encoder_hidden_size"] = config.projection_size or model.get_input_embeddings().weight.shape[1]
        return data

    return to_file


def from_file(method: str, native_type: str) -> Callable[[dict[str, Any]], AdapterConfig]:
    """Read a peftkit or HF PEFT file of ``method`` (its HF type, or ``native_type``)."""

    def read(data: dict[str, Any]) -> AdapterConfig:
        if data.get("peft_type") == native_type:  # peftkit's own format
            fields = {k: v for k, v in data.items() if k not in {"peft_type", "base_model_name_or_path"}}
            return AdapterConfig.from_dict({k: v for k, v in fields.items() if k != "task_type"})
        if isinstance(data.get(PEFTKIT_FIELD), dict):  # written by peftkit: its exact config
            return AdapterConfig.from_dict(data[PEFTKIT_FIELD])
        if (data.get("num_transformer_submodules") or 1) != 1:
            raise ConfigError(
                f"this {data['peft_type']} file gives prompts to {data['num_transformer_submodules']} stacks "
                "(HF PEFT's encoder-decoder layout: the decoder's prompt or prefix reused for cross-attention); "
                "peftkit's encoder-decoder prompts differ, so it is not converted. Train it with peftkit"
            )
        return FROM_HF[method](data)

    return read


def _prompt_tuning(data: dict[str, Any]) -> AdapterConfig:
    init = {"SAMPLE_VOCAB": "vocab"}.get(data.get("prompt_tuning_init"), "random")
    return _make("prompt_tuning", data, init=init)


def _p_tuning(data: dict[str, Any]) -> AdapterConfig:
    encoder = str(data.get("encoder_reparameterization_type") or "MLP").lower()
    return _make("p_tuning", data, encoder=encoder, encoder_hidden_size=data.get("encoder_hidden_size"))


def _prefix_tuning(data: dict[str, Any]) -> AdapterConfig:
    projection = data.get("encoder_hidden_size") if data.get("prefix_projection") else None
    return _make("prefix_tuning", data, projection_size=projection)


def _make(method: str, data: dict[str, Any], **fields: Any) -> AdapterConfig:
    saved = data.get("modules_to_save")
    # HF PEFT lists `classifier` and `score` for every classifier; keep those the model has (checked on apply)
    return AdapterConfig.from_dict(
        {
            "method": method,
            "num_virtual_tokens": data["num_virtual_tokens"],
            "modules_to_save": sorted(set(saved)) if saved else None,
            "task_type": data.get("task_type"),
            **fields,
        }
    )


FROM_HF = {"prompt_tuning": _prompt_tuning, "p_tuning": _p_tuning, "prefix_tuning": _prefix_tuning}
