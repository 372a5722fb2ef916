"""Hugging Face PEFT's ``PeftModel`` attributes and methods, with their meaning there, on peftkit's PeftModel.

Scripts written for Hugging Face PEFT read these (``model.device``, ``model.get_nb_trainable_parameters()``,
``model.gradient_checkpointing_enable()``, ...), and so do transformers' utilities. Each is a plain reading
of ``self.base_model`` (the task model, what HF PEFT's ``get_base_model()`` returns) or of the adapter
layers: no attribute delegation (``__getattr__``), so a typo is still an ``AttributeError``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.accounting import logical_numel
from peftkit.layer import AdapterError


class HfPeftSurface:
    """Mixed into :class:`~peftkit.PeftModel` (one level, no state of its own)."""

    base_model: nn.Module

    @property
    def device(self) -> torch.device:
        """The device of the base model's first parameter (transformers' ``model.device``)."""
        return next(self.base_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The base model's floating-point dtype (transformers' ``model.dtype``; 4-bit codes do not count)."""
        dtype = getattr(self.base_model, "dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
        return next((p.dtype for p in self.base_model.parameters() if p.is_floating_point()), torch.float32)

    @property
    def generation_config(self) -> Any:
        """The base model's ``GenerationConfig`` (None for a model that does not generate)."""
        return getattr(self.base_model, "generation_config", None)

    @generation_config.setter
    def generation_config(self, value: Any) -> None:
        self.base_model.generation_config = value

    def get_base_model(self) -> nn.Module:
        """The wrapped task model (with the adapter layers in it), as HF PEFT's ``get_base_model()``."""
        return self.base_model

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.base_model.get_output_embeddings()

    def enable_input_require_grads(self) -> None:
        """Make the input embeddings' output require grad, so that gradients reach adapters inside
        checkpointed blocks whose own parameters are all frozen."""
        self.base_model.enable_input_require_grads()

    def disable_input_require_grads(self) -> None:
        self.base_model.disable_input_require_grads()

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **options: Any
    ) -> None:
        """The base model's activation checkpointing (transformers' ``Trainer`` calls this with
        ``gradient_checkpointing=True``); the base is frozen, so its input embeddings' output is also made to
        require grad, or reentrant checkpointing would cut the adapters off from the gradient."""
        enable = getattr(self.base_model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise AttributeError(
                f"{type(self.base_model).__name__} has no gradient_checkpointing_enable() (not a transformers model)"
            )
        enable(
            gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **options
        )  # Trainer: every_n_layers
        if hasattr(self.base_model, "enable_input_require_grads"):
            self.base_model.enable_input_require_grads()

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, **options: Any
    ) -> None:
        """transformers 5's name for :meth:`gradient_checkpointing_enable` (what ``Trainer`` calls first;
        ``options``: ``every_n_layers``, ``offload``), with the same input-gradient fix."""
        enable = getattr(self.base_model, "activation_checkpointing_enable", None)
        if enable is None:
            return self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **options)
        enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs, **options)
        self.base_model.enable_input_require_grads()
        return None

    def gradient_checkpointing_disable(self) -> None:
        self.base_model.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.base_model, "is_gradient_checkpointing", False))

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts of the whole adapted model, as HF PEFT counts them: tied
        tensors once, adapters included, a 4-bit weight by the values it stands for."""
        unique = {id(p): p for p in self.parameters()}.values()
        trainable = sum(logical_numel(p) for p in unique if p.requires_grad)
        return trainable, sum(logical_numel(p) for p in unique)

    def set_scale(self, adapter: str, scale: float) -> None:
        """Scale adapter ``adapter``'s update by ``scale`` times its configured scaling (``alpha / r``), in
        every layer that has it (HF PEFT's ``LoraLayer.set_scale``); ``1.0`` restores the configured one.
        Raises :class:`AdapterError` for an adapter this model lacks, whose method has no scale, or merged."""
        self._check_exists(adapter)
        layers = [layer for _, layer in self.adapter_layers() if adapter in layer.adapter_names()]
        scalable = [layer for layer in layers if hasattr(layer, "set_scale")]
        if not scalable:
            raise AdapterError(
                f"adapter {adapter!r} ({self.peft_config[adapter].method}) has no scale to set"
            )
        if any(adapter in layer.merged_adapters for layer in scalable):
            raise AdapterError("set_scale needs the adapter unmerged; call unmerge_adapter() first")
        for layer in scalable:
            layer.set_scale(adapter, scale)
