"""One training step simulated on the meta device: the bytes alive at each moment, without computing anything.

:class:`LiveBytes` is a ``TorchDispatchMode`` that sees every tensor an operator creates (forward, loss and
backward alike, autograd's saved tensors included) and counts its storage from creation until the storage is
freed (a weak reference to the storage, which torch keeps as long as any tensor, view or saved variable
holds it). The running total and its maximum are a simulated allocator's: what a caching allocator with no
fragmentation would hold above the weights. Views and in-place results share a storage and add nothing.

The model runs exactly the code it runs in training (transformers' forward and loss, peftkit's adapter
layers, gradient checkpointing's recomputation), so what each method saves for the backward is measured,
not modelled: LoRA's thin ``x A^T``, prompt methods' longer sequences, layer tuning's frozen lower layers
that autograd never records.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.fx.experimental._config
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_SCALAR = torch.ops.aten._local_scalar_dense.default


class TraceError(RuntimeError):
    """The model's forward asks for a value that only real data has (a data-dependent branch)."""


# glibc's malloc serves blocks up to its largest mmap threshold (32 MiB on 64-bit) from its heap, where freed
# ones stay resident; larger blocks get their own mapping, returned when freed
HEAP_BLOCK = 32 * 2**20


class LiveBytes(TorchDispatchMode):
    """``live``: bytes of the storages alive now; ``peak``: its maximum; ``small_at_peak``: the part of the
    peak held in storages of at most :data:`HEAP_BLOCK` bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.small = 0
        self.small_at_peak = 0
        self._counted: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _SCALAR:
            return self._scalar(args[0])
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._count(tensor.untyped_storage())
        return out

    def ignore(self, tensors) -> None:
        """Storages that exist already (weights, inputs): views of them allocate nothing."""
        for tensor in tensors:
            self._counted.setdefault(tensor.untyped_storage(), 0)

    def _count(self, storage) -> None:
        if storage in self._counted:
            return
        size = storage.nbytes()
        self._counted[storage] = size
        self.live += size
        self.small += size if size <= HEAP_BLOCK else 0
        if self.live > self.peak:
            self.peak, self.small_at_peak = self.live, self.small
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size
        self.small -= size if size <= HEAP_BLOCK else 0

    @staticmethod
    def _scalar(tensor: torch.Tensor):
        # transformers asks "is the attention mask all ones?" / "are the sequences unpacked?": with the full
        # rows a plan is for, the answer is yes. A numeric value cannot be guessed.
        if tensor.dtype == torch.bool:
            return True
        raise TraceError(
            f"the forward reads a {tensor.dtype} value from a tensor ({tuple(tensor.shape)}), which a model on "
            "the meta device does not have"
        )


@dataclass(frozen=True)
class StepTrace:
    """Bytes above the model's own parameters during one forward + backward (optimizer step excluded).

    ``activations``: alive when the model body ends (before the output head): what the forward keeps for the
    backward. ``logits``: what the head and the loss add on top (logits, their fp32 copy, the log-softmax the
    cross-entropy keeps). ``peak``: the maximum over the whole step, backward included (where gradients,
    the gradient of the logits and a checkpointed layer's recomputation appear). ``gradients``: alive at
    the end of the backward (the trainable parameters' ``.grad``).
    """

    activations: int
    logits: int
    peak: int
    gradients: int
    small_at_peak: int = 0  # the part of ``peak`` in storages of at most HEAP_BLOCK bytes


def trace_step(model: nn.Module, head: nn.Module | None, inputs: dict[str, torch.Tensor]) -> StepTrace:
    """Run ``model(**inputs).loss.backward()`` on meta tensors under :class:`LiveBytes`.

    ``head`` is the module whose call ends the body (the LM head or classifier); None: the body's end is
    taken as the forward's end. Raises :class:`TraceError` when the forward needs real values.
    """
    marks: dict[str, int] = {}
    tracker = LiveBytes()
    tracker.ignore([*model.parameters(), *model.buffers(), *inputs.values()])

    def mark(*_):
        marks.setdefault("body", tracker.live)  # the first call (T5 ties nothing, but stay safe)

    handle = head.register_forward_pre_hook(mark) if head is not None else None
    # torch.nonzero has no size on meta tensors; with full rows every entry it is asked about is set
    # (DeBERTa's classification loss asks which labels are >= 0)
    nonzero = torch.fx.experimental._config.patch(meta_nonzero_assume_all_nonzero=True)
    try:
        with tracker, nonzero:
            output = model(**inputs)
            marks["forward"] = tracker.live
            output.loss.backward()
            del output
            gradients = tracker.live
    except TraceError:
        raise
    except (NotImplementedError, RuntimeError) as error:  # an operator with no meta kernel, say
        raise TraceError(f"{type(error).__name__}: {error}") from error
    finally:
        if handle is not None:
            handle.remove()
    body = min(marks.get("body", marks["forward"]), marks["forward"])  # the body's end can free more
    return StepTrace(
        activations=body,
        logits=marks["forward"] - body,
        peak=tracker.peak,
        gradients=gradients,
        small_at_peak=tracker.small_at_peak,
    )
