"""``PeftModel.forward`` with the base model's signature, as ``inspect.signature`` reads it.

transformers' ``Trainer`` keeps only the dataset columns named in ``inspect.signature(model.forward)`` and
finds the label columns in ``inspect.signature(type(model).forward)``. A wrapper's ``forward(*args,
**kwargs)`` names none, so every column was dropped. Read on an instance, ``forward`` answers with the
base model's signature plus ``adapter_names``; read on the class (no base model to ask), it names
``labels``, the label argument of every transformers task model but question answering.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

_KEYWORD = inspect.Parameter.KEYWORD_ONLY


def with_parameter(signature: inspect.Signature, name: str) -> inspect.Signature:
    """``signature`` with keyword-only ``name=None`` added before ``**kwargs`` (unchanged if present)."""
    params = list(signature.parameters.values())
    if name in signature.parameters:
        return signature
    at = next((i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD), len(params))
    params.insert(at, inspect.Parameter(name, _KEYWORD, default=None))
    return signature.replace(parameters=params)


class BoundForward:
    """``model.forward``: calls the wrapper's forward; its ``__signature__`` is the base model's."""

    __slots__ = ("_function", "_model")

    def __init__(self, function: Callable[..., Any], model: Any) -> None:
        self._function, self._model = function, model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function(self._model, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return with_parameter(inspect.signature(self._model.base_model.forward), "adapter_names")

    @property
    def __name__(self) -> str:
        return self._function.__name__

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self._function.__doc__


class base_signature_forward:
    """Decorator for ``PeftModel.forward`` (see the module docstring)."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self._function = function
        functools.update_wrapper(self, function)
        signature = with_parameter(inspect.signature(function), "labels")
        self._unbound = functools.wraps(function)(lambda *a, **k: function(*a, **k))
        self._unbound.__signature__ = signature
        del self._unbound.__wrapped__

    def __get__(self, model: Any, owner: type | None = None) -> Any:
        return self._unbound if model is None else BoundForward(self._function, model)
