"""peftkit: parameter-efficient fine-tuning of transformer models."""

from peftkit.accounting import ParameterCount
from peftkit.checkpoint import CheckpointError
from peftkit.config import AdapterConfig, ConfigError
from peftkit.layer import BASE_ROW
from peftkit.methods.lora import LoraConfig
from peftkit.model import AdapterError, PeftModel, get_peft_model

__version__ = "0.1.0"

__all__ = [
    "BASE_ROW",
    "AdapterConfig",
    "AdapterError",
    "CheckpointError",
    "ConfigError",
    "LoraConfig",
    "ParameterCount",
    "PeftModel",
    "get_peft_model",
]
