"""AdapterFusion (Pfeiffer et al. 2020, arXiv:2005.00247): attention over several trained bottleneck adapters.

At every layer that holds all the fused adapters, with ``h`` the sub-layer output and ``z_i = h + a_i(h)``
the output of adapter ``i``:

    q = W_Q h,  k_i = W_K z_i,  v_i = W_V z_i,  w = softmax_i(q · k_i / T),  out = Σ_i w_i v_i

``W_V`` starts as the identity and ``W_Q``, ``W_K`` at zero, so a fresh fusion averages the adapters'
outputs; only the fusion's parameters train, the adapters stay frozen. A fusion is an adapter of its own
name: saved, loaded and deleted on its own, next to the adapters it combines (which must be loaded first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftkit.config import AdapterConfig, ConfigError, as_name_tuple, check_number, register_config
from peftkit.methods.bottleneck import Bottleneck, BottleneckLayer
from peftkit.methods.registry import Method, native_file_format, no_base_parameters, register_method


@register_config
@dataclass(frozen=True)
class FusionConfig(AdapterConfig):
    """Fields:
    adapters: the names of the bottleneck adapters to combine (at least two).
    temperature: T of the softmax.
    """

    method: ClassVar[str] = "fusion"

    adapters: tuple[str, ...] = ()
    temperature: float = 1.0

    def requires(self) -> tuple[str, ...]:
        return self.adapters

    def __post_init__(self) -> None:
        self._set("adapters", as_name_tuple("adapters", list(self.adapters), allow_string=False) or ())
        if len(set(self.adapters)) < 2:
            raise ConfigError(
                f"`adapters` must name at least two distinct bottleneck adapters, got {list(self.adapters)}"
            )
        check_number("temperature", self.temperature, low=1e-6, high=float("inf"))


class Fusion(nn.Module):
    """One layer's fusion of the bottleneck adapters named ``adapter_order``: a composition that holds only its
    own W_Q, W_K, W_V and reads the adapters from the layer they live in (it never owns their parameters)."""

    file_prefix = "fusion"  # its tensors' keys in a checkpoint: fusion.query.weight, ...

    def __init__(self, hidden: int, config: FusionConfig, like: torch.Tensor) -> None:
        super().__init__()
        factory = {"device": like.device, "dtype": like.dtype}
        self.adapter_order = list(config.adapters)
        self.temperature = config.temperature
        self.query = nn.Linear(hidden, hidden, **factory)
        self.key = nn.Linear(hidden, hidden, **factory)
        self.value = nn.Linear(hidden, hidden, bias=False, **factory)
        with torch.no_grad():
            for layer in (self.query, self.key):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
            self.value.weight.copy_(torch.eye(hidden, **factory))

    def output(
        self, adapters: nn.ModuleDict, x: torch.Tensor, y: torch.Tensor, sub_layer_input
    ) -> torch.Tensor:
        """The layer's output under the fusion: its members' outputs (from ``adapters``, the layer's), fused."""
        outputs = [adapters[member].output(adapters, x, y, sub_layer_input) for member in self.adapter_order]
        return self(y, outputs)

    def forward(self, h: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
        z = torch.stack(outputs, dim=-2)  # (..., n_adapters, hidden)
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
        layer.adapters[name] = Fusion(layer.out_features, config, like=next(layer.base_layer.parameters()))
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
