"""AdapterFusion (Pfeiffer et al. 2020, arXiv:2005.00247): attention over several trained bottleneck adapters.

At every layer that holds all the fused adapters, with ``h`` the sub-layer output and ``z_i = h + a_i(h)``
the output of adapter ``i``:

    q = W_Q h,  k_i = W_K z_i,  v_i = W_V z_i,  w = softmax_i(q · k_i / T),  out = Σ_i w_i v_i

``W_V`` starts as the identity, ``W_Q`` (and both biases) at zero, so a fresh fusion averages the adapters'
outputs exactly; ``W_K`` starts ~ N(0, 0.02²) as in AdapterHub, so that ``W_Q`` gets a gradient (with both at
zero neither would ever move: each one's gradient is a product with the other). Only the fusion's parameters
train, the adapters stay frozen. A fusion is an adapter of its own
name: saved, loaded and deleted on its own, next to the adapters it combines (which must be loaded first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftkit.config import (
    AdapterConfig,
    ConfigError,
    as_name_tuple,
    check_choice,
    check_number,
    register_config,
)
from peftkit.layer import ADAPTER_DTYPES
from peftkit.methods.bottleneck import Bottleneck, BottleneckLayer
from peftkit.methods.registry import Method, native_file_format, no_base_parameters, register_method


@register_config
@dataclass(frozen=True)
class FusionConfig(AdapterConfig):
    """Fields:
    adapters: the names of the bottleneck adapters to combine (at least two).
    temperature: T of the softmax.
    adapter_dtype: dtype of W_Q, W_K, W_V (``None``: float32 on a half-precision or quantized base, else the
        base weight's); the fused output is rounded to the layer's output dtype.
    """

    method: ClassVar[str] = "fusion"

    adapters: tuple[str, ...] = ()
    temperature: float = 1.0
    adapter_dtype: str | None = None

    def requires(self) -> tuple[str, ...]:
        return self.adapters

    def __post_init__(self) -> None:
        self._set("adapters", as_name_tuple("adapters", list(self.adapters), allow_string=False) or ())
        if len(set(self.adapters)) < 2:
            raise ConfigError(
                f"`adapters` must name at least two distinct bottleneck adapters, got {list(self.adapters)}"
            )
        check_number("temperature", self.temperature, low=1e-6, high=float("inf"))
        check_choice("adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)


class Fusion(nn.Module):
    """One layer's fusion of the bottleneck adapters named ``adapter_order``: a composition that holds only its
    own W_Q, W_K, W_V and reads the adapters from the layer they live in (it never owns their parameters)."""

    file_prefix = "fusion"  # its tensors' keys in a checkpoint: fusion.query.weight, ...

    def __init__(self, hidden: int, config: FusionConfig, factory: dict) -> None:
        super().__init__()
        self.adapter_order = list(config.adapters)
        self.temperature = config.temperature
        self.query = nn.Linear(hidden, hidden, **factory)
        self.key = nn.Linear(hidden, hidden, **factory)
        self.value = nn.Linear(hidden, hidden, bias=False, **factory)
        with torch.no_grad():
            nn.init.zeros_(self.query.weight)
            nn.init.normal_(self.key.weight, std=0.02)
            for layer in (self.query, self.key):
                nn.init.zeros_(layer.bias)
            self.value.weight.copy_(torch.eye(hidden, **factory))

    def output(
        self, adapters: nn.ModuleDict, x: torch.Tensor, y: torch.Tensor, sub_layer_input
    ) -> torch.Tensor:
        """The layer's output under the fusion: its members' outputs (from ``adapters``, the layer's), fused."""
        outputs = [adapters[member].output(adapters, x, y, sub_layer_input) for member in self.adapter_order]
        return self(y, outputs)

    def forward(self, h: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
        dtype = self.value.weight.dtype  # computed in the fusion's dtype, rounded once to the output's
        return self._fuse(h.to(dtype), torch.stack(outputs, dim=-2).to(dtype)).to(h.dtype)

    def _fuse(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``h``: (..., hidden), ``z``: (..., n_adapters, hidden) -> (..., hidden)."""
        q = self.query(h).unsqueeze(-2)  # (..., 1, hidden)
        scores = (q * self.key(z)).sum(-1) / self.temperature  # (..., n_adapters)
        weights = scores.softmax(dim=-1).unsqueeze(-1)  # (..., n_adapters, 1)
        return (weights * self.value(z)).sum(dim=-2)  # (..., hidden)


def inject_fusion(model: nn.Module, name: str, config: FusionConfig) -> list[str]:
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, BottleneckLayer)]

    def members(layer: BottleneckLayer) -> set[str]:
        return {a for a, module in layer.adapters.items() if isinstance(module, Bottleneck)}

    targets = [p for p, m in layers if set(config.adapters) <= members(m)]
    if not targets:
        present = sorted({a for _, m in layers for a in members(m)})
        raise ConfigError(
            f"`adapters` {list(config.adapters)} are not all bottleneck adapters of this model "
            f"(bottleneck adapters present: {present}); add or load them before the fusion"
        )
    parallel = [
        p for p in targets if any(model.get_submodule(p).adapters[a].parallel for a in config.adapters)
    ]
    if parallel:
        raise ConfigError(
            "AdapterFusion combines serial bottleneck adapters; these are parallel: "
            + ", ".join(parallel[:3])
        )
    for path in targets:
        layer = model.get_submodule(path)
        layer.adapters[name] = Fusion(layer.out_features, config, layer.factory(config.adapter_dtype))
    return targets


register_method(
    Method(
        name="fusion",
        config_class=FusionConfig,
        inject=inject_fusion,
        trained_base_parameters=no_base_parameters,
        **native_file_format("PEFTKIT_FUSION", FusionConfig),
    )
)
