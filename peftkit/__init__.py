"""peftkit: parameter-efficient fine-tuning of transformer models.

The public names below are imported on first use (PEP 562): ``import peftkit`` alone, as the ``peftkit``
command does before it knows which subcommand runs, costs no torch or transformers import.
"""

# ruff: noqa: F401  (the TYPE_CHECKING imports are the public names, for type checkers)
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "BASE_ROW": "peftkit.layer",
    "AdapterConfig": "peftkit.config",
    "AdapterError": "peftkit.model",
    "AutoPeftModel": "peftkit.auto",
    "AutoPeftModelForCausalLM": "peftkit.auto",
    "AutoPeftModelForFeatureExtraction": "peftkit.auto",
    "AutoPeftModelForQuestionAnswering": "peftkit.auto",
    "AutoPeftModelForSeq2SeqLM": "peftkit.auto",
    "AutoPeftModelForSequenceClassification": "peftkit.auto",
    "AutoPeftModelForTokenClassification": "peftkit.auto",
    "BitFitConfig": "peftkit.methods.bitfit",
    "BottleneckConfig": "peftkit.methods.bottleneck",
    "CheckpointError": "peftkit.checkpoint",
    "ConfigError": "peftkit.config",
    "FullFineTuningConfig": "peftkit.methods.full",
    "FusionConfig": "peftkit.methods.fusion",
    "IA3Config": "peftkit.methods.ia3",
    "LayerTuningConfig": "peftkit.methods.layer_tuning",
    "LoraConfig": "peftkit.methods.lora",
    "PTuningConfig": "peftkit.methods.prompts",
    "PTuningV2Config": "peftkit.methods.prompts",
    "ParameterCount": "peftkit.accounting",
    "PeftModel": "peftkit.model",
    "PrefixTuningConfig": "peftkit.methods.prompts",
    "PromptTuningConfig": "peftkit.methods.prompts",
    "QuantizationConfig": "peftkit.quantization",
    "TaskType": "peftkit.task_type",
    "dequantize_model": "peftkit.quantization",
    "get_peft_model": "peftkit.model",
    "get_qlora_model": "peftkit.qlora",
    "paged_adamw_8bit": "peftkit.qlora",
    "prepare_for_kbit_training": "peftkit.quantization",
    "prepare_model_for_kbit_training": "peftkit.quantization",
    "quantize_model": "peftkit.quantization",
    "storage_report": "peftkit.quantization",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the module defining public name ``name`` on first access; AttributeError for other names."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'peftkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # what type checkers and IDEs see
    from peftkit.accounting import ParameterCount
    from peftkit.auto import (
        AutoPeftModel,
        AutoPeftModelForCausalLM,
        AutoPeftModelForFeatureExtraction,
        AutoPeftModelForQuestionAnswering,
        AutoPeftModelForSeq2SeqLM,
        AutoPeftModelForSequenceClassification,
        AutoPeftModelForTokenClassification,
    )
    from peftkit.checkpoint import CheckpointError
    from peftkit.config import AdapterConfig, ConfigError
    from peftkit.layer import BASE_ROW
    from peftkit.methods.bitfit import BitFitConfig
    from peftkit.methods.bottleneck import BottleneckConfig
    from peftkit.methods.full import FullFineTuningConfig
    from peftkit.methods.fusion import FusionConfig
    from peftkit.methods.ia3 import IA3Config
    from peftkit.methods.layer_tuning import LayerTuningConfig
    from peftkit.methods.lora import LoraConfig
    from peftkit.methods.prompts import (
        PrefixTuningConfig,
        PromptTuningConfig,
        PTuningConfig,
        PTuningV2Config,
    )
    from peftkit.model import AdapterError, PeftModel, get_peft_model
    from peftkit.qlora import get_qlora_model, paged_adamw_8bit
    from peftkit.quantization import (
        QuantizationConfig,
        dequantize_model,
        prepare_for_kbit_training,
        prepare_model_for_kbit_training,
        quantize_model,
        storage_report,
    )
    from peftkit.task_type import TaskType
