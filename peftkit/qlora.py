"""QLoRA in one call: a 4-bit NF4 base with double quantization, prepared for training, with LoRA on it.

    model = get_qlora_model(base, LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    optimizer = torch.optim.AdamW(model.adapter_parameters("default"), lr=2e-4)   # or paged_adamw_8bit on CUDA
    ...
    model.save_pretrained("adapter/")      # an ordinary LoRA adapter (HF PEFT format)
    plain = model.merge_and_unload()       # full-precision model: de-quantized base + LoRA update

The steps are also available one by one: :func:`~peftkit.quantization.quantize_model`,
:func:`~peftkit.quantization.prepare_for_kbit_training`, :func:`~peftkit.get_peft_model`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from peftkit.config import ConfigError
from peftkit.method_spec import Option, declare_method
from peftkit.methods.lora import LoraConfig
from peftkit.methods.lora.method import LORA_OPTIONS, lora_config_from_options
from peftkit.model import PeftModel, get_peft_model
from peftkit.quantization import (
    COMPUTE_DTYPES,
    QuantizationConfig,
    import_bitsandbytes,
    is_quantized,
    prepare_for_kbit_training,
    quantize_model,
)


def get_qlora_model(
    model: nn.Module,
    lora_config: LoraConfig,
    quantization: QuantizationConfig | None = None,
    adapter_name: str = "default",
    gradient_checkpointing: bool = False,
) -> PeftModel:
    """Quantize ``model``'s linear layers to 4 bit (in place; default: NF4, double quantization, blocks of 64,
    every linear layer but the output head, fp32 compute), prepare it for k-bit training and add the LoRA
    adapter ``adapter_name`` (active, trainable).

    A model loaded already quantized (transformers' ``BitsAndBytesConfig(load_in_4bit=True, ...)``) is used
    as it is; passing ``quantization`` for such a model is an error, since it would not be applied.
    LoRA's adapters default to the 4-bit layers' compute dtype; ``lora_config.adapter_dtype`` overrides it.
    """
    if is_quantized(model):
        if quantization is not None:
            raise ConfigError(
                f"{type(model).__name__} is already 4-bit quantized (loaded with BitsAndBytesConfig?); "
                "`quantization` would not be applied: leave it out"
            )
    else:
        quantize_model(model, quantization or QuantizationConfig())
    prepare_for_kbit_training(model, gradient_checkpointing=gradient_checkpointing)
    return get_peft_model(model, lora_config, adapter_name)


def paged_adamw_8bit(params: Iterable[nn.Parameter], lr: float = 2e-4, **kwargs) -> torch.optim.Optimizer:
    """bitsandbytes' paged 8-bit AdamW (QLoRA's optimizer: 8-bit moments in unified memory that pages to the
    host under memory pressure). CUDA only: refused with a message elsewhere."""
    params = list(params)
    devices = {p.device.type for p in params}
    if not torch.cuda.is_available() or devices != {"cuda"}:
        raise RuntimeError(
            f"paged 8-bit AdamW needs CUDA and parameters on a CUDA device (found devices {sorted(devices)}, "
            f"CUDA available: {torch.cuda.is_available()}); use torch.optim.AdamW on this machine"
        )
    bnb = import_bitsandbytes()
    return bnb.optim.PagedAdamW8bit(params, lr=lr, **kwargs)


def _quantize_base(base: nn.Module, options, gradient_checkpointing: bool) -> None:
    """Linear layers to 4-bit NF4 with double quantization (the output head and embeddings stay in full
    precision), then norms in fp32 and input gradients on for checkpointing (Dettmers et al. 2023)."""
    if not is_quantized(base):  # a model saved already quantized is used as it is
        quantize_model(base, QuantizationConfig(compute_dtype=options["compute_dtype"]))
    prepare_for_kbit_training(base, gradient_checkpointing=gradient_checkpointing)


# `peftkit train --method qlora`: an ordinary LoRA adapter (its compute in `compute_dtype`) on a 4-bit base
declare_method(
    "qlora",
    "LoRA on a base whose linear layers are quantized to 4-bit NF4 (Dettmers et al. 2023)",
    learning_rate=2e-3,
    options=(
        *LORA_OPTIONS,
        Option(
            "compute_dtype",
            str,
            "float32",
            "dtype the 4-bit weights are de-quantized to for the matmul, and the adapter's",
            choices=COMPUTE_DTYPES,
        ),
    ),
    build=lambda o, heads: lora_config_from_options(o, heads, adapter_dtype=o["compute_dtype"]),
    prepare_base=_quantize_base,
)
