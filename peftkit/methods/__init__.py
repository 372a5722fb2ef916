"""The registry of adapter methods: how each one is applied to a model and written to ``adapter_config.json``.

A method plugs in with one :class:`Method` entry; the PeftModel, checkpoints and accounting only ever go
through this table, never through a method-specific branch.
"""

from peftkit.methods.registry import (
    METHODS,
    Method,
    in_place_method,
    method_for_config,
    method_for_file,
    native_file_format,
    no_base_parameters,
    register_method,
)

__all__ = [
    "METHODS",
    "Method",
    "in_place_method",
    "method_for_config",
    "method_for_file",
    "native_file_format",
    "no_base_parameters",
    "register_method",
]

# Importing the method modules registers them.
from peftkit.methods import bitfit, bottleneck, full, fusion, ia3, layer_tuning, lora, prompts  # noqa: F401
