"""Applying a LoRA adapter to a model: choose the layers, wrap them, pick the biases that train."""

from __future__ import annotations

import importlib

from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.layer import AdapterLayer, base_parameter_names, find_or_wrap, innermost
from peftkit.method_spec import TARGET_MODULES, Option, declare_method
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.embedding import LoraEmbedding
from peftkit.methods.lora.linear import LoraLinear
from peftkit.methods.registry import Method, register_method
from peftkit.size_bounds import check_rank
from peftkit.targeting import select_modules

# Base layer type -> the LoRA wrapper for it. The most specific type wins (a quantized linear layer is also
# an nn.Linear).
WRAPPERS: dict[type[nn.Module], type[AdapterLayer]] = {
    nn.Linear: LoraLinear,
    Conv1D: LoraLinear,
    nn.Embedding: LoraEmbedding,
}
# Layer types of optional libraries -> the peftkit module that registers their wrapper. It is imported when
# such a layer is first met (a model holding the layer has imported its library already; others never pay).
LAZY_WRAPPERS: dict[str, str] = {
    "bitsandbytes.nn.modules.Linear4bit": "peftkit.methods.lora.quantized",
}


def _wrapper_for(module: nn.Module) -> type[AdapterLayer] | None:
    for cls in type(innermost(module)).__mro__:
        lazy = LAZY_WRAPPERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if cls not in WRAPPERS and lazy is not None:
            importlib.import_module(lazy)
        if cls in WRAPPERS:
            return WRAPPERS[cls]
    return None


def _supported(module: nn.Module) -> bool:
    return _wrapper_for(module) is not None


def inject_lora(model: nn.Module, name: str, config: LoraConfig) -> list[str]:
    """Wrap every targeted layer (once; a second adapter joins the existing wrapper) and add adapter ``name``."""
    targets = select_modules(
        model,
        target_modules=config.target_modules,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        modules_to_save=config.modules_to_save,
        supported=_supported,
        supported_text="nn.Linear, transformers Conv1D, nn.Embedding, bitsandbytes Linear4bit",
    )
    check_rank(model, targets, config.r)  # before any layer is wrapped or any tensor allocated
    for path in targets:
        wrapper = _wrapper_for(model.get_submodule(path))
        find_or_wrap(model, path, wrapper, wrapper).add_adapter(name, config)
    return targets


def trained_biases(model: nn.Module, targets: list[str], config: LoraConfig) -> list[str]:
    """Names of the base-model bias parameters that train with the adapter (`bias` = all | lora_only)."""
    if config.bias == "none":
        return []
    names = [n for n in base_parameter_names(model) if n == "bias" or n.endswith(".bias")]
    if config.bias == "lora_only":
        names = [n for n in names if n.rpartition(".")[0] in targets]  # names without adapter wrappers
    return names


register_method(
    Method(
        name="lora",
        config_class=LoraConfig,
        inject=inject_lora,
        trained_base_parameters=trained_biases,
        file_type="LORA",
        to_file=lambda config, targets, model: config.to_hf_dict(targets),
        from_file=LoraConfig.from_hf_dict,
    )
)


# How `peftkit train --method lora` builds its adapter (QLoRA shares these options: peftkit/qlora.py).
LORA_OPTIONS = (
    Option("r", int, 8, "rank of the low-rank update (B A has rank r)"),
    Option("alpha", float, 16, "scale numerator: the update is scaled by alpha / r"),
    Option("dropout", float, 0.1, "dropout probability on the adapter's input"),
    TARGET_MODULES,
)


def lora_config_from_options(options: dict, heads: list[str], **extra) -> LoraConfig:
    """The LoraConfig of `peftkit train`'s LORA_OPTIONS values, with the task ``heads`` trained in full
    (``extra``: further LoraConfig fields, e.g. QLoRA's ``adapter_dtype``)."""
    return LoraConfig(
        r=options["r"],
        alpha=options["alpha"],
        dropout=options["dropout"],
        target_modules=options["target_modules"],
        modules_to_save=heads or None,
        **extra,
    )


declare_method(
    "lora",
    "low-rank updates B A added to the targeted weights (Hu et al. 2021)",
    learning_rate=2e-3,
    options=LORA_OPTIONS,
    build=lora_config_from_options,
)
