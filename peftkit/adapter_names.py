"""Adapter names: checked once, wherever a name enters peftkit.

A name becomes a key of ``nn.ModuleDict``s and, on save, a folder name (``directory/<name>``), so it must be
safe as both: ASCII letters, digits, ``_`` and ``-``, 1 to 64 characters. That rules out path separators,
``.``/``..``, absolute paths, names the file system refuses as too long, and ``.``, which torch module keys
cannot hold. Hugging Face PEFT accepts any string; peftkit does not, because a name like ``/etc`` or ``../x``
would make ``save_pretrained(d)`` write outside ``d``.
"""

from __future__ import annotations

import re
from typing import Any

from peftkit.config import ConfigError
from peftkit.layer import AdapterError

MAX_NAME_LENGTH = 64
_NAME = re.compile(r"[A-Za-z0-9_-]+")
ALLOWED_TEXT = (
    f"1 to {MAX_NAME_LENGTH} ASCII letters, digits, '_' or '-' (no '.', '/', spaces or other characters)"
)


class AdapterNameError(ConfigError, AdapterError):
    """An adapter name that peftkit cannot use as a module key and a folder name (a ConfigError, and an
    AdapterError as the other lifecycle misuses)."""


def check_adapter_name(name: Any, field: str = "adapter_name") -> str:
    """Return ``name`` if it is a usable adapter name; else raise :class:`AdapterNameError` (a
    :class:`~peftkit.config.ConfigError`) naming the value and what is allowed."""
    if not isinstance(name, str):
        raise AdapterNameError(
            f"`{field}` must be a string, got {type(name).__name__} {name!r}; allowed: {ALLOWED_TEXT}"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise AdapterNameError(
            f"`{field}` {name[:40]!r}... is {len(name)} characters long; allowed: {ALLOWED_TEXT}"
        )
    if not _NAME.fullmatch(name):
        raise AdapterNameError(f"`{field}` {name!r} is not a usable adapter name; allowed: {ALLOWED_TEXT}")
    return name
