"""Base-model parameters that an adapter trains in place, kept per adapter.

Some methods train tensors the base model already has: LoRA's ``bias="all"``, BitFit's biases, the top
blocks in layer tuning, every weight in full fine-tuning. Trained naively, those tensors change the base
model for every adapter, and a disabled adapter no longer reproduces it. The bank keeps the base model's
original values and one set of values per adapter, and copies the right set into the live parameters when
the active adapter changes. The parameters keep their identity, so an optimizer holding them keeps working;
``disable_adapter()``, ``unload()`` and the other adapters see the untouched base values.

Memory: one copy of the original values, plus one per adapter that is not live (the live adapter's values
are the parameters themselves).
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit.layer import plain_named_parameters


class ParameterBank:
    """Per-adapter values of base-model parameters, keyed by the parameter object itself (its dotted name
    changes when a layer around it is wrapped or unwrapped; the object does not). Names given to :meth:`add`
    are those of the model without adapter wrappers, names of an adapter's values those of the model carrying
    that adapter alone (:func:`peftkit.layer.plain_named_parameters`)."""

    def __init__(self) -> None:
        self.parameters: dict[int, nn.Parameter] = {}
        self.base: dict[int, torch.Tensor] = {}  # original values
        self.adapters: dict[str, dict[int, torch.Tensor | None]] = {}  # adapter -> its values (None: live)
        self.live: str | None = None  # adapter whose values are in the parameters now (None: base values)

    def parameters_of(self, adapter: str) -> list[nn.Parameter]:
        return [self.parameters[key] for key in self.adapters.get(adapter, {})]

    def add(self, model: nn.Module, adapter: str, names: list[str]) -> None:
        if not names:
            return
        named = dict(plain_named_parameters(model))
        self._store_live()
        for name in names:
            key = id(named[name])
            self.parameters[key] = named[name]
            self.base.setdefault(key, named[name].detach().clone())
        self.adapters[adapter] = {id(named[name]): self.base[id(named[name])].clone() for name in names}
        self._activate(None)

    def delete(self, adapter: str) -> None:
        if adapter not in self.adapters:
            return
        self._store_live()
        del self.adapters[adapter]
        self._activate(None)
        unused = set(self.base) - {key for values in self.adapters.values() for key in values}
        for key in unused:
            del self.base[key], self.parameters[key]

    def activate(self, adapter: str | None) -> None:
        """Put ``adapter``'s values (or the base ones, for ``None`` or an adapter without any) in place."""
        if not self.base or (adapter == self.live) or (adapter not in self.adapters and self.live is None):
            return
        self._store_live()
        self._activate(adapter if adapter in self.adapters else None)

    def nbytes(self) -> int:
        """Bytes the bank holds beside the live parameters: the original values and every adapter's values
        that are not live."""
        stored = [*self.base.values(), *(v for values in self.adapters.values() for v in values.values())]
        return sum(v.numel() * v.element_size() for v in stored if v is not None)

    def state_dict(self, model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
        """The adapter's values under the parameters' dotted names in the model that carries it alone."""
        names = {id(p): name for name, p in plain_named_parameters(model, adapter)}
        values = self.adapters.get(adapter, {})
        return {names[key]: self.parameters[key] if value is None else value for key, value in values.items()}

    def load(self, model: nn.Module, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (keys as :meth:`state_dict` gives them) into the adapter's values."""
        named = dict(plain_named_parameters(model, adapter))
        with torch.no_grad():
            for name, value in tensors.items():
                stored = self.adapters[adapter][id(named[name])]
                (named[name] if stored is None else stored).copy_(value)

    def _store_live(self) -> None:
        if self.live is not None:
            values = self.adapters[self.live]
            for key in values:
                values[key] = self.parameters[key].detach().clone()
            self.live = None

    def _activate(self, adapter: str | None) -> None:
        values = self.adapters[adapter] if adapter is not None else {}
        with torch.no_grad():
            for key, base_value in self.base.items():
                self.parameters[key].copy_(values.get(key, base_value))
        for key in values:
            values[key] = None  # the live parameters now hold them
        self.live = adapter
