"""Which modules an adapter wraps: names, regexes, "all-linear", layer ranges and per-architecture defaults.

Matching rules (the same as Hugging Face PEFT's, so that saved configs mean the same thing in both):
- a list of names matches a module whose dotted path equals a name or ends with ``"." + name``;
- a single string is a regular expression that must match the whole dotted path;
- ``"all-linear"`` selects every linear layer except the output head (the model's output embeddings or its
  classification head) and the modules the config trains in full (``modules_to_save``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.architectures import architecture, sample
from peftkit.config import ConfigError
from peftkit.layer import AdapterLayer, innermost, unwrap

ALL_LINEAR = "all-linear"
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)

# Attribute names of freshly initialised task heads: never worth a low-rank update, train them in full.
HEAD_ATTRIBUTES = ("classifier", "score", "qa_outputs")

# Path segments that hold the index of a repeated block, for `layers_to_transform`.
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)(?:\.|$)")


def default_targets(model: nn.Module) -> tuple[str, ...] | str:
    """LoRA's default targets for ``model``: its architecture's query and value projections (Hu et al.)."""
    return architecture(
        model,
        ("lora",),
        purpose="`target_modules` is required (LoRA has no default for this model)",
        remedy="`target_modules` (names, a regex or 'all-linear')",
    ).lora


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer under any adapter wrappers: ``nn.Linear`` and its
    subclasses (quantized ones included: read from the layer, not its packed weight) or transformers'
    ``Conv1D`` (weight stored (in, out)). Raises :class:`ConfigError` for any other module."""
    plain = innermost(module)
    if isinstance(plain, Conv1D):
        return tuple(plain.weight.shape)
    if isinstance(plain, nn.Linear):
        return plain.in_features, plain.out_features
    raise ConfigError(f"{type(plain).__name__} is not a linear layer (nn.Linear or transformers Conv1D)")


def output_head_names(model: nn.Module) -> set[str]:
    """Dotted paths of the modules that produce the model's output: excluded from "all-linear"."""
    heads: list[nn.Module] = []
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output) and get_output() is not None:
        heads.append(get_output())
    heads.extend(
        getattr(model, attr) for attr in HEAD_ATTRIBUTES if isinstance(getattr(model, attr, None), nn.Module)
    )
    head_ids = {id(head) for head in heads}
    names = set()
    for name, module in model.named_modules():
        if id(module) in head_ids:
            names.update(sub if not sub else f"{name}.{sub}" for sub, _ in module.named_modules())
            names.add(name)
    return names


def layer_index(name: str, layers_pattern: str | None) -> int | None:
    if layers_pattern is None:
        found = LAYER_INDEX.search(name)
    else:
        found = re.search(rf"(?:^|\.){re.escape(layers_pattern)}\.(\d+)(?:\.|$)", name)
    return int(found.group(1)) if found else None


def name_matches(name: str, spec: str | Sequence[str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def select_modules(
    model: nn.Module,
    *,
    target_modules: str | Sequence[str] | None,
    exclude_modules: str | Sequence[str] | None = None,
    layers_to_transform: Sequence[int] | None = None,
    layers_pattern: str | None = None,
    modules_to_save: Sequence[str] | None = None,
    supported: Callable[[nn.Module], bool],
    supported_text: str,
) -> list[str]:
    """Resolve a target spec to the dotted paths of the modules to wrap.

    Raises :class:`ConfigError` when nothing matches (listing names that do exist), when one entry of a list
    matches nothing (a typo is never silently ignored), or when a matched module is of a type the method
    cannot wrap.
    """
    if target_modules is None:
        target_modules = default_targets(model)
    modules = dict(model.named_modules())
    names = _candidate_paths(modules)
    # A module trained in full (`modules_to_save`) and everything inside it is never an adapter target: its
    # trained copy replaces it, so an adapter there would never get a gradient (HF PEFT's rule and pattern).
    saved = [re.compile(rf"(^|.*\.){re.escape(s)}($|\..*)") for s in modules_to_save or ()]
    in_saved = {n for n in names if any(pattern.match(n) for pattern in saved)}
    candidates = _matching(model, modules, names, target_modules, in_saved)

    if in_saved and target_modules != ALL_LINEAR:
        candidates = [n for n in candidates if n not in in_saved]
        if not candidates:
            raise ConfigError(
                f"`target_modules`={target_modules!r} selects only modules inside `modules_to_save`="
                f"{list(modules_to_save)}, which are trained in full; target other modules, or leave them out "
                "of `modules_to_save`"
            )
    if exclude_modules is not None:
        candidates = [n for n in candidates if not name_matches(n, exclude_modules)]
    if layers_to_transform is not None:
        check_layers_exist(candidates, layers_to_transform, layers_pattern)
        wanted = set(layers_to_transform)
        candidates = [n for n in candidates if layer_index(n, layers_pattern) in wanted]
    if not candidates:
        raise ConfigError(
            f"`exclude_modules`={exclude_modules!r} / `layers_to_transform`={layers_to_transform!r} "
            f"(layers_pattern={layers_pattern!r}) leave no module of `target_modules`={target_modules!r} to adapt"
        )

    unsupported = [f"{n} ({type(modules[n]).__name__})" for n in candidates if not supported(modules[n])]
    if unsupported:
        raise ConfigError(
            f"`target_modules` selects modules this method cannot wrap: {sample(unsupported)}; "
            f"supported: {supported_text}"
        )
    return candidates


def check_layers_exist(
    candidates: Sequence[str], layers_to_transform: Sequence[int], layers_pattern: str | None
) -> None:
    """Raise :class:`ConfigError` when ``layers_to_transform`` lists a block index that none of the
    ``candidates`` sits in (``[0, 7]`` on a 2-layer model would silently adapt layer 0 only)."""
    present = {layer_index(n, layers_pattern) for n in candidates} - {None}
    missing = sorted(set(layers_to_transform) - present)
    if missing and present:
        raise ConfigError(
            f"`layers_to_transform` lists layer(s) {missing} that the targeted modules do not have; "
            f"their layers are {min(present)} to {max(present)}"
        )


def _candidate_paths(modules: dict[str, nn.Module]) -> list[str]:
    """Every module path that can be a target. Modules inside an adapter wrapper (the adapter's own
    matrices, trained copies) are not: the wrapper stands for the layer it wraps, so a second adapter joins
    the same wrapper. Modules deeper inside a wrapped layer (a projection inside a wrapped MLP) remain."""
    wrappers = [n for n, m in modules.items() if isinstance(m, AdapterLayer)]
    return [
        n
        for n in modules
        if n and not any(n.startswith(w + ".") and not n.startswith(f"{w}.base_layer.") for w in wrappers)
    ]


def _matching(
    model: nn.Module,
    modules: dict[str, nn.Module],
    names: list[str],
    target_modules: str | Sequence[str],
    in_saved: set[str],
) -> list[str]:
    """The paths ``target_modules`` names ("all-linear": every linear layer but the output head and the
    modules trained in full). Raises :class:`ConfigError` when nothing matches or one list entry matches
    nothing (a typo is never silently ignored), listing the module names that exist."""
    if target_modules == ALL_LINEAR:
        excluded = output_head_names(model) | in_saved
        return [n for n in names if isinstance(unwrap(modules[n]), LINEAR_TYPES) and n not in excluded]
    candidates = [n for n in names if name_matches(n, target_modules)]
    if not isinstance(target_modules, str):
        missing = [key for key in target_modules if not any(name_matches(n, [key]) for n in names)]
        if missing and candidates:
            raise ConfigError(
                f"`target_modules` entries {missing} match no module (the others do). "
                f"Module names in this model: {sample(_leaf_names(names))}"
            )
    if not candidates:
        raise ConfigError(
            f"`target_modules`={target_modules!r} matches no module in {type(model).__name__}. "
            f"Module names in this model: {sample(_leaf_names(names))}"
        )
    return candidates


def _leaf_names(names: Sequence[str]) -> list[str]:
    """Distinct last path segments: the short names a user would write in `target_modules`."""
    return sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
