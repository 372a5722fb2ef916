"""AdamW with weight decay on weight matrices only, its own learning rate for a fresh task head, and a linear
warm-up then linear decay schedule."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def no_decay(name: str, parameter: nn.Parameter) -> bool:
    """Biases, norm scales and other vectors are not decayed (decaying a LayerNorm gain towards 0 only hurts)."""
    return parameter.dim() < 2 or name.endswith(".bias") or "norm" in name.lower()


def head_parameters(base: nn.Module, heads: Iterable[str]) -> list[nn.Parameter]:
    """The parameters of the task-head modules ``heads`` (paths in ``base``, e.g. ``classifier``), read after
    the adapter was added: a head an adapter trains in full is then its trained copy (and its frozen
    original, which the optimizer never sees)."""
    return [p for name in heads for p in base.get_submodule(name).parameters()]


def build_optimizer(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    head: Iterable[nn.Parameter] = (),
    head_learning_rate: float | None = None,
) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) over the parameters that require gradients, ``weight_decay`` on
    matrices only. ``learning_rate`` is the schedule's peak; the parameters in ``head`` (a freshly initialised
    task head) take ``head_learning_rate`` instead (None: ``learning_rate``), in groups of their own, so that
    a random head can move at a step size that suits it while the adapter keeps the method's own (one rate
    for both left LoRA's 21-way NER head on WNUT-16 predicting the majority tag only)."""
    head_ids = {id(p) for p in head}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    for in_head, rate in ((False, learning_rate), (True, head_learning_rate or learning_rate)):
        mine = [(n, p) for n, p in named if (id(p) in head_ids) == in_head]
        groups += [
            {"params": [p for n, p in mine if not no_decay(n, p)], "weight_decay": weight_decay, "lr": rate},
            {"params": [p for n, p in mine if no_decay(n, p)], "weight_decay": 0.0, "lr": rate},
        ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate)


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """Each group's rate · t / warmup for t < warmup, then · (total - t) / (total - warmup), down to 0 at the
    end."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
