"""A new LoRA adapter made from a weighted combination of existing ones (HF PEFT's ``add_weighted_adapter``).

With adapter ``i``'s update ``ΔW_i = s_i B_i A_i`` and weight ``w_i``, per adapted layer:

- ``linear`` (all ranks equal): ``A = Σ sign(w_i s_i) sqrt|w_i s_i| A_i``, ``B = Σ sqrt|w_i s_i| B_i``: cheap, but
  ``B A`` then holds cross terms ``B_i A_j``; it is not ``Σ w_i ΔW_i`` (HF PEFT calls it a rough approximation).
- ``cat``: ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B = [B_1, B_2, ...]``, rank ``Σ r_i``: exactly ``Σ w_i ΔW_i``.
- ``svd``: the best rank-``svd_rank`` approximation of ``Σ w_i ΔW_i`` (``B = U_r S_r``, ``A = V_r^T``), rank
  ``max r_i`` unless given: exact when the sum's rank is at most that.

The new adapter's scale is 1 (``alpha = r``), so its update is ``B A``. The numbers are those of HF PEFT
0.21's ``LoraModel.add_weighted_adapter`` (tested against it), with one difference: HF PEFT keeps
``use_rslora`` from the first adapter, which then scales the combination by ``sqrt(r)``; peftkit does not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from peftkit.layer import AdapterError
from peftkit.methods.lora.config import LoraConfig

COMBINATIONS = ("svd", "linear", "cat")
_HF_ONLY = (
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
)


def add_weighted_adapter(
    model,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
) -> None:
    """Add adapter ``adapter_name`` to ``model`` (a PeftModel), combining LoRA ``adapters`` with ``weights``
    (negative weights subtract). Not made active. Raises :class:`AdapterError` for unknown or non-LoRA
    adapters, mismatched lengths, unequal ranks with ``linear``, adapters with ``modules_to_save`` or trained
    biases (a fully trained module or bias cannot be weighted), and combination types other than
    ``svd``, ``linear`` and ``cat``."""
    adapters, weights = list(adapters), [float(w) for w in weights]
    _check(model, adapters, weights, combination_type)
    if len(adapters) == 1:
        combination_type = "linear"  # as HF PEFT: one adapter is only ever scaled
    configs = [model.peft_config[a] for a in adapters]
    ranks = [c.r for c in configs]
    if combination_type == "linear" and len(set(ranks)) != 1:
        raise AdapterError(
            f"combination_type='linear' needs adapters of one rank, got ranks {ranks}; use 'cat' or 'svd'"
        )
    rank = {"linear": ranks[0], "cat": sum(ranks)}.get(combination_type) or svd_rank or max(ranks)
    targets = sorted({path for a in adapters for path in model._targets[a]})
    config = configs[0].replace(
        r=rank,
        alpha=rank,
        use_rslora=False,
        target_modules=tuple(targets),
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        init="default",
    )
    model.add_adapter(adapter_name, config)
    with torch.no_grad():
        for _, layer in model.adapter_layers():
            if adapter_name not in layer.adapter_names():
                continue
            present = [(a, w) for a, w in zip(adapters, weights, strict=True) if a in layer.adapter_names()]
            new_A, new_B = _factors(layer, adapter_name)
            if combination_type == "svd":
                A, B = _svd(layer, present, rank, svd_clamp, svd_full_matrices, svd_driver)
            else:
                A, B = (_cat if combination_type == "cat" else _linear)(layer, present)
            new_A.zero_()
            new_B.zero_()
            new_A[: A.shape[0]] = A.to(new_A.dtype)
            new_B[:, : B.shape[1]] = B.to(new_B.dtype)


def _check(model, adapters: list[str], weights: list[float], combination_type: str) -> None:
    if combination_type not in COMBINATIONS:
        extra = (
            " (HF PEFT's pruning merges are not implemented in peftkit)"
            if combination_type in _HF_ONLY
            else ""
        )
        raise AdapterError(
            f"`combination_type` must be one of {list(COMBINATIONS)}, got {combination_type!r}{extra}"
        )
    if not adapters or len(adapters) != len(weights):
        raise AdapterError(
            f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights ({adapters}, {weights})"
        )
    for name in adapters:
        model._check_exists(name)
        config = model.peft_config[name]
        if not isinstance(config, LoraConfig):
            raise AdapterError(
                f"adapter {name!r} is {config.method}, not LoRA: only LoRA adapters can be weighted"
            )
        if config.modules_to_save or config.bias != "none":
            raise AdapterError(
                f"adapter {name!r} trains modules in full (`modules_to_save`) or biases (`bias`={config.bias!r}), "
                "which cannot be combined by weights; only its low-rank updates could"
            )


def _factors(layer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in) and B (out, r) of adapter ``name`` in a LoRA linear or embedding layer (an embedding's
    ``lora_embedding_A`` is (r, vocab), its ``lora_embedding_B`` (dim, r): the same orientation)."""
    if hasattr(layer, "lora_A"):
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    return layer.lora_embedding_A[name], layer.lora_embedding_B[name]


def _linear(layer, present) -> tuple[torch.Tensor, torch.Tensor]:
    A = B = 0
    for name, weight in present:
        factor = weight * layer.scaling[name]
        root = math.sqrt(abs(factor))
        A_i, B_i = _factors(layer, name)
        A = A + math.copysign(root, factor) * A_i  # the sign on one side only
        B = B + root * B_i
    return A, B


def _cat(layer, present) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [(_factors(layer, name), weight * layer.scaling[name]) for name, weight in present]
    A = torch.cat([factor * A_i for (A_i, _), factor in pairs], dim=0)
    B = torch.cat([B_i for (_, B_i), _ in pairs], dim=1)
    return A, B


def _svd(layer, present, rank: int, clamp, full_matrices: bool, driver) -> tuple[torch.Tensor, torch.Tensor]:
    delta = sum(
        weight * layer.scaling[name] * (_factors(layer, name)[1] @ _factors(layer, name)[0])
        for name, weight in present
    )
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)  # delta: (out, in)
    B, A = U[:, :rank] @ torch.diag(S[:rank]), Vh[:rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-high, high), A.clamp(-high, high)
    return A, B
