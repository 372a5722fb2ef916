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
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit import accounting, checkpoint
from peftkit.adapter_names import check_adapter_name
from peftkit.config import AdapterConfig, ConfigError
from peftkit.integrations.signature import base_signature_forward
from peftkit.layer import BASE_ROW, AdapterError, AdapterLayer, Routing
from peftkit.methods import method_for_config, method_for_file
from peftkit.module_paths import replace_module
from peftkit.modules_to_save import ModulesToSave
from peftkit.parameter_bank import ParameterBank
from peftkit.peft_surface import HfPeftSurface
from peftkit.size_bounds import check_virtual_tokens, check_widths
from peftkit.targeting import name_matches
from peftkit.task_type import TASK_HEADS, file_task_type, with_task_heads


class PeftModel(HfPeftSurface, nn.Module):
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
        fully_trained = [p for p, m in self.base_model.named_modules() if isinstance(m, ModulesToSave)]
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
        for name in names:
            for path, layer in self.adapter_layers():
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

    # --- checkpoints -----------------------------------------------------------------------------------
    def save_pretrained(
        self,
        directory: str | os.PathLike,
        adapter_names: Sequence[str] | None = None,
        *,
        selected_adapters: Sequence[str] | None = None,
        safe_serialization: bool = True,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write each adapter (default: all) in the HF PEFT layout: ``default`` into ``directory`` itself,
        any other adapter into ``directory/<name>``. Only adapter tensors are written, never base weights.

        ``adapter_config.json`` carries ``task_type`` (the config's, or what the model's class is for) and
        ``base_model_name_or_path``, so HF PEFT's ``AutoPeftModelFor...`` and :mod:`peftkit.auto` load it.
        HF PEFT's keywords: ``selected_adapters`` (= ``adapter_names``), ``safe_serialization=False`` (an
        ``adapter_model.bin``), ``is_main_process=False`` (write nothing: another process saves),
        ``state_dict`` (this model's ``state_dict()`` as gathered elsewhere, e.g. under FSDP: the adapter's
        tensors are taken from it instead of from the live parameters)."""
        if adapter_names is not None and selected_adapters is not None:
            raise AdapterError("give `adapter_names` or HF PEFT's `selected_adapters`, not both")
        chosen = adapter_names if adapter_names is not None else selected_adapters
        names = (
            list(self.peft_config)
            if chosen is None
            else [chosen]
            if isinstance(chosen, str)
            else list(chosen)
        )
        for name in names:
            self._check_exists(name)
        if not is_main_process:
            return
        for name in names:
            method = method_for_config(self.peft_config[name])
            config = method.to_file(self.peft_config[name], self._targets[name], self.base_model)
            config["base_model_name_or_path"] = getattr(self.config, "_name_or_path", None) or None
            if "task_type" in config and config["task_type"] is None:
                config["task_type"] = file_task_type(self.base_model, config.get("modules_to_save"))
            tensors = self.adapter_state_dict(name)
            if state_dict is not None:
                tensors = self._tensors_from(state_dict, tensors)
            target = (
                Path(directory) if name == "default" else Path(directory) / name
            )  # names hold no '/' or '..'
            checkpoint.write_adapter(target, config, tensors, safe_serialization=safe_serialization)

    def _tensors_from(
        self, state_dict: dict[str, torch.Tensor], live: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The adapter tensors ``live`` (checkpoint key -> live tensor) read from ``state_dict``, which holds
        them under this model's own ``state_dict()`` keys (or already under the checkpoint keys)."""
        own_keys = {id(t): k for k, t in self.state_dict(keep_vars=True).items()}
        tensors = {}
        for key, tensor in live.items():
            own = own_keys.get(id(tensor))
            if own is None and key not in state_dict:  # a value kept aside, not a tensor of the model
                tensors[key] = tensor
                continue
            source = key if key in state_dict else own
            if source not in state_dict:
                raise checkpoint.CheckpointError(
                    f"`state_dict` lacks the adapter tensor {own or key!r}; pass this model's state_dict()"
                )
            tensors[key] = state_dict[source]
        return tensors

    def load_adapter(
        self,
        directory: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        check_finite: bool = True,
    ):
        """Add adapter ``adapter_name`` from a peftkit or HF PEFT adapter directory.

        The config is applied (and bounded against the model, e.g. LoRA's ``r``) and the file's header (names,
        shapes, dtypes) compared with the model before any tensor is read: a mismatch raises
        :class:`CheckpointError` naming the key and both shapes, and the model is left without the
        half-loaded adapter. ``check_finite``: refuse NaN or infinite weights, naming the tensor."""
        check_adapter_name(adapter_name)
        files = checkpoint.open_adapter(directory)
        config = checkpoint.config_from_file(files, lambda data: method_for_file(data).from_file(data))
        try:
            self.add_adapter(adapter_name, config)
        except ConfigError as error:  # a size bound or a target the model lacks: say which file asked for it
            raise ConfigError(f"{Path(directory) / checkpoint.CONFIG_NAME}: {error}") from error
        try:
            self._load_checked(files, adapter_name, str(files.weights), check_finite)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        if not is_trainable:
            self._inference_only.add(adapter_name)
        self._apply_active(self._active)

    def load_adapter_weights(
        self, directory: str | os.PathLike, adapter_name: str = "default", check_finite: bool = True
    ) -> None:
        """Overwrite existing adapter ``adapter_name``'s tensors, in place, with those saved in ``directory``
        (a checkpoint of the same adapter: what ``Trainer``'s ``resume_from_checkpoint`` needs, the optimizer
        keeps pointing at the same parameters). Keys, shapes and dtypes are checked from the file's header
        before any tensor is read, and nothing is written before all of them passed (``check_finite``: as
        :meth:`load_adapter`)."""
        self._check_exists(adapter_name)
        files = checkpoint.open_adapter(directory)
        self._load_checked(files, adapter_name, str(files.weights), check_finite)

    def _load_checked(
        self, files: checkpoint.AdapterFiles, name: str, source: str, check_finite: bool
    ) -> None:
        expected = self.adapter_state_dict(name)
        base = {f"{checkpoint.KEY_PREFIX}{n}": p for n, p in self.base_model.named_parameters()}
        tensors = checkpoint.read_for_model(files, expected, base, source, check_finite)
        tensors = self._drop_base_copies(tensors, expected, source=source)
        checkpoint.check_tensors(tensors, expected, source=source)
        with torch.no_grad():
            self._load_tensors(name, tensors)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        directory: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        check_finite: bool = True,
    ) -> PeftModel:
        """``model`` with the adapter saved in ``directory`` (peftkit or HF PEFT), active; frozen unless
        ``is_trainable``. Errors as :meth:`load_adapter`."""
        check_adapter_name(adapter_name)
        peft_model = cls(model, None)
        peft_model.load_adapter(directory, adapter_name, is_trainable=is_trainable, check_finite=check_finite)
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
        self._active = ()
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
        routing = Routing.from_row_names(list(adapter_names), device)
        for layer in layers:
            layer.routing = routing
        try:
            yield
        finally:
            for layer in layers:
                layer.routing = None

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
