"""Base-model biases that an adapter trains (LoRA's ``bias="all"`` / ``"lora_only"``), kept per adapter.

Those biases are parameters of the base model itself, so in HF PEFT training them changes the base model for
every adapter and a disabled adapter no longer reproduces it. peftkit keeps one set of values per adapter
and the base model's original values in a bank, and copies the right set into the live parameters whenever
the active adapter changes. The parameters keep their identity (an optimizer holding them keeps working);
``disable_adapter()``, ``unload()`` and the other adapters see the untouched base biases.
"""

from __future__ import annotations

import torch
from torch import nn


class BiasBank:
    def __init__(self) -> None:
        self.base: dict[str, torch.Tensor] = {}  # parameter name -> original value
        self.adapters: dict[str, dict[str, torch.Tensor]] = {}  # adapter -> parameter name -> its value
        self.live: str | None = None  # adapter whose values are in the parameters now (None: base values)

    def names(self, adapter: str) -> list[str]:
        return list(self.adapters.get(adapter, {}))

    def add(self, model: nn.Module, adapter: str, names: list[str]) -> None:
        if not names:
            return
        parameters = dict(model.named_parameters())
        self._store_live(parameters)
        for name in names:
            self.base.setdefault(name, parameters[name].detach().clone())
        self.adapters[adapter] = {name: self.base[name].clone() for name in names}
        self._activate(parameters, None)

    def delete(self, model: nn.Module, adapter: str) -> None:
        if adapter not in self.adapters:
            return
        parameters = dict(model.named_parameters())
        self._store_live(parameters)
        del self.adapters[adapter]
        self._activate(parameters, None)

    def activate(self, model: nn.Module, adapter: str | None) -> None:
        """Put ``adapter``'s biases (or the base ones, for ``None`` or an adapter that trains none) in place."""
        if not self.base:
            return
        parameters = dict(model.named_parameters())
        self._store_live(parameters)
        self._activate(parameters, adapter if adapter in self.adapters else None)

    def state_dict(self, model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
        parameters = dict(model.named_parameters())
        if adapter == self.live:
            return {name: parameters[name] for name in self.adapters[adapter]}
        return dict(self.adapters.get(adapter, {}))

    def load(self, model: nn.Module, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                self.adapters[adapter][name].copy_(value)
                if self.live == adapter:
                    parameters[name].copy_(value)

    def restore_base(self, model: nn.Module) -> None:
        """Leave the base values in the parameters (for ``unload()``)."""
        self.activate(model, None)

    def _store_live(self, parameters: dict[str, nn.Parameter]) -> None:
        if self.live is not None:
            with torch.no_grad():
                for name, value in self.adapters[self.live].items():
                    value.copy_(parameters[name])

    def _activate(self, parameters: dict[str, nn.Parameter], adapter: str | None) -> None:
        with torch.no_grad():
            for name, base_value in self.base.items():
                source = self.adapters[adapter].get(name, base_value) if adapter is not None else base_value
                parameters[name].copy_(source)
        self.live = adapter
