"""A model's config (a bundled name or a folder with ``config.json``) and the model built on the meta device.

Building on the meta device allocates no weights and runs no initialisation, so a 70B config builds in
seconds; every parameter still has its real shape and dtype, and peftkit's methods apply to it as to a real
model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.config import ConfigError

# task name -> transformers auto class, the same classes peftkit's tasks load (peftkit/tasks/)
AUTO_CLASSES = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_config(model: str) -> Any:
    """The transformers config of a bundled model (``minilm``, ``smollm2``) or of a local folder; only its
    ``config.json`` is read (a bundled GGUF model's config is read from the GGUF header when the converted
    folder is not cached yet: no conversion, no weights)."""
    from transformers import AutoConfig

    from peftkit.assets import MODELS, default_cache_dir, package_dir

    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{path} has no config.json: `--model` takes a folder with one, or {list(MODELS)}"
            )
        return AutoConfig.from_pretrained(path)
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}: not a bundled model ({list(MODELS)}) and no such folder")
    bundled = MODELS[model]
    root = package_dir(bundled.module, bundled.pip_spec)
    if bundled.subdir is not None:
        return AutoConfig.from_pretrained(root / bundled.subdir)
    cached = default_cache_dir() / "models" / bundled.cache_name
    if (cached / "config.json").is_file():
        return AutoConfig.from_pretrained(cached)
    return AutoConfig.from_pretrained(root, gguf_file=bundled.gguf_file)


def infer_task(config: Any) -> str:
    """The task a config's architecture is made for: decoders -> causal-lm, encoder-decoders -> seq2seq,
    token classifiers -> token-classification, other encoders -> sequence-classification."""
    architectures = " ".join(getattr(config, "architectures", None) or [])
    if getattr(config, "is_encoder_decoder", False) or "ConditionalGeneration" in architectures:
        return "seq2seq"
    if "TokenClassification" in architectures:
        return "token-classification"
    if "CausalLM" in architectures or "LMHead" in architectures or _is_decoder_type(config):
        return "causal-lm"
    return "sequence-classification"


def _is_decoder_type(config: Any) -> bool:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", "")
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


# the config fields that count a model's layers (encoder, decoder, or both)
DEPTH_FIELDS = (
    "num_hidden_layers",
    "num_layers",
    "num_decoder_layers",
    "n_layer",
    "n_layers",
    "encoder_layers",
    "decoder_layers",
)


def num_layers(config: Any) -> int | None:
    """The model's number of layers (the deeper stack of an encoder-decoder); None when the config says none."""
    depths = [getattr(config, name) for name in DEPTH_FIELDS if isinstance(getattr(config, name, None), int)]
    return max(depths) if depths else None


def with_depth(config: Any, depth: int) -> Any:
    """A copy of ``config`` with ``depth`` layers in every stack (per-layer lists cut to match)."""
    data = config.to_dict()
    for name in DEPTH_FIELDS:
        if isinstance(data.get(name), int):
            data[name] = depth
    for name, value in data.items():
        if name.endswith("layer_types") and isinstance(value, list):
            data[name] = value[:depth]
    return config.__class__.from_dict(data)


def layer_stacks(model: nn.Module, config: Any) -> list[nn.ModuleList]:
    """The model's stacks of transformer layers: every ``nn.ModuleList`` as long as a depth field of
    ``config`` says (an encoder-decoder has two)."""
    depths = {getattr(config, name) for name in DEPTH_FIELDS if isinstance(getattr(config, name, None), int)}
    return [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) in depths and len(m) > 1]


def build_meta_model(config: Any, task: str, dtype: str, num_labels: int) -> nn.Module:
    """The task's model for ``config`` on the meta device, its weights in ``dtype`` (``fp32``, ``bf16``,
    ``fp16``), in training mode. Raises ConfigError for a task the architecture has no class for."""
    import transformers

    if task not in AUTO_CLASSES:
        raise ConfigError(f"`task` must be one of {sorted(AUTO_CLASSES)}, got {task!r}")
    if dtype not in DTYPES:
        raise ConfigError(f"`dtype` must be one of {sorted(DTYPES)}, got {dtype!r}")
    auto = getattr(transformers, AUTO_CLASSES[task])
    config = config.__class__.from_dict(config.to_dict())  # a copy: the label count is per plan
    if task in ("sequence-classification", "token-classification"):
        config.num_labels = num_labels
        if getattr(config, "pad_token_id", None) is None:  # decoders classify the last non-pad token
            config.pad_token_id = 0
    try:
        with torch.device("meta"):
            model = auto.from_config(config, dtype=DTYPES[dtype])
    except ValueError as error:
        raise ConfigError(f"{type(config).__name__} has no model for task {task!r}: {error}") from error
    return model.train()


def output_head(model: nn.Module, task: str) -> nn.Module | None:
    """The module whose call ends the model's body: the LM head, or the classifier."""
    from peftkit.tasks.classification import HEAD_NAMES

    if task in ("causal-lm", "seq2seq"):
        return model.get_output_embeddings()
    for name in HEAD_NAMES:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def head_modules(model: nn.Module, task: str) -> list[str]:
    """Freshly initialised modules that train next to any adapter (the classifier), as peftkit's tasks say."""
    from peftkit.tasks import TASKS

    return TASKS[task].head_modules(model)


def meta_inputs(model: nn.Module, task: str, batch: int, length: int) -> dict[str, torch.Tensor]:
    """A training batch of ``batch`` full rows of ``length`` tokens on the meta device, as peftkit's tasks
    collate them (ids, all-ones mask, labels)."""
    ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "sequence-classification":
        inputs["labels"] = torch.zeros(batch, dtype=torch.long, device="meta")
    else:
        inputs["labels"] = torch.zeros_like(ids)
    return inputs
