"""Training losses that avoid materialising large intermediate tensors."""

from peftkit.losses.linear_cross_entropy import (
    BACKENDS,
    IGNORE_INDEX,
    available_backend,
    linear_cross_entropy,
    shift_labels,
)

__all__ = ["BACKENDS", "IGNORE_INDEX", "available_backend", "linear_cross_entropy", "shift_labels"]
