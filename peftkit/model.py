"""``PeftModel``: one frozen base model, any number of named adapters, and their whole lifecycle.

    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear"))
    model(**batch)                                  # forwards exactly like `base`
    model.add_adapter("other", config); model.set_adapter("other")
    with model.disable_adapter(): model(**batch)    # the base model, exactly
    model(**batch, adapter_names=["default", "other", "__base__", ...])   # one adapter per row
    model.save_pretrained(path); PeftModel.from_pretrained(base, path)

The wrapped model is ``model.base_model`` (no attribute delegation: what belongs to the base model is
reached through it). All adapter layers follow :class:`~peftkit.layer.AdapterLayer`; this class never knows
which method a layer implements.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit import accounting, checkpoint
from peftkit.config import AdapterConfig, ConfigError
from peftkit.layer import BASE_ROW, AdapterLayer, Routing
from peftkit.methods import method_for_config, method_for_file
from peftkit.module_paths import replace_module
from peftkit.modules_to_save import ModulesToSave
from peftkit.parameter_bank import ParameterBank
from peftkit.targeting import name_matches


class AdapterError(ValueError):
    """An adapter operation that cannot be carried out as asked (unknown name, merged state, ...)."""


class PeftModel(nn.Module):
    def __init__(self, model: nn.Module, config: AdapterConfig | None, adapter_name: str = "default") -> None:
        """Wrap ``model`` (frozen) and, given a ``config``, add adapter ``adapter_name`` and make it active."""
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, AdapterConfig] = {}
        self.active_adapter: str | None = None
        self._targets: dict[str, list[str]] = {}  # adapter -> wrapped module paths
        self._inference_only: set[str] = set()  # adapters loaded with is_trainable=False
        self._bank = ParameterBank()
        self._adapters_enabled = True  # False inside disable_adapter()
        # unload() hands the model back with the trainable flags it came with
        self._original_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)
        self.train(model.training)  # follow the base model's mode (eval() on a loaded model stays eval)
        if config is not None:
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name)

    # --- forward --------------------------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The base model's forward. With ``adapter_names`` (one per row; ``"__base__"`` for the base model
        alone) every row runs through its own adapter in a single pass."""
        if adapter_names is None:
            return self.base_model(*args, **self._prepared("prepare_inputs", kwargs))
        with self._mixed_batch(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is None:
            if (
                args and "input_ids" not in kwargs
            ):  # generate(ids): methods that extend the input need it named
                kwargs, args = {"input_ids": args[0], **kwargs}, args[1:]
            return self.base_model.generate(*args, **self._prepared("prepare_generation", kwargs))
        with self._mixed_batch(adapter_names):
            return self.base_model.generate(*args, **kwargs)

    def _prepared(self, hook: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments as the active adapter's method wants them (most methods: unchanged)."""
        name = self.active_adapter
        if name is None or not self._adapters_enabled:
            return kwargs
        prepare = getattr(method_for_config(self.peft_config[name]), hook)
        return kwargs if prepare is None else prepare(self.base_model, name, kwargs)

    @property
    def config(self) -> Any:
        """The base model's config (``transformers`` models), so generation utilities find it."""
        return getattr(self.base_model, "config", None)

    # --- lifecycle -------------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: AdapterConfig) -> None:
        """Add adapter ``name`` (not made active: call :meth:`set_adapter`). Refused configs change nothing."""
        _check_new_name(name, self.peft_config)
        missing = [r for r in config.requires() if r not in self.peft_config]
        if missing:
            raise AdapterError(
                f"adapter {name!r} builds on {missing}, which this model does not have; add them first"
            )
        method = method_for_config(config)
        saved_paths = self._resolve_modules_to_save(config)
        self._targets[name] = method.inject(self.base_model, name, config)
        for path in saved_paths:
            wrapper = self.base_model.get_submodule(path)
            if not isinstance(wrapper, ModulesToSave):
                wrapper = ModulesToSave(wrapper)
                replace_module(self.base_model, path, wrapper)
            wrapper.add_adapter(name)
        self.peft_config[name] = config
        fully_trained = [p for p, m in self.base_model.named_modules() if isinstance(m, ModulesToSave)]
        in_place = [
            b
            for b in method.trained_base_parameters(self.base_model, self._targets[name], config)
            if not any(b.startswith(p + ".") for p in fully_trained)
        ]
        self._bank.add(self.base_model, name, in_place)
        self.train(self.training)  # new adapter modules (dropout) take the model's current mode
        self._apply_active(self.active_adapter)

    def set_adapter(self, name: str) -> None:
        self._check_exists(name)
        self._check_not_merged("set_adapter")
        self.active_adapter = name
        self._apply_active(name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model is the base model exactly (adapters off, base values restored)."""
        self._check_not_merged("disable_adapter")
        self._apply_active(None)
        self._adapters_enabled = False
        try:
            yield
        finally:
            self._adapters_enabled = True
            self._apply_active(self.active_adapter)

    def delete_adapter(self, name: str) -> None:
        self._check_exists(name)
        dependants = [other for other, config in self.peft_config.items() if name in config.requires()]
        if dependants:
            raise AdapterError(f"adapters {dependants} build on {name!r}; delete them first")
        for path, layer in reversed(self.adapter_layers()):  # inner first: outer paths stay valid
            if name in layer.adapter_names():
                if name in layer.merged_adapters:
                    layer.unmerge()
                layer.delete_adapter(name)
                if not layer.adapter_names():
                    replace_module(self.base_model, path, layer.unloaded(merge=False))
        self._bank.delete(name)
        del self.peft_config[name], self._targets[name]
        self._inference_only.discard(name)
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.peft_config), None)
        self._apply_active(self.active_adapter)

    def merge_adapter(self) -> None:
        """Fold the active adapter into the base weights: inference then costs what the base model costs."""
        name = self._require_active()
        layers = [layer for _, layer in self.adapter_layers() if name in layer.adapter_names()]
        unmergeable = {type(layer).__name__ for layer in layers if type(layer).merge is AdapterLayer.merge}
        if unmergeable - {"ModulesToSave"}:
            raise AdapterError(
                f"adapter {name!r} ({self.peft_config[name].method}) cannot be merged: its layers "
                f"{sorted(unmergeable - {'ModulesToSave'})} add a non-linear function of their input, which no "
                "change of the base weights reproduces; run it unmerged"
            )
        for layer in layers:
            if not isinstance(layer, ModulesToSave):
                layer.merge(name)

    def unmerge_adapter(self) -> None:
        for _, layer in self.adapter_layers():
            if layer.merged_adapters:
                layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """The plain base model with the active adapter folded into its weights (and its trained heads)."""
        self._require_active()
        self.merge_adapter()
        return self._unload(merge=True)

    def unload(self) -> nn.Module:
        """The plain base model without any adapter, as it was before ``get_peft_model``."""
        self.unmerge_adapter()
        self._bank.activate(None)
        return self._unload(merge=False)

    # --- checkpoints -----------------------------------------------------------------------------------
    def save_pretrained(
        self, directory: str | os.PathLike, adapter_names: Sequence[str] | None = None
    ) -> None:
        """Write each adapter (default: all) in the HF PEFT layout: ``default`` into ``directory`` itself,
        any other adapter into ``directory/<name>``. Only adapter tensors are written, never base weights."""
        names = list(self.peft_config) if adapter_names is None else list(adapter_names)
        for name in names:
            self._check_exists(name)
        for name in names:
            method = method_for_config(self.peft_config[name])
            config = method.to_file(self.peft_config[name], self._targets[name], self.base_model)
            config["base_model_name_or_path"] = getattr(self.config, "_name_or_path", None) or None
            target = Path(directory) if name == "default" else Path(directory) / name
            checkpoint.write_adapter(target, config, self.adapter_state_dict(name))

    def load_adapter(
        self, directory: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
    ):
        """Add adapter ``adapter_name`` from a peftkit or HF PEFT adapter directory.

        Shapes and keys are checked against the model before anything is kept: a mismatch raises an error
        naming the key and both shapes, and the model is left without the half-loaded adapter."""
        file_config, tensors = checkpoint.read_adapter(directory)
        config = method_for_file(file_config).from_file(file_config)
        self.add_adapter(adapter_name, config)
        try:
            expected = self.adapter_state_dict(adapter_name)
            tensors = self._drop_base_copies(tensors, expected, source=str(directory))
            checkpoint.check_tensors(tensors, expected, source=str(directory))
            self._load_tensors(adapter_name, tensors)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        if not is_trainable:
            self._inference_only.add(adapter_name)
        self._apply_active(self.active_adapter)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        directory: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
    ) -> PeftModel:
        """``model`` with the adapter saved in ``directory`` (peftkit or HF PEFT), active; frozen unless
        ``is_trainable``."""
        peft_model = cls(model, None)
        peft_model.load_adapter(directory, adapter_name, is_trainable=is_trainable)
        peft_model.set_adapter(adapter_name)
        return peft_model

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under their checkpoint keys (``base_model.model.<path>.<tensor>``)."""
        self._check_exists(name)
        tensors = {}
        for path, layer in self.adapter_layers():
            if name in layer.adapter_names():
                for key, tensor in layer.adapter_state_dict(name).items():
                    tensors[f"{checkpoint.KEY_PREFIX}{path}.{key}"] = tensor
        for key, tensor in self._bank.state_dict(self.base_model, name).items():
            tensors[f"{checkpoint.KEY_PREFIX}{key}"] = tensor
        return tensors

    # --- accounting ------------------------------------------------------------------------------------
    def trainable_parameters(self) -> accounting.ParameterCount:
        tensors = self.adapter_state_dict(self.active_adapter) if self.active_adapter else {}
        return accounting.count_parameters(self.base_model, tensors)

    def print_trainable_parameters(self) -> None:
        print(self.trainable_parameters().summary())

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params = [
            p
            for _, layer in self.adapter_layers()
            if name in layer.adapter_names()
            for p in layer.adapter_parameters(name)
        ]
        return params + self._bank.parameters_of(name)

    # --- internals -------------------------------------------------------------------------------------
    def adapter_layers(self) -> list[tuple[str, AdapterLayer]]:
        """Every adapter layer, outer before inner (a LoRA layer may sit inside a module that a parallel
        adapter wraps); the trained copies inside a ModulesToSave are part of it, not layers of their own."""
        found: list[tuple[str, AdapterLayer]] = []
        copies: list[str] = []
        for path, module in self.base_model.named_modules():
            if not isinstance(module, AdapterLayer) or any(path.startswith(p + ".") for p in copies):
                continue
            found.append((path, module))
            if isinstance(module, ModulesToSave):
                copies.append(path)
        return found

    def _apply_active(self, name: str | None) -> None:
        """Route every layer to adapter ``name`` (None: base model) and make exactly its parameters train."""
        for _, layer in self.adapter_layers():
            layer.active_adapter = name
        self._bank.activate(name)
        active = self.active_adapter
        training = set()
        if active is not None and active not in self._inference_only:
            training = {id(p) for p in self.adapter_parameters(active)}
        for adapter in self.peft_config:  # a parameter two adapters share trains when either is active
            for parameter in self.adapter_parameters(adapter):
                parameter.requires_grad_(id(parameter) in training)

    def _load_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        for path, layer in self.adapter_layers():
            if name in layer.adapter_names():
                prefix = f"{checkpoint.KEY_PREFIX}{path}."
                own = {key: tensors[prefix + key] for key in layer.adapter_state_dict(name)}
                layer.load_adapter_state_dict(name, own)
        in_place = {
            b: tensors[f"{checkpoint.KEY_PREFIX}{b}"] for b in self._bank.state_dict(self.base_model, name)
        }
        self._bank.load(self.base_model, name, in_place)

    def _drop_base_copies(
        self, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str
    ) -> dict[str, torch.Tensor]:
        """HF PEFT also writes the full embedding table when LoRA targets an embedding (in case the vocabulary
        was resized). A copy equal to the model's own table is redundant and skipped; a different one would
        silently replace base weights, so it is refused."""
        base = {f"{checkpoint.KEY_PREFIX}{n}": p for n, p in self.base_model.named_parameters()}
        kept = {}
        for key, tensor in tensors.items():
            if key in expected or key not in base:
                kept[key] = tensor
            elif base[key].shape != tensor.shape or not torch.equal(
                base[key].detach().cpu(), tensor.to(base[key].dtype)
            ):
                raise checkpoint.CheckpointError(
                    f"{source} carries its own copy of base weight {key!r} that differs from this model's "
                    "(a resized vocabulary?); peftkit does not overwrite base weights from an adapter file"
                )
        return kept

    def _unload(self, merge: bool) -> nn.Module:
        for path, layer in reversed(self.adapter_layers()):  # inner first: outer paths stay valid
            replace_module(self.base_model, path, layer.unloaded(merge=merge))
        for parameter_name, parameter in self.base_model.named_parameters():
            parameter.requires_grad_(self._original_requires_grad.get(parameter_name, True))
        self.peft_config.clear()
        self.active_adapter = None
        return self.base_model

    def _resolve_modules_to_save(self, config: AdapterConfig) -> list[str]:
        names = getattr(config, "modules_to_save", None)
        if not names:
            return []
        layers = self.adapter_layers()
        paths = [
            p
            for p, m in self.base_model.named_modules()
            if p
            and name_matches(p, names)
            and not any(p.startswith(q + ".") for q, _ in layers)
            and (isinstance(m, ModulesToSave) or not isinstance(m, AdapterLayer))
        ]
        missing = [n for n in names if not any(name_matches(p, [n]) for p in paths)]
        if missing:
            raise ConfigError(
                f"`modules_to_save` entries {missing} match no module of {type(self.base_model).__name__}"
            )
        return paths

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names: Sequence[str]) -> Iterator[None]:
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise AdapterError(
                f"`adapter_names` must be a list of adapter names, one per row, got {adapter_names!r}"
            )
        for name in set(adapter_names) - {BASE_ROW}:
            self._check_exists(name)
            if self._bank.parameters_of(name):
                raise AdapterError(
                    f"adapter {name!r} trains base-model parameters in place (e.g. biases); those cannot "
                    "differ per row, so it cannot join a mixed batch"
                )
            if self.training and getattr(self.peft_config[name], "dropout", 0) > 0:
                raise AdapterError(
                    f"mixed batches are for inference: adapter {name!r} has dropout and the model is in training "
                    "mode; call model.eval() first"
                )
        self._check_not_merged("a mixed batch (adapter_names=...)")
        device = next(self.base_model.parameters()).device
        routing = Routing.from_row_names(list(adapter_names), device)
        layers = [layer for _, layer in self.adapter_layers()]
        for layer in layers:
            layer.routing = routing
        try:
            yield
        finally:
            for layer in layers:
                layer.routing = None

    def _check_exists(self, name: str) -> None:
        if name not in self.peft_config:
            raise AdapterError(
                f"no adapter named {name!r}; adapters on this model: {sorted(self.peft_config)}"
            )

    def _require_active(self) -> str:
        if self.active_adapter is None:
            raise AdapterError("no active adapter; add one and call set_adapter(name)")
        return self.active_adapter

    def _check_not_merged(self, action: str) -> None:
        merged = sorted({n for _, layer in self.adapter_layers() for n in layer.merged_adapters})
        if merged:
            raise AdapterError(
                f"{action} needs unmerged adapters, but {merged} is merged; call unmerge_adapter() first"
            )


def get_peft_model(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> PeftModel:
    """Freeze ``model`` and add adapter ``adapter_name`` described by ``config`` (made active)."""
    return PeftModel(model, config, adapter_name)


def _check_new_name(name: str, existing: dict[str, AdapterConfig]) -> None:
    if not isinstance(name, str) or not name or "." in name or name == BASE_ROW:
        raise AdapterError(
            f"adapter name must be a non-empty string without '.' and other than {BASE_ROW!r}, got {name!r}"
        )
    if name in existing:
        raise AdapterError(
            f"an adapter named {name!r} already exists; delete_adapter({name!r}) first or pick another name"
        )
