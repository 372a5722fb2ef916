"""peftkit: parameter-efficient fine-tuning of transformer models."""

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
from peftkit.methods.prompts import PrefixTuningConfig, PromptTuningConfig, PTuningConfig, PTuningV2Config
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

__version__ = "0.1.0"

__all__ = [
    "BASE_ROW",
    "AdapterConfig",
    "AdapterError",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "BitFitConfig",
    "BottleneckConfig",
    "CheckpointError",
    "ConfigError",
    "FullFineTuningConfig",
    "FusionConfig",
    "IA3Config",
    "LayerTuningConfig",
    "LoraConfig",
    "PTuningConfig",
    "PTuningV2Config",
    "ParameterCount",
    "PeftModel",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "QuantizationConfig",
    "TaskType",
    "dequantize_model",
    "get_peft_model",
    "get_qlora_model",
    "paged_adamw_8bit",
    "prepare_for_kbit_training",
    "prepare_model_for_kbit_training",
    "quantize_model",
    "storage_report",
]
