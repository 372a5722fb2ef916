"""Modules trained in full next to an adapter (``modules_to_save``), e.g. a freshly initialised task head.

Each adapter gets its own copy of the module, so switching adapters switches heads too, and the original
stays untouched for the base model and for ``unload()``. Checkpoint keys drop the wrapper, as in HF PEFT:
``classifier.modules_to_save.<adapter>.weight`` is saved as ``classifier.weight``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from peftkit.layer import AdapterLayer


class ModulesToSave(AdapterLayer):
    """A module trained in full: one trained copy per adapter (``modules_to_save[name]``) beside the original."""

    adapter_holders = ("modules_to_save",)
    base_layer_name = "original_module"

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()

    def checkpoint_key(self, attribute: str, entry: nn.Module) -> str:
        return ""  # the copy's own keys: weight, bias

    def add_adapter(self, name: str) -> None:
        trained = copy.deepcopy(self.original_module)
        trained.requires_grad_(True)
        self.modules_to_save[name] = trained

    def unloaded(self, merge: bool) -> nn.Module:
        """Merging a fully trained copy means keeping it in place of the original."""
        if merge and self.active_adapter in self.modules_to_save:
            return self.modules_to_save[self.active_adapter]
        return self.original_module

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.routing is not None:
            return self._mixed_forward(x, *args, **kwargs)
        name = self.active_adapter
        module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module  # noqa: SIM401 (ModuleDict has no get)
        return module(x, *args, **kwargs)

    def _mixed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each adapter's copy runs on its own rows (a full module cannot be gathered like LoRA's matrices)."""
        routing = self.routing
        routing.check_batch(x.shape[0], f"modules_to_save {type(self.original_module).__name__}")
        result = self.original_module(x, *args, **kwargs)
        for position, name in enumerate(routing.names):
            if name not in self.modules_to_save:
                continue
            rows = routing.index == position
            result[rows] = self.modules_to_save[name](x[rows], *args, **kwargs)
        return result
