"""From a training config to the adapter config of the chosen method."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from peftkit.config import AdapterConfig, ConfigError
from peftkit.methods.bitfit import BitFitConfig
from peftkit.methods.bottleneck import BottleneckConfig
from peftkit.methods.full import FullFineTuningConfig
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.layer_tuning import LayerTuningConfig
from peftkit.methods.lora import LoraConfig
from peftkit.methods.prompts import PrefixTuningConfig, PromptTuningConfig, PTuningConfig, PTuningV2Config
from peftkit.training.config import TrainConfig

# name -> (training config, modules a task head adds) -> adapter config
METHOD_BUILDERS: dict[str, Callable[[TrainConfig, list[str]], AdapterConfig]] = {
    "lora": lambda c, heads: LoraConfig(
        r=c.r,
        alpha=c.alpha,
        dropout=c.dropout,
        target_modules=c.target_modules,
        modules_to_save=heads or None,
    ),
    "ia3": lambda c, heads: IA3Config(target_modules=c.target_modules, modules_to_save=heads or None),
    "bitfit": lambda c, heads: BitFitConfig(modules_to_save=heads or None),
    "layer_tuning": lambda c, heads: LayerTuningConfig(top_k=c.top_k, modules_to_save=heads or None),
    "bottleneck": lambda c, heads: BottleneckConfig(
        placement=c.placement, bottleneck_size=c.bottleneck_size, modules_to_save=heads or None
    ),
    "full": lambda c, heads: FullFineTuningConfig(),
    "prompt_tuning": lambda c, heads: PromptTuningConfig(
        num_virtual_tokens=c.num_virtual_tokens, init="vocab", modules_to_save=heads or None
    ),
    "prefix_tuning": lambda c, heads: PrefixTuningConfig(
        num_virtual_tokens=c.num_virtual_tokens, modules_to_save=heads or None
    ),
    # P-tuning without a template: the encoder's tokens go in front of the input, as prompt tuning's
    "p_tuning": lambda c, heads: PTuningConfig(
        num_virtual_tokens=c.num_virtual_tokens, modules_to_save=heads or None
    ),
    "p_tuning_v2": lambda c, heads: PTuningV2Config(
        num_virtual_tokens=c.num_virtual_tokens, modules_to_save=heads or None
    ),
    # QLoRA: an ordinary LoRA adapter (its compute in `compute_dtype`) on a base quantized by prepare_base()
    "qlora": lambda c, heads: LoraConfig(
        r=c.r,
        alpha=c.alpha,
        dropout=c.dropout,
        target_modules=c.target_modules,
        modules_to_save=heads or None,
        adapter_dtype=c.compute_dtype,
    ),
}


def _quantize_base(config: TrainConfig, base: nn.Module) -> None:
    """QLoRA (Dettmers et al. 2023): linear layers to 4-bit NF4 with double quantization (the output head and
    embeddings stay in full precision), then norms in fp32 and input gradients on for checkpointing."""
    from peftkit.quantization import (
        QuantizationConfig,
        is_quantized,
        prepare_for_kbit_training,
        quantize_model,
    )

    if not is_quantized(base):  # a model saved already quantized is used as it is
        quantize_model(base, QuantizationConfig(compute_dtype=config.compute_dtype))
    prepare_for_kbit_training(base, gradient_checkpointing=config.gradient_checkpointing)


# name -> what the base model needs before the adapter is added
BASE_PREPARATIONS: dict[str, Callable[[TrainConfig, nn.Module], None]] = {"qlora": _quantize_base}


def prepare_base(config: TrainConfig, base: nn.Module) -> None:
    if config.method in BASE_PREPARATIONS:
        BASE_PREPARATIONS[config.method](config, base)


def adapter_config_for(config: TrainConfig, heads: list[str]) -> AdapterConfig:
    if config.method not in METHOD_BUILDERS:
        raise ConfigError(f"`method` must be one of {sorted(METHOD_BUILDERS)}, got {config.method!r}")
    return METHOD_BUILDERS[config.method](config, heads)
