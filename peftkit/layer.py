"""The contract every adapter-carrying module follows, and the per-row routing of a mixed batch.

An :class:`AdapterLayer` wraps one base module and holds any number of named adapters for it. The
:class:`~peftkit.model.PeftModel` drives the whole model only through this contract: which adapter is
active, merge / unmerge, the adapter's tensors for a checkpoint, delete. Methods add their own layer types;
nothing generic knows about a particular method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from peftkit.module_paths import replace_module

BASE_ROW = "__base__"  # in a mixed batch, a row that runs through the base model alone (as in HF PEFT)
HALF_DTYPES = (torch.float16, torch.bfloat16)
ADAPTER_DTYPES = (None, "float32", "bfloat16", "float16")  # what a config's `adapter_dtype` may say


def adapter_dtype(requested: str | torch.dtype | None, base: nn.Module) -> torch.dtype:
    """The dtype of a new adapter's trainable tensors on the base layer ``base``: every method asks here.

    ``requested`` (a config's ``adapter_dtype``: a name such as ``"bfloat16"`` or a torch dtype) wins.
    Otherwise float32 when the base weight is half precision (fp16 / bf16) or quantized (integer codes,
    e.g. bitsandbytes 4-bit), and the base weight's own dtype when it is float32 or float64.

    Why float32: an AdamW step of lr 1e-4 is below half a unit in the last place of most bf16 values (8
    significant bits), so a bf16 adapter rounds most of its updates away; fp16 gradients cannot be unscaled
    by ``torch.amp.GradScaler``. Hugging Face PEFT does the same since its PR #1706 (``autocast_adapter_dtype``).
    The base layer's output keeps its dtype: the update is computed in the adapter's dtype and the sum
    rounded once to the output's dtype.
    """
    if requested is not None:
        return getattr(torch, requested) if isinstance(requested, str) else requested
    weight = getattr(innermost(base), "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dtype in HALF_DTYPES:
        return torch.float32
    if hasattr(weight, "quant_state"):  # bitsandbytes 4-bit codes stored in a float dtype (quant_storage)
        return torch.float32
    return weight.dtype


class AdapterError(ValueError):
    """An adapter operation that cannot be carried out as asked (unknown name, merged state, ...)."""


@dataclass(frozen=True)
class Routing:
    """Which adapter each row of a mixed batch uses.

    ``names`` are the distinct adapter names of the batch, ``index[b]`` is the position in ``names`` of row
    ``b``'s adapter. A layer that has no adapter of a given name leaves those rows on the base layer.
    """

    names: tuple[str, ...]
    index: torch.Tensor  # (batch,) int64

    @staticmethod
    def from_row_names(row_names: Sequence[str], device: torch.device) -> Routing:
        names = tuple(dict.fromkeys(row_names))
        position = {name: i for i, name in enumerate(names)}
        index = torch.tensor([position[name] for name in row_names], dtype=torch.long, device=device)
        return Routing(names=names, index=index)

    def check_batch(self, batch: int, layer: str) -> None:
        if batch != len(self.index):
            raise ValueError(
                f"mixed batch: `adapter_names` has {len(self.index)} entries but layer {layer} sees a batch of "
                f"{batch} rows; give one adapter name per row of the input batch"
            )


@contextlib.contextmanager
def routed(layers: Sequence[AdapterLayer], routing: Routing) -> Iterator[None]:
    """Every layer of ``layers`` routes its rows by ``routing`` for the passes run inside; none after."""
    for layer in layers:
        layer.routing = routing
    try:
        yield
    finally:
        for layer in layers:
            layer.routing = None


class AdapterLayer(nn.Module):
    """Base of every module that carries named adapters around one wrapped base module.

    State kept here, the same for every method: the active adapters (none when adapters are disabled; several
    only for layers with ``combines_adapters``), the adapters merged into the base weights, the base tensors
    as they were before merging (see :meth:`put_merged`), and the routing of a mixed batch while one runs.
    """

    # Whether several adapters of this layer can be active at once, their effects combined (LoRA: the updates
    # add up, as in HF PEFT). A layer that leaves this False is only ever given one active adapter.
    combines_adapters = False

    def __init__(self) -> None:
        super().__init__()
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: list[str] = []
        self.routing: Routing | None = None
        # (id(owner), attribute) -> (owner, attribute, the parameter before the first merge): see put_merged
        self._unmerged: dict[tuple[int, str], tuple[nn.Module, str, torch.Tensor]] = {}
        self.keeps_unmerged = True  # False while merging only to unload: nothing to restore afterwards

    @property
    def active_adapter(self) -> str | None:
        """The active adapter this layer runs (``None`` when adapters are off). When several are active, the
        first that this layer has: a layer without ``combines_adapters`` is never given two of its own."""
        active = self.active_adapters
        if len(active) <= 1:
            return active[0] if active else None
        present = self.adapter_names()
        return next((name for name in active if name in present), active[0])

    @active_adapter.setter
    def active_adapter(self, name: str | None) -> None:
        self.active_adapters = () if name is None else (name,)

    # --- per-adapter bookkeeping, written once from the holders a layer class declares ----------------------
    # `adapter_holders`: attributes (nn.ModuleDict / nn.ParameterDict keyed by adapter name) whose entries are an
    # adapter's trained tensors; the first one says which adapters the layer has. `adapter_settings`: plain
    # dicts keyed by adapter name (scalings, flags). `base_layer_name`: the attribute holding the wrapped module.
    # (Hugging Face PEFT's `adapter_layer_names` / `other_param_names`.)
    adapter_holders: tuple[str, ...] = ()
    adapter_settings: tuple[str, ...] = ()
    base_layer_name = "base_layer"
    # Where this layer sits when several methods wrap one module (see find_or_wrap): a wrapper of a higher
    # order goes around one of a lower order. 0: changes the weight (LoRA), 1: rescales the layer (IA3),
    # 2: acts on the layer's input or output (bottleneck adapters), 3: holds virtual tokens at the input
    # embedding and leaves its output alone (prompt methods).
    stack_order = 0

    def base(self) -> nn.Module:
        """The wrapped module, untouched by adapters that are not merged."""
        return getattr(self, self.base_layer_name)

    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.adapter_holders[0]).keys())

    def delete_adapter(self, name: str) -> None:
        for attribute in self.adapter_holders + self.adapter_settings:
            holder = getattr(self, attribute)
            if name in holder:
                del holder[name]

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        for _, entry in self._entries(name):
            if isinstance(entry, nn.Parameter):
                yield entry
            else:
                yield from entry.parameters()

    def checkpoint_key(self, attribute: str, entry: nn.Module | nn.Parameter) -> str:
        """The key prefix of a holder's tensors in a checkpoint: the holder's name (HF PEFT's layout, e.g.
        ``lora_A.weight``); ``""`` puts the entry's own keys at the top."""
        return attribute

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors, keyed relative to this module in the Hugging Face PEFT layout."""
        tensors = {}
        for attribute, entry in self._entries(name):
            key = self.checkpoint_key(attribute, entry)
            if isinstance(entry, nn.Parameter):
                tensors[key] = entry
            else:
                for inner, tensor in entry.state_dict(keep_vars=True).items():
                    tensors[f"{key}.{inner}" if key else inner] = tensor
        return tensors

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (keys as :meth:`adapter_state_dict` gives them) into the adapter, in place.

        Raises ``ValueError`` naming missing and unexpected keys (nothing is copied then) or a shape mismatch.
        """
        own = self.adapter_state_dict(name)
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"adapter {name!r} of {type(self).__name__}: missing {missing}, unexpected {unexpected}"
            )
        wrong = [
            f"{k}: {tuple(tensors[k].shape)} for {tuple(v.shape)}"
            for k, v in own.items()
            if v.shape != tensors[k].shape
        ]
        if wrong:
            raise ValueError(f"adapter {name!r} of {type(self).__name__}: shape mismatch {wrong}")
        with torch.no_grad():
            for key, target in own.items():
                target.copy_(tensors[key])

    def _entries(self, name: str) -> Iterator[tuple[str, nn.Module | nn.Parameter]]:
        for attribute in self.adapter_holders:
            holder = getattr(self, attribute)
            if name in holder:
                yield attribute, holder[name]

    def merge(self, name: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights")

    def unmerge(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weights")

    def unloaded(self, merge: bool) -> nn.Module:
        """The module that replaces this wrapper when adapters are removed from the model."""
        if merge:
            self.keeps_unmerged = False
            for name in self.active_adapters:
                if name in self.adapter_names():
                    self.merge(name)
        return self.base()

    # --- merging that can be undone exactly (shared by every method that merges) ---------------------------
    def put_merged(self, owner: nn.Module, attribute: str, value: torch.Tensor) -> None:
        """Make ``value`` (a merged tensor) ``owner.<attribute>``, as a new frozen parameter of the old dtype.

        The old tensor is never written into: a tied tensor (GPT-2's ``lm_head`` shares ``wte``'s weight)
        keeps its value for the other modules that use it, so a merged model computes what the unmerged one
        did. Before the first merge the old parameter is kept (unless ``keeps_unmerged`` is False), and
        :meth:`restore_unmerged` puts it back: unmerging then restores the exact original bits, which
        subtracting the update again cannot do in a rounding dtype (in bf16 it changes about a quarter of the
        weights). Memory: one copy of each merged tensor while merged.
        """
        old = getattr(owner, attribute)
        key = (id(owner), attribute)
        if self.keeps_unmerged and key not in self._unmerged:
            self._unmerged[key] = (owner, attribute, old)
        merged = nn.Parameter(value.to(device=old.device, dtype=old.dtype), requires_grad=old.requires_grad)
        setattr(owner, attribute, merged)

    def restore_unmerged(self) -> bool:
        """Put back every tensor :meth:`put_merged` replaced, bit for bit; False when none was kept (the
        caller then undoes its merge by computation)."""
        if not self._unmerged:
            return False
        for owner, attribute, old in self._unmerged.values():
            setattr(owner, attribute, old)
        self._unmerged.clear()
        return True

    # --- shared behaviour --------------------------------------------------------------------------------
    # Model code reads its layers' tensors directly (T5 checks `self.wo.weight.dtype`, tied embeddings share
    # `weight`): a wrapper shows the wrapped module's.
    @property
    def weight(self) -> torch.Tensor:
        return self.base().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base(), "bias", None)

    def running_adapters(self) -> tuple[str, ...]:
        """The active adapters that add their update in the forward pass (present here, not merged)."""
        return tuple(name for name in self.active_adapters if self.runs(name))

    def runs(self, name: str | None) -> bool:
        """Whether adapter ``name`` adds its update in the forward pass (it exists here and is not merged)."""
        return name is not None and name in self.adapter_names() and name not in self.merged_adapters


def unwrap(module: nn.Module) -> nn.Module:
    return module.base() if isinstance(module, AdapterLayer) else module


def added_parameter_ids(model: nn.Module) -> set[int]:
    """Parameters that exist only because of adapters: their small matrices, their trained module copies."""
    return {
        id(p)
        for module in model.modules()
        if isinstance(module, AdapterLayer)
        for name in module.adapter_names()
        for p in module.adapter_parameters(name)
    }


def base_parameter_names(model: nn.Module) -> list[str]:
    """Names of the model's own parameters (tied ones once), without those adapters added, as the model
    without adapter wrappers names them (see :func:`plain_paths`)."""
    added = added_parameter_ids(model)
    return [name for name, p in plain_named_parameters(model) if id(p) not in added]


def plain_paths(model: nn.Module, adapter: str | None = None) -> dict[str, str]:
    """Every module path of ``model`` -> its path in the model that carries adapter ``adapter`` alone (``None``:
    no adapter), i.e. without the wrappers that do not hold ``adapter``.

    Such a wrapper stands in the place of the module it wraps, so what it wraps is named as the wrapper is:
    with IA3 around LoRA around ``v_proj``, the LoRA layer at ``v_proj.base_layer`` is ``v_proj`` and its
    ``v_proj.base_layer.lora_A`` is ``v_proj.lora_A``. For the LoRA adapter the LoRA wrapper stays: the bias
    it wraps is ``v_proj.base_layer.bias``, HF PEFT's key for a bias that LoRA's ``bias="all"`` trains.
    Checkpoint keys are built from these paths, so an adapter's file does not depend on which other adapters
    the model carries."""
    paths: dict[str, str] = {}

    def walk(module: nn.Module, path: str, plain: str) -> None:
        paths[path] = plain
        unheld = isinstance(module, AdapterLayer) and adapter not in module.adapter_names()
        for name, child in module.named_children():
            wrapped = unheld and name == module.base_layer_name
            walk(child, _join(path, name), plain if wrapped else _join(plain, name))

    walk(model, "", "")
    return paths


def plain_named_parameters(
    model: nn.Module, adapter: str | None = None
) -> Iterator[tuple[str, nn.Parameter]]:
    """``model.named_parameters()`` (tied ones once) under their names in the model that carries ``adapter``
    alone (``None``: no adapter; see :func:`plain_paths`)."""
    paths = plain_paths(model, adapter)
    for name, parameter in model.named_parameters():
        owner, _, tensor = name.rpartition(".")
        yield _join(paths[owner], tensor), parameter


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def innermost(module: nn.Module) -> nn.Module:
    """The plain module under any chain of adapter wrappers (IA3 around LoRA around an nn.Linear, ...)."""
    while isinstance(module, AdapterLayer):
        module = module.base()
    return module


def wrapper_in_chain(module: nn.Module, wrapper: type[AdapterLayer]) -> AdapterLayer | None:
    """The ``wrapper`` among ``module`` and the adapter layers it wraps, if there is one."""
    while isinstance(module, AdapterLayer):
        if isinstance(module, wrapper):
            return module
        module = module.base()
    return None


def find_or_wrap(model: nn.Module, path: str, wrapper: type[AdapterLayer], make) -> AdapterLayer:
    """The ``wrapper`` already somewhere in the chain of wrappers at ``path``, or a new one (``make(module)``),
    so that every method keeps one wrapper per layer however many adapters it adds.

    A new wrapper goes inside every wrapper of a higher ``stack_order`` and around the rest: the nesting
    depends on which methods a layer carries, never on the order they were added or loaded in, so adapters of
    several methods active at once compose the same way every time (a bottleneck adapter reads the output of
    IA3's ``l ⊙ ((W + s·BA) x + b)``)."""
    outer = model.get_submodule(path)
    found = wrapper_in_chain(outer, wrapper)
    if found is not None:
        return found
    owner, module = None, outer
    while isinstance(module, AdapterLayer) and module.stack_order > wrapper.stack_order:
        owner, module = module, module.base()
    new = make(module)
    if owner is None:
        replace_module(model, path, new)
    else:
        setattr(owner, owner.base_layer_name, new)
    return new
