"""The table of adapter methods and the helpers a method module registers itself with (see
:mod:`peftkit.methods`)."""

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
    to_file: Callable[[Any, list[str], nn.Module], dict[str, Any]]  # (config, wrapped paths, model)
    from_file: Callable[[dict[str, Any]], AdapterConfig]
    # Methods that act on the model's inputs rather than its weights (prompt and prefix tuning) rewrite the
    # forward / generate keyword arguments of the active adapter here: (base model, adapter name, kwargs)
    # -> kwargs, e.g. extending the attention mask and labels over virtual tokens. None: inputs untouched.
    prepare_inputs: Callable[[nn.Module, str, dict[str, Any]], dict[str, Any]] | None = None
    prepare_generation: Callable[[nn.Module, str, dict[str, Any]], dict[str, Any]] | None = None
    # further `peft_type`s whose files `from_file` reads (a method written in HF PEFT's format where it can,
    # in peftkit's own where HF PEFT has no equivalent)
    other_file_types: tuple[str, ...] = ()


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
        if file_type == method.file_type or file_type in method.other_file_types:
            return method
    known = sorted(m.file_type for m in METHODS.values())
    raise ConfigError(f"adapter_config.json has `peft_type`={file_type!r}; peftkit reads {known}")


def native_file_format(file_type: str, config_class: type[AdapterConfig]) -> dict[str, Any]:
    """``to_file`` / ``from_file`` for methods HF PEFT has no format for: the peftkit config as JSON, tagged
    with a ``peft_type`` of peftkit's own (HF PEFT refuses such a file instead of misreading it)."""

    def to_file(config: AdapterConfig, targets: list[str], model: nn.Module) -> dict[str, Any]:
        return {"peft_type": file_type, **config.to_dict()}

    def from_file(data: dict[str, Any]) -> AdapterConfig:
        data = {k: v for k, v in data.items() if k not in {"peft_type", "base_model_name_or_path"}}
        config = AdapterConfig.from_dict(data)
        if not isinstance(config, config_class):
            raise ConfigError(
                f"`peft_type`={file_type!r} holds a {type(config).__name__}, expected {config_class.__name__}"
            )
        return config

    return {"file_type": file_type, "to_file": to_file, "from_file": from_file}


def in_place_method(
    name: str,
    config_class: type[AdapterConfig],
    trained: Callable[[nn.Module, Any], list[str]],
    file_type: str,
) -> Method:
    """Register a method that wraps no module and only trains base parameters in place (BitFit, layer tuning,
    full fine-tuning): ``trained(model, config)`` names them, and also validates the config on inject."""

    def check(model: nn.Module, adapter: str, config: Any) -> list[str]:
        trained(model, config)  # raises for a config the model cannot take, before anything changes
        return []

    return register_method(
        Method(
            name=name,
            config_class=config_class,
            inject=check,
            trained_base_parameters=lambda model, targets, config: trained(model, config),
            **native_file_format(file_type, config_class),
        )
    )


def no_base_parameters(model: nn.Module, targets: list[str], config: Any) -> list[str]:
    return []
