"""Full fine-tuning through the adapter API: the baseline every other method is compared with.

Every parameter of the base model trains. The "adapter" is then the whole model: that is what is saved and
counted. Like every in-place method, the trained values are kept per adapter (see
:mod:`peftkit.parameter_bank`), so ``disable_adapter()`` still gives the pretrained model; this costs one
extra copy of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkit.config import AdapterConfig, register_config
from peftkit.layer import base_parameter_names
from peftkit.method_spec import declare_method
from peftkit.methods.registry import in_place_method


@register_config
@dataclass(frozen=True)
class FullFineTuningConfig(AdapterConfig):
    """No fields: everything trains."""

    method: ClassVar[str] = "full"


in_place_method(
    "full", FullFineTuningConfig, lambda model, config: base_parameter_names(model), "PEFTKIT_FULL"
)


declare_method(
    "full",
    "every parameter trains (the baseline the methods are measured against)",
    learning_rate=5e-5,
    build=lambda o, heads: FullFineTuningConfig(),
)
