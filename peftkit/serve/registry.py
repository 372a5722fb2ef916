"""The served adapters: where each one comes from, which are resident in the model, and eviction (LRU).

An adapter is *known* once the operator named it (``--adapter name=DIR``) or a client loaded it from an
allowed directory (``POST /v1/adapters``); it is *resident* while its tensors are in the ``PeftModel``. At
most ``max_resident`` adapters are resident: loading one more evicts the least recently used adapter that no
running request uses, and a request for an evicted adapter loads it again from its directory (an adapter's
output does not depend on how often it was evicted: its file is read again, exactly).

Only the scheduler's thread calls the methods that change the model (``acquire``, ``release``, ``remove``),
so the model never changes under a running step.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from peftkit.config import ConfigError
from peftkit.layer import added_parameter_ids
from peftkit.methods import method_for_config
from peftkit.model import AdapterError, PeftModel

ADAPTER_CONFIG = "adapter_config.json"
GENERATION_TASKS = ("causal-lm",)


class AdapterNotFound(AdapterError):
    """A request named an adapter the server does not know."""


class AdapterBusy(AdapterError):
    """Every resident adapter is in use by a running request, so none can make room for another."""


@dataclass
class Adapter:
    name: str
    directory: Path  # the folder with adapter_config.json
    chat_template: str | None = None  # the adapter's own, when its folder carries one
    in_use: int = 0  # running requests
    removing: bool = False  # deleted by a client: unloaded when its last request ends


def locate_adapter(path: str | os.PathLike) -> tuple[Path, str | None, list[str] | None]:
    """(adapter folder, the run's task, the run's label names) of ``path``: an adapter folder itself (no task
    known from it), or a finished ``peftkit train`` run folder (its ``adapter/`` and ``labels.json``); a
    run's ``adapter/`` folder named directly is read with its run's labels. Raises ConfigError naming what
    was expected."""
    from peftkit.training.layout import RunFolder

    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file():
        run = RunFolder(path.parent)
        if path.name == run.adapter_dir.name and run.task() is not None:
            return path, run.task(), _label_names(run)
        return path, None, None
    run = RunFolder(path)
    if run.is_finished() and (run.adapter_dir / ADAPTER_CONFIG).is_file():
        return run.adapter_dir, run.task(), _label_names(run)
    raise ConfigError(
        f"{path} is neither an adapter folder ({ADAPTER_CONFIG}) nor a finished `peftkit train` run "
        "(config.yaml and adapter/)"
    )


def _label_names(run) -> list[str] | None:
    """The label names a run's head was built for (None when the run does not say)."""
    try:
        names = run.read_labels()[1]
    except (OSError, KeyError, ValueError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def adapter_directory(path: str | os.PathLike) -> Path:
    """The adapter folder of ``path`` (see :func:`locate_adapter`), which must be a generation adapter."""
    directory, task, _ = locate_adapter(path)
    if task is not None and task not in GENERATION_TASKS:
        raise ConfigError(
            f"{path} is a {task} run; text generation serves {GENERATION_TASKS} runs "
            "(classification runs are served by POST /v1/classify)"
        )
    return directory


def _chat_template(directory: Path) -> str | None:
    for folder in (directory, directory.parent):
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        tokenizer_config = folder / "tokenizer_config.json"
        if tokenizer_config.is_file():
            template = json.loads(tokenizer_config.read_text()).get("chat_template")
            if isinstance(template, str):
                return template
    return None


class Registry:
    def __init__(self, model: PeftModel, max_resident: int, roots: list[Path]) -> None:
        if max_resident < 1:
            raise ConfigError(f"`max_adapters` must be at least 1, got {max_resident}")
        self.model = model
        self.max_resident = max_resident
        self.roots = [Path(root).resolve() for root in roots]
        self.known: dict[str, Adapter] = {}
        self.resident: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.input_methods: dict[str, object] = {}  # resident adapters that enter through the inputs
        self.loads = 0  # adapter loads, evicted ones reloaded included (a metric)
        self.changes = 0  # loads and unloads: the model's adapter layers may differ after each

    # --- known adapters (any thread: only dict updates) ---------------------------------------------------
    def add(self, name: str, path: str | os.PathLike, *, trusted: bool) -> Adapter:
        """Know adapter ``name`` from ``path``; a client's path (``trusted`` False) must lie under a root."""
        if name in self.known:
            state = (
                "is being removed (its running requests finish first)"
                if self.known[name].removing
                else ("is already served; DELETE it first")
            )
            raise AdapterError(f"an adapter named {name!r} {state}")
        directory = adapter_directory(self.allowed(path) if not trusted else Path(path))
        adapter = Adapter(name, directory, _chat_template(directory))
        self.known[name] = adapter
        return adapter

    def allowed(self, path: str | os.PathLike) -> Path:
        """``path`` resolved (links followed); relative paths are taken against the first root. Refused
        (PermissionError) unless it lies inside an ``--adapter-root``."""
        if not self.roots:
            raise PermissionError(
                "loading adapters at run time is off: start the server with --adapter-root DIR"
            )
        path = Path(path)
        resolved = (path if path.is_absolute() else self.roots[0] / path).resolve()
        if not any(resolved == root or root in resolved.parents for root in self.roots):
            raise PermissionError(
                f"`path` {str(path)!r} is outside the allowed adapter roots {[str(r) for r in self.roots]}"
            )
        return resolved

    def get(self, name: str) -> Adapter:
        adapter = self.known.get(name)
        if adapter is None or adapter.removing:
            raise AdapterNotFound(f"no adapter named {name!r}; served: {self.names()}")
        return adapter

    def names(self) -> list[str]:
        known = list(self.known.items())  # a snapshot: the scheduler's thread may change the dict meanwhile
        return sorted(name for name, adapter in known if not adapter.removing)

    # --- residency (the scheduler's thread only) ----------------------------------------------------------
    def acquire(self, name: str) -> None:
        """Make ``name`` resident (loading it, evicting the least recently used idle one) and count a user."""
        adapter = self.get(name)
        if name not in self.resident:
            self._make_room()
            self.changes += 1  # counted first: a load that fails halfway may have added layers
            self.model.load_adapter(adapter.directory, name)
            self.resident[name] = None
            self.loads += 1
            try:
                self._check_servable(name)
            except AdapterError:
                self._unload(name)
                del self.known[name]
                raise
        self.resident.move_to_end(name)
        adapter.in_use += 1

    def release(self, name: str) -> None:
        adapter = self.known[name]
        adapter.in_use -= 1
        if adapter.removing and adapter.in_use == 0:
            self._unload(name)
            del self.known[name]

    def remove(self, name: str) -> None:
        """Forget ``name``: new requests are refused at once, running ones finish, then it is unloaded."""
        adapter = self.get(name)
        adapter.removing = True
        if adapter.in_use == 0:
            self._unload(name)
            del self.known[name]

    def _make_room(self) -> None:
        while len(self.resident) >= self.max_resident:
            idle = next((n for n in self.resident if self.known[n].in_use == 0), None)
            if idle is None:
                raise AdapterBusy(
                    f"all {self.max_resident} resident adapters (--max-adapters) serve running requests"
                )
            self._unload(idle)

    def _unload(self, name: str) -> None:
        if name in self.resident:
            self.changes += 1
            self.model.delete_adapter(name)
            del self.resident[name]
            self.input_methods.pop(name, None)

    def _check_servable(self, name: str) -> None:
        """Adapters that change base parameters in place (BitFit, LoRA with trained biases, layer tuning)
        cannot differ per row of a batch: refused, with the reason and the way out."""
        added = added_parameter_ids(self.model.base_model)
        if any(id(p) not in added for p in self.model.adapter_parameters(name)):
            raise AdapterError(
                f"adapter {name!r} ({self.model.peft_config[name].method}) trains base-model parameters in "
                "place, which cannot differ per row of a shared batch; merge it into the base model "
                "(merge_and_unload) and serve that model instead"
            )
        method = method_for_config(self.model.peft_config[name])
        if method.prepare_generation is not None:
            self.input_methods[name] = method
