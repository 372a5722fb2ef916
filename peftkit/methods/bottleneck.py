"""Bottleneck adapters: serial (Houlsby et al. 2019; Pfeiffer et al. 2020) and parallel (He et al. 2021).

An adapter maps a hidden vector ``h`` (size d) through a bottleneck of size m << d:
``a(h) = U f(D h + b_D) + b_U`` with ``D`` (m x d), ``U`` (d x m), ``f`` a non-linearity.

- serial: the sub-layer's output ``h`` becomes ``h + s · a(h)`` before the residual connection; Houlsby puts
  one after the attention output projection and one after the feed-forward output projection, Pfeiffer only
  the latter;
- parallel (He et al., "Towards a unified view of PETL"): the feed-forward sub-layer ``FFN(x)`` becomes
  ``FFN(x) + s · a(x)``, the adapter reading the sub-layer's input (given ``target_modules``, each target
  ``m`` becomes ``m(x) + s · a(x)``).

Each adapter sizes itself from the layer it wraps: ``D`` reads the layer's input features (parallel) or its
output features (serial), ``U`` writes its output features, so any linear layer can carry one (BERT's
``intermediate.dense``, LLaMA's ``k_proj`` with grouped key/value heads). The positions per architecture come
from :mod:`peftkit.architectures`.

``U`` and ``b_U`` start at zero, so a fresh adapter leaves the model's output exactly unchanged. A bottleneck
adapter adds a non-linearity; it cannot be folded into the weights, and ``merge_adapter()`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftkit.architectures import architecture
from peftkit.config import (
    AdapterConfig,
    ConfigError,
    as_name_tuple,
    check_choice,
    check_number,
    check_positive_int,
    register_config,
)
from peftkit.layer import ADAPTER_DTYPES, AdapterLayer, adapter_dtype, find_or_wrap, innermost
from peftkit.method_spec import Option, declare_method
from peftkit.methods.registry import Method, native_file_format, no_base_parameters, register_method
from peftkit.targeting import LINEAR_TYPES, linear_features, select_modules

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}
PLACEMENTS = ("houlsby", "pfeiffer", "parallel")


@register_config
@dataclass(frozen=True)
class BottleneckConfig(AdapterConfig):
    """Fields:
    placement: ``houlsby`` (serial after attention and feed-forward), ``pfeiffer`` (serial after the
        feed-forward) or ``parallel`` (next to the feed-forward, He et al.).
    bottleneck_size: m; or ``reduction_factor``: m = d / reduction_factor (one of the two).
    non_linearity: relu, gelu, tanh or silu.
    scaling: s (He et al. use 4 for parallel adapters).
    target_modules: the linear layers that get an adapter, on any model (overrides the architecture's
        positions): serial ones read the layer's output, parallel ones its input.
    modules_to_save: modules trained in full besides (a fresh task head).
    init: ``zeros`` (U = 0: the model starts unchanged) or ``random`` (for tests).
    adapter_dtype: dtype of D and U: ``float32``, ``bfloat16`` or ``float16``; ``None``: float32 on a
        half-precision or quantized base, else the base weight's (see :func:`peftkit.layer.adapter_dtype`).
    """

    method: ClassVar[str] = "bottleneck"

    placement: str = "pfeiffer"
    bottleneck_size: int | None = None
    reduction_factor: float | None = 16
    non_linearity: str = "relu"
    scaling: float = 1.0
    target_modules: str | tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None
    init: str = "zeros"
    adapter_dtype: str | None = None

    def __post_init__(self) -> None:
        check_choice("placement", self.placement, PLACEMENTS)
        check_choice("non_linearity", self.non_linearity, ACTIVATIONS)
        check_choice("init", self.init, ("zeros", "random"))
        check_choice("adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)
        check_number("scaling", self.scaling, low=0, high=float("inf"))
        if self.bottleneck_size is not None:
            check_positive_int("bottleneck_size", self.bottleneck_size)
            self._set("reduction_factor", None)
        elif self.reduction_factor is None:
            raise ConfigError("one of `bottleneck_size` and `reduction_factor` must be set, got neither")
        else:
            check_number("reduction_factor", self.reduction_factor, low=1, high=float("inf"))
        self._set("target_modules", as_name_tuple("target_modules", self.target_modules, allow_string=True))
        self._set(
            "modules_to_save", as_name_tuple("modules_to_save", self.modules_to_save, allow_string=False)
        )

    def size_for(self, features: int) -> int:
        """m: ``bottleneck_size``, or the wrapped layer's output features / ``reduction_factor``."""
        return self.bottleneck_size or max(1, round(features / self.reduction_factor))


class Bottleneck(nn.Module):
    """One adapter: ``a(h) = U f(D h)`` with biases; ``D``: (m, in_features), ``U``: (out_features, m), starting
    at zero. ``output`` adds ``s · a(source)`` to the layer's output; the source is the layer's output (serial)
    or the sub-layer's input (parallel)."""

    file_prefix = "adapter"  # its tensors' keys in a checkpoint: adapter.down.weight, ...

    def __init__(self, in_features: int, out_features: int, config: BottleneckConfig, factory: dict) -> None:
        super().__init__()
        size = config.size_for(out_features)
        self.down = nn.Linear(in_features, size, **factory)
        self.activation = ACTIVATIONS[config.non_linearity]()
        self.up = nn.Linear(size, out_features, **factory)
        self.scaling = config.scaling
        self.parallel = config.placement == "parallel"
        if config.init == "zeros":
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.activation(self.down(h)))  # (..., out_features)

    def output(
        self, adapters: nn.ModuleDict, x: torch.Tensor, y: torch.Tensor, sub_layer_input
    ) -> torch.Tensor:
        """``y + s · a(source)``; ``x``: the layer's input, ``y``: its output (..., out_features),
        ``sub_layer_input``: the feed-forward sub-layer's input when a hook captured it, else None."""
        source = (x if sub_layer_input is None else sub_layer_input) if self.parallel else y
        return y + (self.scaling * self(source.to(self.down.weight.dtype))).to(y.dtype)


class BottleneckLayer(AdapterLayer):
    """Adapters around one linear layer. Serial: ``y = m(x)``, ``y + s·a(y)``. Parallel: ``y = m(x) + s·a(x')``
    where ``x'`` is the input of the sub-layer (this layer's own input, or the input of the sub-layer's first
    layer, captured by a hook, when the sub-layer spans several layers).

    Each entry of ``adapters`` computes the layer's new output from (x, y, x') with ``output``: a
    :class:`Bottleneck`, or a composition of them such as an AdapterFusion (:mod:`peftkit.methods.fusion`),
    which reads its members from the same ``adapters``. The layer itself knows no composition.
    """

    adapter_holders = ("adapters",)
    stack_order = 2  # reads the layer's output as the other methods' adapters leave it

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        self.source_features = self.in_features  # what a parallel adapter reads: this layer's input, or
        self.adapters = nn.ModuleDict()
        self._captured: torch.Tensor | None = None  # ... the sub-layer's, captured from its first layer
        self._hook = None

    def checkpoint_key(self, attribute: str, entry: nn.Module) -> str:
        return entry.file_prefix  # adapter.down.weight, fusion.query.weight, ...

    def read_input_of(self, module: nn.Module) -> None:
        """Parallel adapters here read ``module``'s input (the sub-layer's) instead of this module's.

        The hook goes on the plain layer under ``module``'s adapter wrappers, which stays in the model when
        another method's wrapper around it comes or goes (deleting a LoRA adapter removes its wrapper)."""
        if self._hook is None:
            plain = innermost(module)
            self.source_features = linear_features(plain)[0]
            self._hook = plain.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._captured = args[0] if args else next(iter(kwargs.values()))

    def unloaded(self, merge: bool) -> nn.Module:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        return super().unloaded(merge)

    def add_adapter(self, name: str, config: BottleneckConfig) -> None:
        reads = self.source_features if config.placement == "parallel" else self.out_features
        self.adapters[name] = Bottleneck(reads, self.out_features, config, self.factory(config.adapter_dtype))

    def factory(self, requested: str | None) -> dict:
        """Device and dtype of a new adapter's tensors here (see :func:`peftkit.layer.adapter_dtype`)."""
        return {"device": self.weight.device, "dtype": adapter_dtype(requested, self.base_layer)}

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        captured, self._captured = self._captured, None
        if self.routing is not None:
            return self._mixed_forward(x, y, captured)
        name = self.active_adapter
        if not self.runs(name):
            return y
        return self.adapters[name].output(self.adapters, x, y, captured)

    def _mixed_forward(self, x: torch.Tensor, y: torch.Tensor, captured: torch.Tensor | None) -> torch.Tensor:
        """Rows grouped by adapter: each adapter runs on its own rows (adapters differ in size)."""
        routing = self.routing
        routing.check_batch(y.shape[0], f"bottleneck adapter on {type(self.base_layer).__name__}")
        if torch.compiler.is_compiling():  # rows picked by a mask have a data-dependent count: no graph
            return self._mixed_forward_selected(x, y, captured)
        result = y.clone()
        for position, name in enumerate(routing.names):
            if self.runs(name):
                rows = routing.index == position
                rows_captured = captured[rows] if captured is not None else None
                result[rows] = self.adapters[name].output(self.adapters, x[rows], y[rows], rows_captured)
        return result

    def _mixed_forward_selected(self, x: torch.Tensor, y: torch.Tensor, captured: torch.Tensor | None):
        """The same rows as :meth:`_mixed_forward`, traceable by torch.compile: each adapter runs on the whole
        batch and every row keeps its own adapter's output (the adapters act on each token alone)."""
        routing, result = self.routing, y
        rows_view = (y.shape[0],) + (1,) * (y.dim() - 1)  # (batch, 1, ...): selects whole rows
        for position, name in enumerate(routing.names):
            if self.runs(name):
                rows = (routing.index == position).view(rows_view)
                result = torch.where(rows, self.adapters[name].output(self.adapters, x, y, captured), result)
        return result


def _supported(module: nn.Module) -> bool:
    return isinstance(innermost(module), LINEAR_TYPES)


def _positions(model: nn.Module, config: BottleneckConfig) -> tuple[str, ...]:
    """The architecture's position patterns for ``config.placement``, in the order adapters are added."""
    needs = {
        "houlsby": ("attention_output", "ffn_output"),
        "pfeiffer": ("ffn_output",),
        "parallel": ("ffn_input", "ffn_output"),
    }[config.placement]
    arch = architecture(
        model,
        needs,
        purpose=f"bottleneck adapters ({config.placement}) need `target_modules` for this model",
        remedy="`target_modules` (the linear layers that get an adapter)",
    )
    return tuple(arch.pattern(need) for need in needs)


def _sub_layer_inputs(targets: list[str], starts: list[str]) -> dict[str, str]:
    """For each feed-forward output layer, the first layer of the same sub-layer (longest common path)."""

    def shared(a: str, b: str) -> int:
        pairs = zip(a.split("."), b.split("."), strict=False)
        return next((i for i, (x, y) in enumerate(pairs) if x != y), min(a.count("."), b.count(".")) + 1)

    return {target: max(starts, key=lambda start: shared(target, start)) for target in targets}


def inject_bottleneck(model: nn.Module, name: str, config: BottleneckConfig) -> list[str]:
    def select(spec):
        return select_modules(
            model,
            target_modules=spec,
            modules_to_save=config.modules_to_save,
            supported=_supported,
            supported_text="nn.Linear, transformers Conv1D (an adapter sizes itself from the layer's features)",
        )

    inputs: dict[str, str] = {}
    if config.target_modules is not None:
        targets = select(config.target_modules)
    elif config.placement == "parallel":  # add at the sub-layer's output layer, read the input of its first
        ffn_input, ffn_output = _positions(model, config)
        targets = select(ffn_output)
        inputs = _sub_layer_inputs(targets, select(ffn_input))
    else:
        targets = [t for pattern in _positions(model, config) for t in select(pattern)]

    for path in targets:
        layer = find_or_wrap(model, path, BottleneckLayer, BottleneckLayer)
        if path in inputs:
            layer.read_input_of(model.get_submodule(inputs[path]))
        layer.add_adapter(name, config)
    return targets


register_method(
    Method(
        name="bottleneck",
        config_class=BottleneckConfig,
        inject=inject_bottleneck,
        trained_base_parameters=no_base_parameters,
        **native_file_format("PEFTKIT_BOTTLENECK", BottleneckConfig),
    )
)


declare_method(
    "bottleneck",
    "small bottleneck MLPs inserted after attention and / or feed-forward (Houlsby et al. 2019)",
    learning_rate=1e-3,
    options=(
        Option("placement", str, "pfeiffer", "where the adapters sit", choices=PLACEMENTS),
        Option("bottleneck_size", int, 32, "hidden width m of each adapter (d -> m -> d)"),
    ),
    build=lambda o, heads: BottleneckConfig(
        placement=o["placement"], bottleneck_size=o["bottleneck_size"], modules_to_save=heads or None
    ),
)
