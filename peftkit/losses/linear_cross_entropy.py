"""Fused linear cross-entropy: the language-model loss from hidden states and the LM head's weight, without
ever materialising the ``(tokens, vocabulary)`` logits.

The ordinary loss builds ``logits = hidden @ weight.T`` for every token (batch x tokens x vocabulary, in fp32,
plus its softmax and its gradient: for SmolLM2's 49,152-word vocabulary and 8 x 256 tokens that is 400 MB
per copy), then takes the cross-entropy. Here the tokens are processed in chunks of rows; for each chunk the
forward pass computes the logits, their log-sum-exp, the loss and at once the gradient of the loss with
respect to the chunk's hidden states and to the head's weight (and bias), then frees the chunk. Only the
hidden-sized and weight-sized gradients are kept; backward merely scales them by ``grad_output``. Nothing is
recomputed. This is the scheme of Liger Kernel's ``FusedLinearCrossEntropy`` (Hsu et al. 2024,
arXiv:2410.10989); Cut Cross-Entropy (Wijmans et al. 2024, arXiv:2411.09009) goes further on GPUs with
custom kernels. Rows whose label is ``ignore_index`` (prompt and padding tokens) are dropped before the
matrix products, so instruction data with long prompts costs only its response tokens.

On CUDA, where ``cut_cross_entropy`` or ``liger_kernel`` is importable, :func:`linear_cross_entropy` hands
the work to them (``backend="auto"``); neither is a dependency of peftkit.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch
import torch.nn.functional as F

from peftkit.config import ConfigError

IGNORE_INDEX = -100
BACKENDS = ("auto", "peftkit", "cut_cross_entropy", "liger")
REDUCTIONS = ("mean", "sum")
# Bytes of one chunk's fp32 logits: large enough for efficient matrix products, small next to the full logits.
DEFAULT_CHUNK_BYTES = 64 * 2**20
# Devices torch.autocast accepts (the meta device, on which `peftkit plan` traces a step, is not one).
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla")

__all__ = [
    "BACKENDS",
    "IGNORE_INDEX",
    "available_backend",
    "linear_cross_entropy",
    "shift_labels",
]


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Causal-LM targets: position ``t`` is scored on the token at ``t + 1``; the last position on nothing.

    ``labels`` ``(batch, seq)`` -> ``(batch, seq)``: ``labels[:, 1:]`` followed by one ``ignore_index``, as
    transformers' ``ForCausalLMLoss`` does, so the hidden states need no slicing (no copy).
    """
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, labels)`` without the full logits.

    - ``hidden``: ``(..., hidden_size)`` (e.g. ``(batch, seq, hidden)``), any float dtype;
    - ``weight``: ``(vocab, hidden_size)``, the LM head's (which may be tied to the input embedding: its
      gradient then adds to the embedding's); a weight that does not require grad gets none computed;
    - ``labels``: ``hidden.shape[:-1]``, integer class indices in ``[0, vocab)`` or ``ignore_index``; for a
      causal LM pass :func:`shift_labels` of the input labels;
    - ``bias``: ``(vocab,)`` or ``(1, vocab)`` or None.

    Returns the scalar loss (fp32, or fp64 for fp64 inputs): the mean over non-ignored tokens (NaN when there are none, as
    ``torch.nn.functional.cross_entropy``) or their sum. ``label_smoothing`` (in ``[0, 1)``) follows
    ``torch.nn.functional.cross_entropy``: ``(1 - eps) * nll + eps * mean over the vocabulary of -log p``.
    Under autocast the products run in the autocast dtype and the softmax in fp32, as the ordinary
    ``lm_head`` + ``logits.float()`` path does. ``chunk_size``: token rows per chunk (default: rows whose fp32
    logits fill 64 MiB). ``backend``: ``"auto"`` (Cut Cross-Entropy, else Liger, on CUDA when installed;
    peftkit's chunked function otherwise), or one of them by name.

    Raises :class:`~peftkit.config.ConfigError` for a bad reduction, smoothing, chunk size or backend, for
    mismatched shapes and for labels outside the vocabulary. Gradients flow by ordinary ``backward()``; a
    second backward through the same loss (``retain_graph``) and double backward are not supported.
    """
    _check_arguments(hidden, weight, labels, bias, reduction, label_smoothing, chunk_size, backend)
    chosen = available_backend(hidden.device, label_smoothing) if backend == "auto" else backend
    if chosen == "cut_cross_entropy":
        return _cut_cross_entropy(hidden, weight, labels, bias, ignore_index, reduction)
    if chosen == "liger":
        return _liger(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    compute_dtype = _compute_dtype(hidden, weight)
    rows = chunk_size or max(1, DEFAULT_CHUNK_BYTES // (4 * weight.shape[0]))
    return _ChunkedLinearCrossEntropy.apply(
        flat_hidden,
        weight,
        bias,
        flat_labels,
        ignore_index,
        reduction,
        float(label_smoothing),
        rows,
        compute_dtype,
    )


def available_backend(device: torch.device, label_smoothing: float = 0.0) -> str:
    """The backend ``"auto"`` picks on ``device``: a GPU library when installed, else ``"peftkit"``."""
    if torch.device(device).type != "cuda":
        return "peftkit"
    if label_smoothing == 0.0 and importlib.util.find_spec("cut_cross_entropy") is not None:
        return "cut_cross_entropy"  # it offers no label smoothing
    if importlib.util.find_spec("liger_kernel") is not None:
        return "liger"
    return "peftkit"


def _check_arguments(hidden, weight, labels, bias, reduction, label_smoothing, chunk_size, backend) -> None:
    if reduction not in REDUCTIONS:
        raise ConfigError(f"`reduction` must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"`label_smoothing` must be in [0, 1), got {label_smoothing!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(f"`chunk_size` must be a positive integer or None, got {chunk_size!r}")
    if backend not in BACKENDS:
        raise ConfigError(f"`backend` must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ConfigError(
            f"`weight` must be (vocab, {hidden.shape[-1]}) for hidden states of shape {tuple(hidden.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ConfigError(
            f"`labels` must have the hidden states' leading shape {tuple(hidden.shape[:-1])}, "
            f"got {tuple(labels.shape)}"
        )
    if bias is not None and bias.numel() != weight.shape[0]:
        raise ConfigError(f"`bias` must hold {weight.shape[0]} values (one per class), got {bias.numel()}")


def _no_autocast(device_type: str):
    """Autocast off on ``device_type``; a device autocast does not know (``meta``, as `peftkit plan` traces
    the loss there) needs nothing switched off."""
    if device_type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``nn.Linear`` would run the head in: the autocast dtype inside autocast, else the inputs'."""
    device_type = hidden.device.type
    if device_type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and every gradient chunk by chunk; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, reduction, smoothing, rows, compute_dtype):
        needs = ctx.needs_input_grad
        want_hidden, want_weight = needs[0], needs[1]
        want_bias = bias is not None and needs[2]
        with _no_autocast(hidden.device.type):
            valid = (labels != ignore_index).nonzero().squeeze(1)  # (n,) rows that are scored
            targets = labels.index_select(0, valid)
            vocab = weight.shape[0]
            # (a meta tensor has no values to check: `peftkit plan` runs this loss on the meta device)
            checkable = targets.numel() and targets.device.type != "meta"
            if checkable and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
                raise ConfigError(
                    f"labels must be in [0, {vocab}) or {ignore_index} (ignored); got values from "
                    f"{int(targets.min())} to {int(targets.max())}"
                )
            count = targets.numel()
            scale = 1.0 / count if reduction == "mean" and count else 1.0
            chunk_grads = _Grads.empty(hidden, weight, bias, count, want_hidden, want_weight, want_bias)
            w = weight.to(compute_dtype)  # (vocab, hidden)
            b = None if bias is None else bias.reshape(-1).to(compute_dtype)
            acc_dtype = torch.promote_types(compute_dtype, torch.float32)  # softmax never below fp32
            total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
            for start in range(0, count, rows):
                index = valid[start : start + rows]
                h = hidden.index_select(0, index).to(compute_dtype)  # (chunk, hidden)
                logits = (h @ w.T if b is None else torch.addmm(b, h, w.T)).to(acc_dtype)  # (chunk, vocab)
                y = targets[start : start + rows]
                total += _loss_and_softmax_(logits, y, smoothing)  # logits now hold the softmax
                if chunk_grads.any:
                    grad_logits = _grad_logits_(logits, y, smoothing, scale).to(compute_dtype)
                    chunk_grads.add(grad_logits, h, w, slice(start, start + rows))
                    del grad_logits
                del logits  # freed before the next chunk's logits are allocated
            loss = total * scale if count or reduction == "sum" else total / 0.0  # mean of nothing: NaN
            ctx.grads = chunk_grads.finish(hidden, valid)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError(
                "linear_cross_entropy's gradients were already used by an earlier backward(); "
                "a second backward through the same loss is not supported"
            )
        ctx.grads = None
        scaled = [None if g is None else g * grad_output.to(g.dtype) for g in grads]
        return scaled[0], scaled[1], scaled[2], None, None, None, None, None, None


def _loss_and_softmax_(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Summed cross-entropy of one chunk's logits ``(chunk, vocab)`` against ``targets`` ``(chunk,)``.

    Overwrites ``logits`` with their softmax: the log-sum-exp is taken in place (shift by the row maximum,
    exponentiate, sum), so a chunk needs one vocabulary-sized buffer, not three."""
    logits.sub_(logits.amax(dim=-1, keepdim=True))  # shifted: every exp <= 1
    target = logits.gather(1, targets[:, None]).squeeze(1)  # (chunk,)
    mean = logits.mean(dim=-1) if smoothing else None
    sums = logits.exp_().sum(dim=-1)
    lse = sums.log()  # (chunk,) log-sum-exp of the shifted logits
    logits.div_(sums[:, None])
    nll = lse - target
    if smoothing:
        return ((1.0 - smoothing) * nll + smoothing * (lse - mean)).sum()  # eps * mean_v(-log p_v)
    return nll.sum()


def _grad_logits_(probs: torch.Tensor, targets: torch.Tensor, smoothing: float, scale: float) -> torch.Tensor:
    """d loss / d logits = softmax - (1 - eps) one_hot - eps / vocab, times ``scale``, written over the
    softmax ``probs`` ``(chunk, vocab)``."""
    grad = probs.scatter_add_(
        1,
        targets[:, None],
        torch.full((targets.numel(), 1), smoothing - 1.0, dtype=probs.dtype, device=probs.device),
    )
    if smoothing:
        grad.sub_(smoothing / probs.shape[-1])
    return grad.mul_(scale) if scale != 1.0 else grad


class _Grads:
    """The gradients the forward pass accumulates: hidden-sized rows, a weight-sized sum, a bias-sized sum."""

    def __init__(self, hidden, weight, bias, any_):
        self.hidden, self.weight, self.bias, self.any = hidden, weight, bias, any_

    @classmethod
    def empty(cls, hidden, weight, bias, count, want_hidden, want_weight, want_bias):
        f32 = {"dtype": torch.promote_types(weight.dtype, torch.float32), "device": hidden.device}
        return cls(
            torch.empty(count, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
            if want_hidden
            else None,
            torch.zeros(weight.shape, **f32) if want_weight else None,
            torch.zeros(weight.shape[0], **f32) if want_bias else None,
            want_hidden or want_weight or want_bias,
        )

    def add(self, grad_logits, h, w, rows: slice) -> None:
        if self.hidden is not None:
            self.hidden[rows] = grad_logits @ w  # (chunk, hidden)
        if self.weight is not None:  # fp32 accumulation across chunks
            if grad_logits.dtype == self.weight.dtype:
                self.weight.addmm_(grad_logits.T, h)
            else:
                self.weight += grad_logits.T @ h
        if self.bias is not None:
            self.bias += grad_logits.sum(0, dtype=self.bias.dtype)

    def finish(self, hidden, valid):
        """(hidden grad scattered back to every row, weight grad, bias grad) in their parameters' dtypes."""
        grad_hidden = None
        if self.hidden is not None:
            grad_hidden = torch.zeros_like(hidden)
            grad_hidden.index_copy_(0, valid, self.hidden)
        return grad_hidden, self.weight, self.bias


def _cut_cross_entropy(hidden, weight, labels, bias, ignore_index, reduction):
    from cut_cross_entropy import linear_cross_entropy as cce  # optional, CUDA only

    dtype = _compute_dtype(hidden, weight)
    extra = {} if bias is None else {"bias": bias.reshape(-1).to(dtype)}
    loss = cce(
        hidden.to(dtype), weight.to(dtype), labels, ignore_index=ignore_index, reduction=reduction, **extra
    )
    return loss.float()


def _liger(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy  # optional, CUDA only

    dtype = _compute_dtype(hidden, weight)
    loss = liger_fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]).to(dtype),
        weight.to(dtype),
        labels.reshape(-1),
        None if bias is None else bias.reshape(-1).to(dtype),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )
    return (loss[0] if isinstance(loss, tuple) else loss).float()
