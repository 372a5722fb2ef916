"""AdamW with weight decay on weight matrices only, and a linear warm-up then linear decay schedule."""

from __future__ import annotations

import torch
from torch import nn


def no_decay(name: str, parameter: nn.Parameter) -> bool:
    """Biases, norm scales and other vectors are not decayed (decaying a LayerNorm gain towards 0 only hurts)."""
    return parameter.dim() < 2 or name.endswith(".bias") or "norm" in name.lower()


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the parameters that require gradients, ``weight_decay`` on matrices only
    (Loshchilov & Hutter 2019); ``learning_rate`` is the schedule's peak."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate)


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """lr · t / warmup for t < warmup, then lr · (total - t) / (total - warmup), down to 0 at the end."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
