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

import itertools
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
        self.samples: list[tuple[int, int]] = []  # (live, small) after every allocation, in order
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
        self.samples.append((self.live, self.small))
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
    backward. ``logits``: what the head and the loss add on top (negative where they free more than they
    keep: the fused loss frees the hidden states; else the logits, their fp32 copy, the log-softmax the
    cross-entropy keeps). ``gradients``: alive at the end of the backward (the trainable parameters'
    ``.grad``). ``phase_peaks``: ``(peak, small)`` of each phase of the step (:func:`_phase_peaks`), where
    ``small`` is the part of that peak in storages of at most :data:`HEAP_BLOCK` bytes. The step's peak is
    their maximum; they are kept apart because each grows linearly with depth at its own rate (the
    backward's start holds every layer's activations, its end every layer's gradients), so a deep model's
    peak is extrapolated phase by phase, not as one maximum whose place in the step moves with depth.
    """

    activations: int
    logits: int
    gradients: int
    phase_peaks: tuple[tuple[int, int], ...]

    @property
    def peak(self) -> int:
        """The maximum over the whole step, backward included (gradients, the gradient of the logits and a
        checkpointed layer's recomputation appear there)."""
        return max(peak for peak, _ in self.phase_peaks)

    @property
    def small_at_peak(self) -> int:
        """The part of :attr:`peak` in storages of at most :data:`HEAP_BLOCK` bytes."""
        return max(self.phase_peaks)[1]


def trace_step(
    model: nn.Module,
    head: nn.Module | None,
    inputs: dict[str, torch.Tensor],
    fused_loss: bool = False,
    layers: list[nn.Module] = (),
) -> StepTrace:
    """Run ``model(**inputs).loss.backward()`` on meta tensors under :class:`LiveBytes`.

    ``head`` is the module whose call ends the body (the LM head or classifier); None: the body's end is
    taken as the forward's end. ``fused_loss``: the loss is ``peftkit train``'s fused linear cross-entropy
    (:func:`~peftkit.losses.language_model.fused_training_loss`), which bypasses the head: the body then
    ends where the model returns its hidden states. ``layers``: the model's transformer layers, whose
    backward's start cuts the backward into phases (``StepTrace.phase_peaks``). Raises :class:`TraceError`
    when the forward needs real values.
    """
    marks: dict[str, int] = {}
    tracker = LiveBytes()
    tracker.ignore([*model.parameters(), *model.buffers(), *inputs.values()])

    def mark(*_):
        marks.setdefault("body", tracker.live)  # the first call (T5 ties nothing, but stay safe)
        marks.setdefault("body_sample", len(tracker.samples))

    handles = [head.register_forward_pre_hook(mark)] if head is not None else []
    layer_starts: list[int] = []  # sample index at which each layer's backward starts
    handles += [
        layer.register_forward_hook(_backward_start_recorder(tracker, layer_starts)) for layer in layers
    ]
    # torch.nonzero has no size on meta tensors; with full rows every entry it is asked about is set
    # (DeBERTa's classification loss asks which labels are >= 0)
    nonzero = torch.fx.experimental._config.patch(meta_nonzero_assume_all_nonzero=True)
    try:
        with tracker, nonzero:
            loss = _fused_loss(model, inputs, mark) if fused_loss else model(**inputs).loss
            marks["forward"] = tracker.live
            backward_start = len(tracker.samples)
            loss.backward()
            del loss
            gradients = tracker.live
    except TraceError:
        raise
    except (NotImplementedError, RuntimeError) as error:  # an operator with no meta kernel, say
        raise TraceError(f"{type(error).__name__}: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
    body = marks.get("body", marks["forward"])
    return StepTrace(
        activations=body,
        logits=marks["forward"] - body,  # < 0 where the loss frees more than it keeps (the fused loss)
        gradients=gradients,
        phase_peaks=_phase_peaks(
            tracker.samples, marks.get("body_sample", backward_start), backward_start, layer_starts
        ),
    )


def _backward_start_recorder(tracker: LiveBytes, starts: list[int]):
    """A forward hook that marks, on the layer's output, the moment the backward reaches it: the gradient of
    a layer's output is complete exactly when that layer's backward begins. Once per layer: a checkpointed
    layer's recomputation calls the hook again, on an output the backward never reaches."""
    hooked: set[int] = set()

    def hook(module, args, output):
        tensor = next((t for t in tree_leaves(output) if isinstance(t, torch.Tensor)), None)
        if id(module) in hooked or tensor is None or not tensor.requires_grad:
            return
        hooked.add(id(module))
        tensor.register_hook(lambda grad: starts.append(len(tracker.samples)))

    return hook


def _phase_peaks(
    samples: list[tuple[int, int]], body_end: int, backward_start: int, layer_starts: list[int]
) -> tuple[tuple[int, int], ...]:
    """The largest ``(live, small)`` sample of each phase: the model's body, its head with the loss (which may
    free what the body held, such as a key/value cache: a slope of its own), the backward up to the top layer
    (head and loss), the top layer's backward, the second's, the third's, the middle layers', the
    second-to-lowest layer's, the lowest layer's with what follows it (embeddings). In a stack of identical
    layers each phase peaks at the same place at every depth (the middle one at one of its ends, which end
    depending on whether a layer's activations or its gradients weigh more), so each grows linearly with
    depth. With fewer than 4 layers in the backward (layer tuning's trained top layers), the phases are the
    body, the loss and the whole backward."""
    starts = sorted(layer_starts)
    if len(starts) < 4:
        cuts = [0, body_end, backward_start, len(samples)]
    else:
        cuts = [0, body_end, backward_start, *starts[:3], starts[-2], starts[-1], len(samples)]
    return tuple(max(samples[a:b], default=(0, 0)) for a, b in itertools.pairwise(cuts))


def _fused_loss(model: nn.Module, inputs: dict[str, torch.Tensor], mark) -> torch.Tensor:
    from peftkit.losses.language_model import fused_training_loss

    def forward(**kwargs):
        output = model(**kwargs)
        mark()  # the hidden states are out: what follows is the loss's
        return output

    return fused_training_loss(forward, model, inputs)
