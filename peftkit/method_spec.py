"""How each adapter method is trained from settings: declared once, next to the method's registration.

A :class:`MethodSpec` says, for one ``--method`` name: the adapter config it builds and from which options,
each option's type, default and help, the learning rate a run starts from, and what the base model needs
first (QLoRA quantizes it). ``peftkit train``'s flags, :class:`~peftkit.training.config.TrainConfig`, the
comparison lab and the README's method list all derive from these declarations; a setting that belongs to
another method is refused, not ignored.

This module imports only :mod:`peftkit.config`, so every method module can declare itself here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peftkit.config import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from peftkit.config import AdapterConfig


@dataclass(frozen=True)
class Option:
    """One setting of a method: ``--name-with-dashes`` on the command line, ``name`` in YAML."""

    name: str
    kind: type  # int, float or str: how a command-line or YAML string is read
    default: Any
    help: str  # what it is, with its unit; the methods that take it and the default are added
    choices: tuple[Any, ...] | None = None
    many: bool = False  # several values (a list); one value stays a plain string
    optional: bool = False  # 'none' is a value (None)


@dataclass(frozen=True)
class MethodSpec:
    name: str  # the --method value
    summary: str  # one line: what is trained, and the paper
    learning_rate: float  # the peak learning rate a run starts from unless one is given
    options: tuple[Option, ...]
    # (the method's options, complete; modules a task head adds, which train in full) -> adapter config
    build: Callable[[Mapping[str, Any], list[str]], AdapterConfig]
    # (base model, the method's options, gradient checkpointing on) -> None: what the base needs first
    prepare_base: Callable[[nn.Module, Mapping[str, Any], bool], None] | None = None

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    def defaults(self) -> dict[str, Any]:
        """Each option's default, by name."""
        return {o.name: o.default for o in self.options}


METHOD_SPECS: dict[str, MethodSpec] = {}

# Options several methods take, declared once so that they read alike everywhere.
TARGET_MODULES = Option(
    "target_modules",
    str,
    "all-linear",
    "modules to adapt: names, one regex, or all-linear (YAML null: the architecture's default)",
    many=True,
)
NUM_VIRTUAL_TOKENS = Option(
    "num_virtual_tokens", int, 20, "virtual tokens (trained prompt length, in tokens)"
)


def declare_method(
    name: str,
    summary: str,
    *,
    learning_rate: float,
    build: Callable[[Mapping[str, Any], list[str]], AdapterConfig],
    options: tuple[Option, ...] = (),
    prepare_base: Callable[[nn.Module, Mapping[str, Any], bool], None] | None = None,
) -> MethodSpec:
    """Declare how ``--method name`` is trained. Raises ConfigError when ``name`` is declared twice or an
    option shares its name with a different option of another method (one flag must mean one thing)."""
    if name in METHOD_SPECS:
        raise ConfigError(f"method {name!r} is declared twice")
    for option in options:
        for other in METHOD_SPECS.values():
            clash = next((o for o in other.options if o.name == option.name and o != option), None)
            if clash is not None:
                raise ConfigError(f"option {option.name!r} of {name!r} differs from {other.name!r}'s")
    spec = MethodSpec(name, summary, learning_rate, tuple(options), build, prepare_base)
    METHOD_SPECS[name] = spec
    return spec


def method_spec(name: str) -> MethodSpec:
    """The declaration of ``name``; raises ConfigError naming the declared methods."""
    if name not in METHOD_SPECS:
        raise ConfigError(f"`method` must be one of {sorted(METHOD_SPECS)}, got {name!r}")
    return METHOD_SPECS[name]


def all_options() -> dict[str, tuple[Option, list[str]]]:
    """Every option name -> (the option, the methods that take it), in declaration order."""
    found: dict[str, tuple[Option, list[str]]] = {}
    for spec in METHOD_SPECS.values():
        for option in spec.options:
            found.setdefault(option.name, (option, []))[1].append(spec.name)
    return found


def check_options(method: str, given: Mapping[str, Any]) -> None:
    """Raise ConfigError for a setting in ``given`` that ``method`` does not take, naming the methods
    that do and the ones ``method`` takes."""
    spec = method_spec(method)
    takers = all_options()
    for name in given:
        if name not in spec.option_names:
            owners = ", ".join(takers[name][1]) if name in takers else "no method"
            mine = ", ".join(spec.option_names) or "none"
            raise ConfigError(f"`{name}` is an option of {owners}, not of {method} (its options: {mine})")
