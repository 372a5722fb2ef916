"""LoRA around a linear layer: ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2, weight stored transposed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.layer import AdapterLayer, adapter_dtype, innermost
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.dropout import dropout_linear, dropout_probability
from peftkit.methods.lora.fused import fused_lora_linear
from peftkit.methods.lora.init import LINEAR_INITIALISERS, initialise
from peftkit.methods.lora.stacking import padded_stack

_FUSABLE_BASES = (nn.Linear, Conv1D)  # exactly these types: a subclass (a quantized layer) computes otherwise


def _global_forward_hooks() -> bool:
    module = torch.nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


class LoraLinear(AdapterLayer):
    """``h = W0 x + b + s · B A dropout(x)`` for each named adapter (Hu et al. 2021, eq. 3).

    ``A`` is ``lora_A[name]`` (an ``nn.Linear(in, r)``, weight r x in), ``B`` is ``lora_B[name]`` (weight
    out x r); ``s`` is the config's scaling. Merging adds ``ΔW = s · B A`` to ``W0`` (transposed for
    ``Conv1D``, whose weight is in x out), after which the layer costs exactly what the base layer costs.

    In a mixed batch (``self.routing`` set) row ``b`` uses adapter ``names[index[b]]``: the A and B matrices
    of the batch's adapters are stacked (zero-padded to the largest rank, which adds exact zeros) and
    gathered per row, so the whole batch is two batched matmuls instead of a loop over sub-batches.

    Several active adapters (``set_adapter(["a", "b"])``) add their updates: ``h = W0 x + b + Σ_i s_i B_i A_i x``.

    With dropout, the backward keeps ``x`` and a boolean mask per layer, not each layer's dropped-out copy
    of ``x`` and its float mask (:mod:`peftkit.methods.lora.dropout`); the masks are ``nn.Dropout``'s.
    """

    combines_adapters = True
    adapter_holders = ("lora_A", "lora_B", "lora_dropout")  # AdapterLayer's bookkeeping reads these
    adapter_settings = ("scaling", "configured_scaling")

    def __init__(self, base_layer: nn.Linear | Conv1D) -> None:
        super().__init__()
        self.base_layer = base_layer
        plain = innermost(base_layer)
        self.transposed = isinstance(plain, Conv1D)
        # read from the layer, not its weight: a quantized layer stores its weight packed
        if self.transposed:
            self.in_features, self.out_features = plain.weight.shape
        else:
            self.in_features, self.out_features = plain.in_features, plain.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.configured_scaling: dict[str, float] = {}  # the config's s, which set_scale() multiplies
        self.adds_in_place = (
            True  # the update goes into the base output's own memory (see _add_scaled_product)
        )

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        dtype = adapter_dtype(config.adapter_dtype, self.base_layer)
        factory = {"device": self.base_layer.weight.device, "dtype": dtype}
        self.lora_A[name] = nn.Linear(self.in_features, config.r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(config.r, self.out_features, bias=False, **factory)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[name] = self.configured_scaling[name] = config.scaling
        initialise(
            LINEAR_INITIALISERS, self.lora_A[name].weight, self.lora_B[name].weight, config.init, config.r
        )
        self._forget_stacks()

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self._forget_stacks()

    def set_scale(self, name: str, factor: float) -> None:
        """Adapter ``name``'s update scaled by ``factor`` times the configured ``s`` (HF PEFT's set_scale)."""
        self.scaling[name] = factor * self.configured_scaling[name]
        self._forget_stacks()  # the stacks hold s·B

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s · B A`` in the base weight's layout: (out, in) for ``nn.Linear``, (in, out) for ``Conv1D``."""
        delta = self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)  # (out, in)
        return delta.T if self.transposed else delta

    def merge(self, name: str) -> None:
        """``W0 + ΔW`` summed in (at least) float32 and rounded once to the weight's dtype; the original weight
        is kept for an exact :meth:`unmerge` and never written into (it may be tied to another module)."""
        if name in self.merged_adapters:
            return
        plain = innermost(self.base_layer)
        with torch.no_grad():
            weight = plain.weight
            total = torch.promote_types(weight.dtype, torch.float32)
            self.put_merged(plain, "weight", weight.to(total) + self.delta_weight(name).to(total))
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if self.restore_unmerged():
            self.merged_adapters.clear()
            return
        plain = innermost(self.base_layer)  # merged without keeping the original: subtract (rounds)
        with torch.no_grad():
            while self.merged_adapters:
                plain.weight -= self.delta_weight(self.merged_adapters.pop()).to(plain.weight.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        running = self.running_adapters() if self.routing is None else ()
        if len(running) == 1 and not args and not kwargs and self._fusable(running[0], x):
            name, base = running[0], self.base_layer
            dropout_p = dropout_probability(self.lora_dropout[name], x)  # None: call the module itself
            return fused_lora_linear(
                x,
                x if dropout_p is not None else self.lora_dropout[name](x),
                base.weight,
                base.bias,
                self.lora_A[name].weight,
                self.lora_B[name].weight,
                self.scaling[name],
                self.transposed,
                dropout_p or 0.0,
            )
        result = self.base_layer(x, *args, **kwargs)
        if self.routing is not None:
            return self._mixed_forward(x, result)
        out_dtype = result.dtype
        in_place = self.adds_in_place and len(running) == 1 and not torch.compiler.is_compiling()
        for name in running:  # several active adapters: their updates add up (as in HF PEFT)
            weight_A, weight_B = self.lora_A[name].weight, self.lora_B[name].weight
            hidden = dropout_linear(x, weight_A, self.lora_dropout[name])  # (..., r)
            result = _add_scaled_product(result, hidden, weight_B, self.scaling[name], in_place)
        return result if result.dtype == out_dtype else result.to(out_dtype)

    def _fusable(self, name: str | None, x: torch.Tensor) -> bool:
        """Whether one adapter runs on a frozen plain base in a way :func:`fused_lora_linear` computes exactly:
        one dtype, no autocast, nothing hooked to the base layer (a hook there, such as a parallel bottleneck
        adapter reading its input, must still see the call). Not under ``torch.compile``: inductor fuses the
        plain ops' backward far better than it compiles the node's hand-written one (a compiled step at 0.49x
        of eager against 0.83x, benchmarks/results/compile_step.md), and the numbers are the same."""
        if name is None or name not in self.lora_A or name in self.merged_adapters:
            return False
        if torch.compiler.is_compiling():
            return False
        base = self.base_layer
        return (
            type(base) in _FUSABLE_BASES
            and not base.weight.requires_grad
            and x.dtype == base.weight.dtype == self.lora_A[name].weight.dtype
            and (x.is_meta or not torch.is_autocast_enabled(x.device.type))  # autocast knows no meta
            and not (base._forward_hooks or base._forward_pre_hooks or _global_forward_hooks())
        )

    def _mixed_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        routing = self.routing
        stacks = self._row_stacks(routing)
        if stacks is None:
            return result
        rows_A, rows_B = stacks  # (batch, in, r_max), (batch, r_max, out): row b's A^T and s·B^T
        routing.check_batch(x.shape[0], f"LoraLinear({self.in_features}->{self.out_features})")
        xb = x.to(rows_A.dtype).reshape(x.shape[0], -1, self.in_features)  # (batch, tokens, in)
        hidden = torch.bmm(xb, rows_A)  # (batch, tokens, r_max)
        batched = result.reshape(x.shape[0], -1, self.out_features)  # (batch, tokens, out)
        in_place = self.adds_in_place and not torch.compiler.is_compiling()
        update = _add_scaled_product(batched, hidden, rows_B, 1.0, in_place)
        return update.reshape(result.shape).to(result.dtype)

    def _row_stacks(self, routing) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every row's adapter matrices, gathered from :meth:`_stacks` into the contiguous layouts ``bmm`` and
        ``baddbmm_`` read fastest, and kept while the batch's rows keep their adapters (a decode loop reuses
        them every step). At one token per row the gather and a strided ``baddbmm_`` operand cost more than
        the adapters' products themselves; gathering once per batch composition removes both."""
        stacks = self._stacks(routing.names)
        if stacks is None:
            return None
        stack_A, stack_B = stacks  # (n, r_max, in), (n, out, r_max) with each B already scaled by its s
        rows = routing.index
        if torch.compiler.is_compiling():  # the gather joins the graph; the key below reads the rows' data
            return _gathered(stack_A, stack_B, rows)
        kept = self.__dict__.get("_stack_cache")
        is_kept = kept is not None and kept[2][0] is stack_A  # not kept while they train: nor is this
        key = (stack_A, tuple(rows.tolist()))  # the kept stacks themselves (compared by `is`), the rows
        cached = self.__dict__.get("_row_cache")
        if is_kept and cached is not None and cached[0][0] is stack_A and cached[0][1] == key[1]:
            return cached[1]
        gathered = _gathered(stack_A, stack_B, rows)
        if is_kept:
            self.__dict__["_row_cache"] = (key, gathered)
        return gathered

    def _stacks(self, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The batch's adapters stacked for gathering, rebuilt only when an adapter changed: parameters'
        version counters move with every in-place update (optimizer steps, loads); adding or deleting an
        adapter or changing a scale forgets the stacks; while the adapters train nothing is kept. The check is
        a few integer comparisons per adapter: it runs in every layer at every decode step."""
        compiling = torch.compiler.is_compiling()  # a compiled graph rebuilds them: no Python-side cache
        kept = None if compiling else self.__dict__.get("_stack_cache")
        merged = tuple(self.merged_adapters)
        if (
            kept is not None
            and kept[0] == (names, merged)
            and all(parameter._version == version for parameter, version in kept[1])
            # stacks kept from a pass without gradients carry no graph: a pass that trains stacks afresh
            and not (torch.is_grad_enabled() and any(parameter.requires_grad for parameter, _ in kept[1]))
        ):
            return kept[2]
        live = [n for n in names if n in self.lora_A and n not in merged]  # self.runs(n)
        if not live:
            return None
        weights = {n: (self.lora_A[n].weight, self.lora_B[n].weight, self.scaling[n]) for n in live}
        stack_A, stack_B = padded_stack(
            names,
            weights.get,
            a_shape=(self.in_features,),
            b_shape=(self.out_features,),
            like=weights[live[0]][0],
        )
        keep = not (
            compiling or (torch.is_grad_enabled() and stack_A.requires_grad)
        )  # graphs die with a step
        if keep:
            versions = [(p, p._version) for a, b, _ in weights.values() for p in (a, b)]
            self.__dict__["_stack_cache"] = ((names, merged), versions, (stack_A, stack_B))
        return stack_A, stack_B

    def _forget_stacks(self) -> None:
        """A new adapter under an old name has fresh parameters whose version counters may equal the old
        ones': the kept stacks must not be taken for its."""
        self.__dict__.pop("_stack_cache", None)
        self.__dict__.pop("_row_cache", None)


def _gathered(
    stack_A: torch.Tensor, stack_B: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``b``'s A^T (batch, in, r_max) and s·B^T (batch, r_max, out), contiguous for ``bmm``."""
    return stack_A[rows].transpose(1, 2).contiguous(), stack_B[rows].transpose(1, 2).contiguous()


def _add_scaled_product(
    result: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, scale: float, in_place: bool = True
) -> torch.Tensor:
    """``result + scale · hidden @ B^T`` (``weight`` is ``B``, (out, r)) or, batched, ``result + scale · hidden
    @ weight`` (``weight`` (batch, r, out)), accumulated into ``result`` in one fused pass when it can be.

    The base layer's output is fresh and its backward does not need it, so adding in place is safe for
    autograd and saves a temporary and two passes over the (tokens x out) output: that is most of the cost
    of an unmerged adapter beyond its two thin matmuls. ``in_place=False`` where the base output may be a view
    that a custom autograd node returned, which autograd forbids modifying in place, and under
    ``torch.compile``: functionalizing the in-place add puts copies and strided scatters into the backward
    graph (about 8 more aten ops per layer than the plain ops), while inductor fuses the out-of-place add
    into the product's epilogue by itself.

    Out of place, the sum is in the promoted dtype (a bf16 output plus a float32 update is float32) and the
    caller rounds it once to the output's dtype, as HF PEFT does: ``result + F.linear(hidden, B) * s``,
    op for op.
    """
    batched = weight.dim() == 3
    if in_place and result.dtype == hidden.dtype == weight.dtype and result.is_contiguous():
        if batched:  # (batch, tokens, r) @ (batch, r, out)
            result.baddbmm_(hidden, weight, alpha=scale)
        else:  # (tokens, r) @ (r, out)
            result.view(-1, result.shape[-1]).addmm_(
                hidden.reshape(-1, hidden.shape[-1]), weight.T, alpha=scale
            )
        return result
    product = hidden @ weight if batched else F.linear(hidden, weight)
    return result + product * scale
