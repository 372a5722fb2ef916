"""(IA)³ (Liu et al. 2022, arXiv:2205.05638): learned vectors that rescale keys, values and the feed-forward
intermediate activation.

For a targeted layer ``y = W x + b``:
- attention projections (keys, values) rescale the output: ``y = l ⊙ (W x + b)``, ``l`` of size ``out``;
- feed-forward output layers rescale their input (the intermediate activation): ``y = W (l ⊙ x) + b``,
  ``l`` of size ``in``.
With ``l = 1`` at start the model is unchanged. Both forms fold into the weights: ``W ← diag(l) W`` (and
``b ← l ⊙ b``) or ``W ← W diag(l)``. Names, shapes and config fields follow HF PEFT's IA3 so adapters move
between the two libraries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.architectures import architecture
from peftkit.config import AdapterConfig, ConfigError, as_name_tuple, check_choice, register_config
from peftkit.layer import ADAPTER_DTYPES, AdapterLayer, adapter_dtype, find_or_wrap, innermost
from peftkit.method_spec import TARGET_MODULES, declare_method
from peftkit.methods.registry import Method, no_base_parameters, register_method
from peftkit.targeting import linear_features, name_matches, select_modules

INIT_MODES = ("ones", "random")


@register_config
@dataclass(frozen=True)
class IA3Config(AdapterConfig):
    """Fields:
    target_modules: layers to rescale (names, one regex, or ``None`` for the architecture's default).
    feedforward_modules: those of the targets that rescale their input (the feed-forward output layer).
    modules_to_save: modules trained in full besides (a fresh task head).
    init: ``ones`` (identity at start) or ``random`` (non-identity, for tests).
    adapter_dtype: dtype of the vectors: ``float32``, ``bfloat16`` or ``float16``; ``None``: float32 on a
        half-precision or quantized base, else the base weight's (see :func:`peftkit.layer.adapter_dtype`).
        Not written to ``adapter_config.json`` (HF PEFT has no such field).
    """

    method: ClassVar[str] = "ia3"

    target_modules: str | tuple[str, ...] | None = None
    feedforward_modules: str | tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None
    init: str = "ones"
    adapter_dtype: str | None = None

    def __post_init__(self) -> None:
        self._set("target_modules", as_name_tuple("target_modules", self.target_modules, allow_string=True))
        self._set(
            "feedforward_modules",
            as_name_tuple("feedforward_modules", self.feedforward_modules, allow_string=True),
        )
        self._set(
            "modules_to_save", as_name_tuple("modules_to_save", self.modules_to_save, allow_string=False)
        )
        check_choice("init", self.init, INIT_MODES)
        check_choice("adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)
        if self.feedforward_modules is not None and self.target_modules is None:
            raise ConfigError(
                "`feedforward_modules` needs explicit `target_modules` (it must be a subset of them)"
            )

    def resolved(self, model: nn.Module) -> tuple[str | tuple[str, ...], str | tuple[str, ...] | None]:
        """(target_modules, feedforward_modules): the config's, or the architecture's keys, values and
        feed-forward output layer (Liu et al. 2022, section 3.3). Raises :class:`ConfigError` for a model
        without known positions."""
        if self.target_modules is not None:
            return self.target_modules, self.feedforward_modules
        return architecture(
            model,
            ("kv", "ffn_output"),
            purpose="IA3 needs `target_modules` for this model",
            remedy="`target_modules` (the key, value and feed-forward output layers) and `feedforward_modules` "
            "(the feed-forward output layers, whose input is rescaled)",
        ).ia3_targets()

    def to_hf_dict(self, targets: list[str], model: nn.Module) -> dict[str, Any]:
        """HF PEFT's IA3 fields. Targets and feed-forward layers are written as the module paths applied (an
        empty list when none is feed-forward): HF PEFT reads a missing ``feedforward_modules`` as "this model
        type's default", which need not be what was applied, and needs feed-forward names among the targets."""
        feedforward_spec = self.resolved(model)[1]
        feedforward = [
            t for t in targets if feedforward_spec is not None and name_matches(t, feedforward_spec)
        ]
        return {
            "peft_type": "IA3",
            "task_type": None,
            "target_modules": sorted(targets),
            "feedforward_modules": sorted(feedforward),
            "modules_to_save": _jsonable(self.modules_to_save),
            "init_ia3_weights": self.init == "ones",
            "fan_in_fan_out": False,
            "inference_mode": True,
        }

    @staticmethod
    def from_hf_dict(data: dict[str, Any]) -> IA3Config:
        return IA3Config(
            target_modules=data.get("target_modules"),
            feedforward_modules=data.get("feedforward_modules") or None,
            modules_to_save=data.get("modules_to_save"),
            init="ones" if data.get("init_ia3_weights", True) else "random",
        )


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class IA3Linear(AdapterLayer):
    """Rescales a linear / ``Conv1D`` layer's output (``l`` shaped (out, 1)) or, for a feed-forward layer,
    its input (``l`` shaped (1, in)), per named adapter. A mixed batch gathers one vector per row."""

    adapter_holders = ("ia3_l",)
    adapter_settings = ("feedforward",)
    stack_order = 1  # rescales the layer as adapted by LoRA: l ⊙ ((W + s·BA) x + b)

    def __init__(self, base_layer: nn.Linear | Conv1D) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.transposed = isinstance(innermost(base_layer), Conv1D)
        self.in_features, self.out_features = linear_features(base_layer)  # a 4-bit weight is packed
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}

    def add_adapter(self, name: str, config: IA3Config, feedforward: bool) -> None:
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        dtype = adapter_dtype(config.adapter_dtype, self.base_layer)
        vector = torch.ones(shape, dtype=dtype, device=self.base_layer.weight.device)
        if config.init == "random":
            vector += 0.1 * torch.randn_like(vector)
        self.ia3_l[name] = nn.Parameter(vector)
        self.feedforward[name] = feedforward

    def _scale_shape(self, name: str) -> list[int]:
        """How ``l`` broadcasts over the weight: along the scaled features' axis (outputs are dim 0 of an
        ``nn.Linear`` weight (out, in) and dim 1 of a ``Conv1D`` weight (in, out))."""
        output_axis = 1 if self.transposed else 0
        axis = 1 - output_axis if self.feedforward[name] else output_axis
        return [-1, 1] if axis == 0 else [1, -1]

    def merge(self, name: str) -> None:
        """``W ← diag(l) W`` (and ``b ← l ⊙ b``), or ``W ← W diag(l)`` for a feed-forward layer: computed in
        float32 and rounded once; the original tensors are kept for an exact :meth:`unmerge`.

        Raises ``ValueError`` on a quantized base layer (its weight holds integer codes)."""
        if name in self.merged_adapters:
            return
        plain = innermost(self.base_layer)
        if not plain.weight.is_floating_point() or hasattr(plain.weight, "quant_state"):
            raise ValueError(
                f"IA3 adapter {name!r} cannot be merged into the quantized layer {type(plain).__name__}; "
                "run it unmerged"
            )
        vector = self.ia3_l[name].detach().flatten().float()
        with torch.no_grad():
            self.put_merged(plain, "weight", plain.weight.float() * vector.view(self._scale_shape(name)))
            if not self.feedforward[name] and plain.bias is not None:
                self.put_merged(plain, "bias", plain.bias.float() * vector)
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """The original weights back, bit for bit (or, merged only to unload, divided out again)."""
        if self.restore_unmerged():
            self.merged_adapters.clear()
            return
        plain = innermost(self.base_layer)
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                vector = self.ia3_l[name].detach().flatten()
                if bool((vector == 0).any()):
                    raise ValueError(f"IA3 adapter {name!r} has a zero scale; it cannot be unmerged")
                plain.weight.div_(vector.view(self._scale_shape(name)).to(plain.weight.dtype))
                if not self.feedforward[name] and plain.bias is not None:
                    plain.bias.div_(vector.to(plain.bias.dtype))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.routing is not None:
            return self._mixed_forward(x, *args, **kwargs)
        name = self.active_adapter
        if not self.runs(name):
            return self.base_layer(x, *args, **kwargs)
        vector = self.ia3_l[name].flatten()
        if self.feedforward[name]:
            return self.base_layer((x * vector).to(x.dtype), *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * vector).to(result.dtype)

    def _mixed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        routing = self.routing
        routing.check_batch(x.shape[0], f"IA3Linear({self.in_features}->{self.out_features})")
        in_scale = x.new_ones(len(routing.names), self.in_features)  # (n, in): 1 leaves a row unchanged
        out_scale = x.new_ones(len(routing.names), self.out_features)  # (n, out)
        for i, name in enumerate(routing.names):
            if self.runs(name):
                (in_scale if self.feedforward[name] else out_scale)[i] = self.ia3_l[name].flatten()
        rows = routing.index
        view = (x.shape[0],) + (1,) * (x.dim() - 2) + (-1,)  # broadcast over the token axes
        result = self.base_layer(x * in_scale[rows].view(view), *args, **kwargs)
        return result * out_scale[rows].view(view)


def _supported(module: nn.Module) -> bool:
    return isinstance(innermost(module), (nn.Linear, Conv1D))


def inject_ia3(model: nn.Module, name: str, config: IA3Config) -> list[str]:
    target_modules, feedforward_modules = config.resolved(model)
    targets = select_modules(
        model,
        target_modules=target_modules,
        modules_to_save=config.modules_to_save,
        supported=_supported,
        supported_text="nn.Linear, transformers Conv1D",
    )
    feedforward = {
        t for t in targets if feedforward_modules is not None and name_matches(t, feedforward_modules)
    }
    if feedforward_modules is not None and not feedforward:
        raise ConfigError(
            f"`feedforward_modules`={feedforward_modules!r} matches none of the targeted modules"
        )
    for path in targets:
        find_or_wrap(model, path, IA3Linear, IA3Linear).add_adapter(
            name, config, feedforward=path in feedforward
        )
    return targets


register_method(
    Method(
        name="ia3",
        config_class=IA3Config,
        inject=inject_ia3,
        trained_base_parameters=no_base_parameters,
        file_type="IA3",
        to_file=lambda config, targets, model: config.to_hf_dict(targets, model),
        from_file=IA3Config.from_hf_dict,
    )
)


declare_method(
    "ia3",
    "learned scaling vectors on keys, values and feed-forward activations ((IA)³, Liu et al. 2022)",
    learning_rate=5e-3,
    options=(TARGET_MODULES,),
    build=lambda o, heads: IA3Config(target_modules=o["target_modules"], modules_to_save=heads or None),
)
