"""Top-layer tuning: unfreeze the top ``k`` transformer blocks (optionally the embeddings, the final norm).

The blocks come from :func:`peftkit.architectures.block_lists`: the architecture table's lists (BERT's
``encoder.layer``, GPT-2's ``h``, LLaMA's ``layers``, T5's ``block`` in the encoder and in the decoder), or for
other models every outermost ``nn.ModuleList`` of modules of one class. ``block_lists`` names them
explicitly when the search finds none or the wrong ones. The trained blocks are base parameters trained in place and kept
per adapter (see :mod:`peftkit.parameter_bank`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from peftkit.architectures import block_lists
from peftkit.config import AdapterConfig, ConfigError, as_name_tuple, check_positive_int, register_config
from peftkit.layer import base_parameter_names
from peftkit.method_spec import Option, declare_method
from peftkit.methods.registry import in_place_method


@register_config
@dataclass(frozen=True)
class LayerTuningConfig(AdapterConfig):
    """Fields:
    top_k: how many of the last blocks train (in every block list).
    include_embeddings: also train the input embeddings (and their position/type embeddings and norm).
    include_final_norm: also train the norm after the last block (``ln_f``, ``norm``, ``final_layer_norm``).
    block_lists: dotted paths of the block lists (``None``: found automatically).
    modules_to_save: modules trained in full besides (a fresh task head).
    """

    method: ClassVar[str] = "layer_tuning"

    top_k: int = 1
    include_embeddings: bool = False
    include_final_norm: bool = False
    block_lists: tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_positive_int("top_k", self.top_k)
        for flag in ("include_embeddings", "include_final_norm"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"`{flag}` must be true or false, got {getattr(self, flag)!r}")
        self._set("block_lists", as_name_tuple("block_lists", self.block_lists, allow_string=False))
        self._set(
            "modules_to_save", as_name_tuple("modules_to_save", self.modules_to_save, allow_string=False)
        )


def trained_parameter_names(model: nn.Module, config: LayerTuningConfig) -> list[str]:
    lists = list(config.block_lists) if config.block_lists else block_lists(model)
    prefixes = []
    for path in lists:
        blocks = model.get_submodule(path)
        if not isinstance(blocks, nn.ModuleList):
            raise ConfigError(
                f"`block_lists` entry {path!r} is a {type(blocks).__name__}, not an nn.ModuleList"
            )
        if config.top_k > len(blocks):
            raise ConfigError(f"`top_k`={config.top_k} but {path!r} has only {len(blocks)} blocks")
        prefixes += [f"{path}.{i}." for i in range(len(blocks) - config.top_k, len(blocks))]
    if config.include_embeddings:
        prefixes += [p + "." for p in _embedding_paths(model)]
    if config.include_final_norm:
        prefixes += [p + "." for p in _final_norm_paths(model, lists)]
    return [name for name in base_parameter_names(model) if any(name.startswith(p) for p in prefixes)]


def _embedding_paths(model: nn.Module) -> list[str]:
    """The input embedding table, or the module around it when that holds all the embeddings (BERT's)."""
    get_input = getattr(model, "get_input_embeddings", None)
    table = get_input() if callable(get_input) else None
    if table is None:
        raise ConfigError(
            f"`include_embeddings`: {type(model).__name__} does not say which its input embeddings are"
        )
    path = next(p for p, m in model.named_modules() if m is table)
    parent = path.rpartition(".")[0]
    if parent and type(model.get_submodule(parent)).__name__.endswith("Embeddings"):
        return [parent]
    return [path]


def _final_norm_paths(model: nn.Module, lists: list[str]) -> list[str]:
    """Norm modules that are siblings of a block list (they run after it): ``ln_f``, ``norm``, ..."""
    paths = []
    for block_list in lists:
        parent = block_list.rpartition(".")[0]
        container = model.get_submodule(parent) if parent else model
        for child_name, child in container.named_children():
            if "norm" in type(child).__name__.lower() and "embed" not in child_name:
                paths.append(f"{parent}.{child_name}" if parent else child_name)
    if not paths:
        raise ConfigError(
            f"`include_final_norm`: no norm follows the blocks {lists} in {type(model).__name__}"
        )
    return paths


in_place_method("layer_tuning", LayerTuningConfig, trained_parameter_names, "PEFTKIT_LAYER_TUNING")


declare_method(
    "layer_tuning",
    "the last blocks train in full, the others stay frozen",
    learning_rate=1e-4,
    options=(Option("top_k", int, 2, "how many of the last transformer blocks train"),),
    build=lambda o, heads: LayerTuningConfig(top_k=o["top_k"], modules_to_save=heads or None),
)
