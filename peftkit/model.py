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
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from peftkit import accounting
from peftkit.adapter_names import check_adapter_name
from peftkit.config import AdapterConfig, ConfigError
from peftkit.integrations.signature import base_signature_forward
from peftkit.layer import BASE_ROW, AdapterError, AdapterLayer, Routing, plain_paths, routed
from peftkit.methods import method_for_config
from peftkit.model_checkpoints import AdapterCheckpoints
from peftkit.model_merging import AdapterMerging
from peftkit.module_paths import replace_module
from peftkit.modules_to_save import ModulesToSave
from peftkit.parameter_bank import ParameterBank
from peftkit.peft_surface import HfPeftSurface
from peftkit.size_bounds import check_virtual_tokens, check_widths
from peftkit.targeting import name_matches
from peftkit.task_type import TASK_HEADS, with_task_heads


class PeftModel(AdapterMerging, AdapterCheckpoints, HfPeftSurface, nn.Module):
    def __init__(self, model: nn.Module, config: AdapterConfig | None, adapter_name: str = "default") -> None:
        """Wrap ``model`` (frozen) and, given a ``config``, add adapter ``adapter_name`` and make it active."""
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, AdapterConfig] = {}
        self._active: tuple[str, ...] = ()  # the active adapters (several: their effects combine)
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
    @base_signature_forward  # inspect.signature(model.forward) is the base model's (Trainer keeps its columns)
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
        if len(self._active) != 1 or not self._adapters_enabled:  # several: only methods without hooks
            return kwargs
        name = self._active[0]
        prepare = getattr(method_for_config(self.peft_config[name]), hook)
        return kwargs if prepare is None else prepare(self.base_model, name, kwargs)

    @property
    def active_adapters(self) -> list[str]:
        """The names of the active adapters (HF PEFT's spelling; several after ``set_adapter([...])``)."""
        return list(self._active)

    @property
    def active_adapter(self) -> str | list[str] | None:
        """The active adapter's name; the list of names when several are active (as in HF PEFT); ``None``
        when there is none."""
        if len(self._active) > 1:
            return list(self._active)
        return self._active[0] if self._active else None

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether the base model's loss takes ``num_items_in_batch`` (transformers' ``Trainer`` asks, to
        normalise a gradient-accumulated loss by the tokens of all micro-batches): the base model's own
        answer, else whether its ``forward`` takes ``**kwargs``, as ``Trainer`` decides for the model HF
        PEFT's ``get_base_model()`` returns."""
        answer = getattr(self.base_model, "accepts_loss_kwargs", None)
        if answer is not None:
            return bool(answer)
        parameters = inspect.signature(self.base_model.forward).parameters.values()
        return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)

    @property
    def loss_type(self) -> str | None:
        """The base model's ``loss_type`` (``"ForCausalLM"``, ...): ``Trainer`` counts a causal LM's
        tokens over the shifted labels when it is one."""
        return getattr(self.base_model, "loss_type", None)

    def add_model_tags(self, tags: str | list[str]) -> None:
        """Tag the base model's model card (TRL's trainers call this; HF PEFT reaches it by delegation)."""
        add = getattr(self.base_model, "add_model_tags", None)
        if add is not None:
            add(tags)

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
        config = with_task_heads(config, self.base_model)  # HF PEFT's meaning of a classification task_type
        check_virtual_tokens(self.base_model, config)  # prompt methods: within the model's positions
        check_widths(self.base_model, config)  # widths a method adds: within a multiple of the model's
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
        paths = plain_paths(self.base_model)  # trained base parameters are named without adapter wrappers
        fully_trained = [paths[p] for p, m in self.base_model.named_modules() if isinstance(m, ModulesToSave)]
        in_place = [
            b
            for b in method.trained_base_parameters(self.base_model, self._targets[name], config)
            if not any(b.startswith(p + ".") for p in fully_trained)
        ]
        self._bank.add(self.base_model, name, in_place)
        self.train(self.training)  # new adapter modules (dropout) take the model's current mode
        self._apply_active(self._active)

    def set_adapter(self, name: str | Sequence[str]) -> None:
        """Make adapter ``name`` active, or several at once (a list): their effects then combine, as in HF
        PEFT (LoRA: the updates add up), and all of them train.

        Several adapters are refused with :class:`AdapterError` where they cannot combine: two of them on one
        layer whose method does not combine (only LoRA does; a ``modules_to_save`` copy is one module),
        adapters that train base parameters in place or rewrite the model's inputs (prompt methods)."""
        names = tuple(name) if isinstance(name, (list, tuple)) else (name,)
        if not names or len(set(names)) != len(names):
            raise AdapterError(f"set_adapter needs an adapter name or a list of distinct names, got {name!r}")
        for each in names:
            self._check_exists(each)
        self._check_not_merged("set_adapter")
        if len(names) > 1:
            self._check_combinable(names)
        self._active = names
        self._apply_active(names)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model is the base model exactly (adapters off, base values restored)."""
        self._check_not_merged("disable_adapter")
        self._apply_active(())
        self._adapters_enabled = False
        try:
            yield
        finally:
            self._adapters_enabled = True
            self._apply_active(self._active)

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
        if name in self._active:
            rest = tuple(n for n in self._active if n != name)
            self._active = rest or tuple(list(self.peft_config)[:1])
        self._apply_active(self._active)

    # --- accounting ------------------------------------------------------------------------------------
    def trainable_parameters(self) -> accounting.ParameterCount:
        tensors = {k: t for name in self.active_adapters for k, t in self.adapter_state_dict(name).items()}
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

    def _apply_active(self, names: tuple[str, ...]) -> None:
        """Route every layer to the adapters ``names`` (none: the base model) and make exactly the parameters
        of the active adapters train (those loaded for inference stay frozen)."""
        for _, layer in self.adapter_layers():
            layer.active_adapters = names
        self._bank.activate(names[0] if names else None)  # several active ones have no bank values
        training = {
            id(p)
            for name in self._active
            if name not in self._inference_only
            for p in self.adapter_parameters(name)
        }
        for adapter in self.peft_config:  # a parameter two adapters share trains when either is active
            for parameter in self.adapter_parameters(adapter):
                parameter.requires_grad_(id(parameter) in training)

    def _check_combinable(self, names: tuple[str, ...]) -> None:
        """Refuse, naming the reason, a set of adapters that cannot be active together."""
        for name in names:
            method = method_for_config(self.peft_config[name])
            if method.prepare_inputs is not None or method.prepare_generation is not None:
                raise AdapterError(
                    f"adapter {name!r} ({method.name}) changes the model's inputs and cannot be active together "
                    f"with other adapters; activate it alone. Several adapters combine for LoRA."
                )
            if self._bank.parameters_of(name):
                raise AdapterError(
                    f"adapter {name!r} trains base-model parameters in place (e.g. biases), which several active "
                    "adapters cannot share; activate it alone"
                )
        for path, layer in self.adapter_layers():
            present = [n for n in names if n in layer.adapter_names()]
            if len(present) > 1 and not layer.combines_adapters:
                raise AdapterError(
                    f"adapters {present} both act on {path} ({type(layer).__name__}), which cannot combine two "
                    "adapters (only LoRA layers add their updates; a modules_to_save copy is one module); "
                    "activate them one at a time"
                )

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
        optional = TASK_HEADS.get(getattr(config, "task_type", None), ())  # HF PEFT lists every head name
        missing = [n for n in names if n not in optional and not any(name_matches(p, [n]) for p in paths)]
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
        layers = [layer for _, layer in self.adapter_layers()]  # walked once: this runs every decode step
        self._check_not_merged("a mixed batch (adapter_names=...)", layers)
        device = next(self.base_model.parameters()).device
        with routed(layers, Routing.from_row_names(list(adapter_names), device)):
            yield

    def _check_exists(self, name: str) -> None:
        check_adapter_name(name)
        if name not in self.peft_config:
            raise AdapterError(
                f"no adapter named {name!r}; adapters on this model: {sorted(self.peft_config)}"
            )

    def _require_active(self) -> tuple[str, ...]:
        if not self._active:
            raise AdapterError("no active adapter; add one and call set_adapter(name)")
        return self._active

    def _check_not_merged(self, action: str, layers: list[AdapterLayer] | None = None) -> None:
        layers = [layer for _, layer in self.adapter_layers()] if layers is None else layers
        merged = sorted({n for layer in layers for n in layer.merged_adapters})
        if merged:
            raise AdapterError(
                f"{action} needs unmerged adapters, but {merged} is merged; call unmerge_adapter() first"
            )


def get_peft_model(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> PeftModel:
    """Freeze ``model`` and add adapter ``adapter_name`` described by ``config`` (made active)."""
    return PeftModel(model, config, adapter_name)


def _check_new_name(name: str, existing: dict[str, AdapterConfig]) -> None:
    check_adapter_name(name)
    if name == BASE_ROW:
        raise AdapterError(
            f"adapter name {name!r} is reserved (other than {BASE_ROW!r}: it means the base model)"
        )
    if hasattr(nn.ParameterDict(), name):  # adapters are keys of module dicts: `half`, `train`, ... clash
        raise AdapterError(
            f"adapter name {name!r} is the name of a torch module attribute; pick another name"
        )
    if name in existing:
        raise AdapterError(
            f"an adapter named {name!r} already exists; delete_adapter({name!r}) first or pick another name"
        )
