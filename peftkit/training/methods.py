"""From a training config to the chosen method's adapter config, through the method's declaration."""

from __future__ import annotations

from torch import nn

from peftkit.config import AdapterConfig
from peftkit.method_spec import method_spec
from peftkit.training.config import TrainConfig


def prepare_base(config: TrainConfig, base: nn.Module) -> None:
    """What the base model needs before the method's adapter is added (QLoRA quantizes it), in place."""
    spec = method_spec(config.method)
    if spec.prepare_base is not None:
        spec.prepare_base(base, config.options, config.gradient_checkpointing)


def adapter_config_for(config: TrainConfig, heads: list[str]) -> AdapterConfig:
    """The adapter config of ``config.method`` from its options; ``heads`` (a fresh task head's modules)
    train in full beside it. Raises ConfigError for an unknown method or invalid options."""
    return method_spec(config.method).build(config.options, heads)
