"""The registry of adapter methods: how each one is applied to a model and written to ``adapter_config.json``.

A method plugs in with one :class:`Method` entry; the PeftModel, checkpoints and accounting only ever go
through this table, never through a method-specific branch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from peftkit.config import AdapterConfig, ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type[AdapterConfig]
    # Wrap the targeted modules and add the named adapter; returns the wrapped paths. Validates everything
    # before it changes the model, so a refused config leaves the model as it was.
    inject: Callable[[nn.Module, str, Any], list[str]]
    # Names of base-model parameters the adapter trains in place (e.g. LoRA's `bias="all"`), given its targets.
    trained_base_parameters: Callable[[nn.Module, list[str], Any], list[str]]
    # adapter_config.json: the Hugging Face PEFT `peft_type` it is written as, and the translation both ways
    file_type: str
    to_file: Callable[[Any, list[str]], dict[str, Any]]
    from_file: Callable[[dict[str, Any]], AdapterConfig]


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def method_for_config(config: AdapterConfig) -> Method:
    if config.method not in METHODS:
        raise ConfigError(
            f"no method is registered for config {type(config).__name__}; known: {sorted(METHODS)}"
        )
    return METHODS[config.method]


def method_for_file(data: dict[str, Any]) -> Method:
    file_type = data.get("peft_type")
    for method in METHODS.values():
        if method.file_type == file_type:
            return method
    known = sorted(m.file_type for m in METHODS.values())
    raise ConfigError(f"adapter_config.json has `peft_type`={file_type!r}; peftkit reads {known}")


# Importing the method modules registers them.
from peftkit.methods import lora  # noqa: E402, F401
