"""Merging for :class:`~peftkit.model.PeftModel`: fold adapters into the base weights and take them out
again, unload, and combine LoRA adapters into a new one. Part of ``PeftModel`` (this class holds no state of
its own); kept apart so that the lifecycle module stays readable."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from peftkit.layer import AdapterError, AdapterLayer
from peftkit.module_paths import replace_module
from peftkit.modules_to_save import ModulesToSave


class AdapterMerging:
    """``PeftModel``'s merge / unmerge / unload methods (see :mod:`peftkit.model`)."""

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the active adapters (or ``adapter_names``) into the base weights: inference then costs what
        the base model costs.

        Every merged tensor is a new one (the original is never written into, so a weight tied to another
        module, like GPT-2's output head and input embedding, keeps its value there) and the original is kept:
        :meth:`unmerge_adapter` restores it bit for bit, in any dtype. Memory: one copy of each merged
        weight while merged. ``safe_merge`` (HF PEFT's option): a merge that makes any weight non-finite is
        undone and raises :class:`AdapterError` naming the layer."""
        names = self._require_active() if adapter_names is None else tuple(adapter_names)
        for name in names:
            self._check_exists(name)
            layers = [layer for _, layer in self.adapter_layers() if name in layer.adapter_names()]
            unmergeable = {
                type(layer).__name__ for layer in layers if type(layer).merge is AdapterLayer.merge
            }
            if unmergeable - {"ModulesToSave"}:
                raise AdapterError(
                    f"adapter {name!r} ({self.peft_config[name].method}) cannot be merged: its layers "
                    f"{sorted(unmergeable - {'ModulesToSave'})} add a non-linear function of their input, which "
                    "no change of the base weights reproduces; run it unmerged"
                )
        # inner wrappers first: IA3 around LoRA folds diag(l) into the weight LoRA's update is in already, as
        # it scales that layer's output unmerged; unmerging, outer first, restores each one's original
        for path, layer in reversed(self.adapter_layers()):
            for name in names:
                if name in layer.adapter_names() and not isinstance(layer, ModulesToSave):
                    layer.merge(name)
                    if safe_merge and not _finite(layer.base()):
                        self.unmerge_adapter()
                        raise AdapterError(
                            f"merging adapter {name!r} makes weights of {path} non-finite (inf or NaN); "
                            "nothing was merged"
                        )

    def unmerge_adapter(self) -> None:
        for _, layer in self.adapter_layers():
            if layer.merged_adapters:
                layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> nn.Module:
        """The plain base model with the active adapters (or ``adapter_names``, made active first) folded into
        its weights (and their trained heads). ``safe_merge``: see :meth:`merge_adapter`; ``progressbar`` is
        accepted for HF PEFT's signature and ignored.

        A weight the adapter changes that was tied to another one (an output head sharing the input
        embedding) is untied, so the model computes what the adapted one did, and the transformers config
        says so (``tie_word_embeddings=False``), so that saving and loading the merged model keeps it untied."""
        if adapter_names is not None:
            self.set_adapter(list(adapter_names))
        self._require_active()
        tied = _tied_parameter_groups(self.base_model)
        for _, layer in self.adapter_layers():
            layer.keeps_unmerged = safe_merge  # nothing is unmerged afterwards unless a safe merge fails
        self.merge_adapter(safe_merge=safe_merge)
        model = self._unload(merge=True)
        _record_untied(model, tied)
        return model

    def unload(self) -> nn.Module:
        """The plain base model without any adapter, as it was before ``get_peft_model``."""
        self.unmerge_adapter()
        self._bank.activate(None)
        return self._unload(merge=False)

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        **options: Any,
    ) -> None:
        """A new LoRA adapter ``adapter_name`` from a weighted combination of LoRA ``adapters``, as HF PEFT's
        (``combination_type`` ``svd``, ``linear`` or ``cat``; ``svd_rank``, ``svd_clamp``,
        ``svd_full_matrices``, ``svd_driver``): see :mod:`peftkit.methods.lora.weighted`."""
        from peftkit.methods.lora.weighted import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, **options)

    def _unload(self, merge: bool) -> nn.Module:
        for path, layer in reversed(self.adapter_layers()):  # inner first: outer paths stay valid
            replace_module(self.base_model, path, layer.unloaded(merge=merge))
        for parameter_name, parameter in self.base_model.named_parameters():
            parameter.requires_grad_(self._original_requires_grad.get(parameter_name, True))
        self.peft_config.clear()
        self._active = ()
        return self.base_model


def _finite(module: nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in module.parameters() if p.is_floating_point())


def _tied_parameter_groups(model: nn.Module) -> list[list[str]]:
    """Names of the parameters that share one tensor, one list per shared tensor (tied weights)."""
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _record_untied(model: nn.Module, tied: list[list[str]]) -> None:
    """After merging, a weight tied before may hold its own merged tensor: say so in every transformers config
    of the model, or transformers would tie it again when the merged model is saved and loaded."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    untied = [g for g in tied if len({id(parameters.get(n)) for n in g}) > 1]
    if not untied:
        return
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
        text = getattr(config, "get_text_config", None)
        if callable(text) and getattr(text(), "tie_word_embeddings", False):
            text().tie_word_embeddings = False
