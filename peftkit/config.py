"""Adapter configs: validated once at construction, JSON round trip, and a registry of methods.

Every method's config is a frozen dataclass that subclasses :class:`AdapterConfig`. Validation happens in
``__post_init__`` and every error names the field, the value it got and what is allowed, e.g.
"`r` must be a positive integer, got 0".
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from peftkit.task_type import task_type_value

CONFIG_REGISTRY: dict[str, type[AdapterConfig]] = {}

# An alias of a config field: the field it stands for (None: accepted, checked and dropped, as for an option
# peftkit decides by itself) and how its value translates (None: as is).
Alias = tuple[str | None, Callable[[Any], Any] | None]


class ConfigError(ValueError):
    """A config field holds a value the method cannot use."""


def register_config(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator (above ``@dataclass``): make a config loadable by its ``method`` name, and accept the
    Hugging Face PEFT spellings listed in its ``aliases`` (and ``task_type``) as keyword arguments."""
    CONFIG_REGISTRY[cls.method] = cls
    fields_init = cls.__init__

    @functools.wraps(fields_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            fields_init(self, *args, **_resolve_aliases(cls, kwargs))
        except ConfigError as error:
            spelled = _in_given_spelling(str(error), cls, kwargs)
            if spelled == str(error):
                raise
            raise type(error)(spelled) from None

    cls.__init__ = __init__
    return cls


def _resolve_aliases(cls: type[AdapterConfig], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments with every alias replaced by its field; both spellings at once is an error."""
    fields = {f.name for f in dataclasses.fields(cls)}
    aliases = dict(cls.aliases)
    if "task_type" not in fields:  # HF PEFT's configs all take it; peftkit reads the task from the model
        aliases["task_type"] = (None, _checked_task_type)
    resolved = {}
    for name, value in kwargs.items():
        if name not in aliases or name in fields:
            resolved[name] = value
            continue
        field, translate = aliases[name]
        value = translate(value) if translate is not None else value
        if field is None:
            continue
        if field in kwargs:
            raise ConfigError(
                f"`{name}` is Hugging Face PEFT's name for `{field}`: give one of them, not both"
            )
        resolved[field] = value
    return resolved


def _in_given_spelling(message: str, cls: type[AdapterConfig], kwargs: dict[str, Any]) -> str:
    """``message`` with each field the user gave by its Hugging Face PEFT alias named as they wrote it
    (``lora_dropout=1.5``: "`lora_dropout` (peftkit's `dropout`) must be ...")."""
    for name in kwargs:
        field = cls.aliases.get(name, (None, None))[0]
        if field is not None and field != name:
            message = message.replace(f"`{field}`", f"`{name}` (peftkit's `{field}`)")
    return message


def _checked_task_type(value: Any) -> str | None:
    try:
        return task_type_value(value)
    except ValueError as error:
        raise ConfigError(str(error)) from None


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Base of every method's config. Subclasses set ``method`` and add their own fields."""

    method: ClassVar[str] = ""
    # Hugging Face PEFT spellings accepted as keyword arguments: alias -> (field or None, translation)
    aliases: ClassVar[dict[str, Alias]] = {}

    def to_dict(self) -> dict[str, Any]:
        data = {"method": self.method}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            data[field.name] = list(value) if isinstance(value, tuple) else value
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def requires(self) -> tuple[str, ...]:
        """Names of other adapters this one builds on (a fusion needs the adapters it combines)."""
        return ()

    def replace(self, **changes: Any) -> AdapterConfig:
        return dataclasses.replace(self, **changes)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> AdapterConfig:
        data = dict(data)
        method = data.pop("method", None)
        if method not in CONFIG_REGISTRY:
            raise ConfigError(f"`method` must be one of {sorted(CONFIG_REGISTRY)}, got {method!r}")
        cls = CONFIG_REGISTRY[method]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown field(s) {unknown} for method {method!r}; allowed: {sorted(known)}")
        return cls(**data)

    @staticmethod
    def from_json(text: str) -> AdapterConfig:
        return AdapterConfig.from_dict(json.loads(text))

    def _set(self, name: str, value: Any) -> None:
        """Normalise a field inside ``__post_init__`` (the dataclass is frozen)."""
        object.__setattr__(self, name, value)


# --- validation helpers shared by every config --------------------------------------------------------


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"`{name}` must be a positive integer, got {value!r}")


def check_number(name: str, value: Any, *, low: float, high: float, high_inclusive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and low <= value and (value <= high if high_inclusive else value < high)
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ConfigError(f"`{name}` must be a number in [{low}, {high}{bracket}, got {value!r}")


def check_choice(name: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"`{name}` must be one of {list(allowed)}, got {value!r}")


def as_name_tuple(name: str, value: Any, *, allow_string: bool) -> str | tuple[str, ...] | None:
    """Normalise a module-name spec: ``None``, one string (a regex or a keyword), or a list of names."""
    if value is None:
        return None
    if isinstance(value, str):
        if allow_string:
            check_regex(name, value)
            return value
        return (value,)
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) and v for v in value):
        if not value:
            raise ConfigError(f"`{name}` must not be an empty list; use None for the default")
        return tuple(sorted(value)) if isinstance(value, (set, frozenset)) else tuple(value)
    raise ConfigError(f"`{name}` must be a string or a list of non-empty strings, got {value!r}")


def check_regex(name: str, pattern: str) -> None:
    """Raise :class:`ConfigError` when ``pattern`` (one string: a regular expression matched against whole
    module paths) does not compile, naming the field and Python's reason."""
    try:
        re.compile(pattern)
    except re.error as error:
        raise ConfigError(f"`{name}`={pattern!r} is not a valid regular expression: {error}") from None
