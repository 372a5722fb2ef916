"""LoRA: low-rank updates of linear, Conv1D and embedding layers."""

from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.embedding import LoraEmbedding
from peftkit.methods.lora.linear import LoraLinear
from peftkit.methods.lora.method import inject_lora

__all__ = ["LoraConfig", "LoraEmbedding", "LoraLinear", "inject_lora"]
