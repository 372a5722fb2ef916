"""Checkpoints for :class:`~peftkit.model.PeftModel`: save adapters in the Hugging Face PEFT layout and load
them back (files checked before any tensor is read). Part of ``PeftModel`` (this class holds no state of its
own); kept apart so that the lifecycle module stays readable."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from peftkit import checkpoint
from peftkit.adapter_names import check_adapter_name
from peftkit.config import ConfigError
from peftkit.layer import AdapterError, plain_named_parameters, plain_paths
from peftkit.methods import method_for_config, method_for_file
from peftkit.task_type import file_task_type

if TYPE_CHECKING:
    from peftkit.model import PeftModel


class AdapterCheckpoints:
    """``PeftModel``'s save / load methods (see :mod:`peftkit.model`)."""

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
        base = self._base_keys(name)
        tensors = checkpoint.read_for_model(files, expected, base, source, check_finite)
        tensors = self._drop_base_copies(tensors, expected, base, source=source)
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
        """The adapter's tensors under their checkpoint keys (``base_model.model.<path>.<tensor>``), ``<path>``
        being the path in the model that carries this adapter alone (:func:`peftkit.layer.plain_paths`): the
        keys do not depend on the adapters of other methods that wrap the same layers."""
        self._check_exists(name)
        tensors = {}
        for path, layer in self._layers_of(name):
            for key, tensor in layer.adapter_state_dict(name).items():
                tensors[f"{checkpoint.KEY_PREFIX}{path}.{key}"] = tensor
        for key, tensor in self._bank.state_dict(self.base_model, name).items():
            tensors[f"{checkpoint.KEY_PREFIX}{key}"] = tensor
        return tensors

    def _load_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        for path, layer in self._layers_of(name):
            prefix = f"{checkpoint.KEY_PREFIX}{path}."
            own = {key: tensors[prefix + key] for key in layer.adapter_state_dict(name)}
            layer.load_adapter_state_dict(name, own)
        in_place = {
            b: tensors[f"{checkpoint.KEY_PREFIX}{b}"] for b in self._bank.state_dict(self.base_model, name)
        }
        self._bank.load(self.base_model, name, in_place)

    def _drop_base_copies(
        self,
        tensors: dict[str, torch.Tensor],
        expected: dict[str, torch.Tensor],
        base: dict[str, nn.Parameter],
        source: str,
    ) -> dict[str, torch.Tensor]:
        """HF PEFT also writes the full embedding table when LoRA targets an embedding (in case the vocabulary
        was resized). A copy equal to the model's own table is redundant and skipped; a different one would
        silently replace base weights, so it is refused."""
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

    def _layers_of(self, name: str) -> list[tuple[str, nn.Module]]:
        """The layers holding adapter ``name``, each with its path in the model that carries it alone."""
        paths = plain_paths(self.base_model, name)
        return [(paths[p], layer) for p, layer in self.adapter_layers() if name in layer.adapter_names()]

    def _base_keys(self, name: str) -> dict[str, nn.Parameter]:
        """The base weights under every key a file of adapter ``name`` may give a copy of them: this model's
        names, and those of the model carrying the adapter alone (HF PEFT's: a LoRA-wrapped embedding's table
        is ``<layer>.base_layer.weight`` however many other adapters wrap the embedding here)."""
        named = [*self.base_model.named_parameters(), *plain_named_parameters(self.base_model, name)]
        return {f"{checkpoint.KEY_PREFIX}{key}": parameter for key, parameter in named}
