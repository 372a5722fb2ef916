"""Adapter files in the Hugging Face PEFT layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Key names are ``base_model.model.<module path>.<tensor>`` with the adapter name removed, exactly as HF PEFT
writes them, so adapters move between the two libraries in both directions.

Saving is atomic as a whole: the complete adapter folder is written beside the target (a hidden sibling) and
swapped in with one atomic exchange of the two folders (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two
renames), so the folder always holds the previous complete adapter or the new complete one, never a mix.
Other adapters' subfolders inside it are carried over as hard links. A folder that holds more than adapter
files (a user's own files) is never swapped: there both files are written completely first and then renamed,
and the weights carry the SHA-256 of the config they were written with, which loading checks. Files get the
usual umask-derived mode, and two saves of the same adapter are byte-identical (sorted header, no times).

Loading reads the config and the safetensors header first, compares names, shapes and dtypes with the model,
and only then reads tensors (see :mod:`peftkit.file_checks`).

Loading never unpickles arbitrary objects: ``.safetensors`` is read as is; a legacy ``adapter_model.bin`` is
only read with ``torch.load(weights_only=True)``, which accepts tensors and nothing executable.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from peftkit.config import ConfigError
from peftkit.file_checks import (
    AdapterFiles,
    CheckpointError,
    check_dtypes,
    check_finite,
    check_header,
    contained_file,
    read_config,
    read_header,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
CONFIG_HASH_KEY = "peftkit_config_sha256"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME, "README.md")
STAGING_SUFFIX = ".saving"


def config_text(config: dict[str, Any]) -> str:
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


# HF PEFT's prompt-learning files (its wrapper holds the model directly, not a tuner around it): the virtual
# tokens are `prompt_embeddings` at the top level, trained modules `base_model.<path>` (not `base_model.model.`).
PROMPT_LEARNING_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
PROMPT_KEY = "prompt_embeddings"
PROMPT_PREFIX = "base_model."


def file_keys(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` under the keys the file's ``peft_type`` uses (peftkit's own keys but for prompt learning)."""
    if config.get("peft_type") not in PROMPT_LEARNING_TYPES:
        return tensors
    renamed = {}
    for key, tensor in tensors.items():
        if key.endswith("." + PROMPT_KEY):
            renamed[PROMPT_KEY] = tensor
        else:
            renamed[PROMPT_PREFIX + key.removeprefix(KEY_PREFIX)] = tensor
    return renamed


def model_keys(
    config: dict[str, Any], tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`file_keys`: a file's tensors under the model's ``expected`` keys."""
    if config.get("peft_type") not in PROMPT_LEARNING_TYPES:
        return tensors
    prompt = [key for key in expected if key.endswith("." + PROMPT_KEY)]
    renamed = {}
    for key, tensor in tensors.items():
        if key == PROMPT_KEY and len(prompt) == 1:
            renamed[prompt[0]] = tensor
        else:
            renamed[KEY_PREFIX + key.removeprefix(PROMPT_PREFIX)] = tensor
    return renamed


def write_adapter(
    directory: str | os.PathLike,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    safe_serialization: bool = True,
) -> Path:
    """Write one adapter's config and tensors into ``directory`` as one atomic swap; returns the weights path.

    ``safe_serialization=False`` writes ``adapter_model.bin`` (``torch.save`` of plain tensors, which
    ``torch.load(weights_only=True)`` reads back) instead of safetensors, as HF PEFT's option of that name.
    The other format's file, left by an earlier save, is removed: it would be read instead of this one."""
    directory = Path(directory)
    tensors = file_keys(config, tensors)
    text = config_text(config)
    metadata = {"format": "pt", CONFIG_HASH_KEY: hashlib.sha256(text.encode()).hexdigest()}
    plain = {key: value.detach().to("cpu").contiguous().clone() for key, value in tensors.items()}
    name = WEIGHTS_NAME if safe_serialization else LEGACY_WEIGHTS_NAME
    stale = LEGACY_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME

    def write_weights(path: str) -> None:
        if safe_serialization:
            save_file(plain, path, metadata=metadata)
            _sort_header(path)
        else:
            torch.save(plain, path)

    if directory.is_symlink():  # save into the folder the link names; the link itself stays as it is
        directory = directory.resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    if directory.is_dir() and not _holds_only_adapters(directory):
        _write_in_place(directory, name, stale, write_weights, text)
    else:
        _write_and_swap(directory, name, write_weights, text)
    return directory / name


def open_adapter(directory: str | os.PathLike) -> AdapterFiles:
    """The adapter in ``directory`` (peftkit or HF PEFT): its config and its tensors' names, shapes and dtypes,
    read without reading any tensor (a legacy ``.bin`` is read whole, with ``weights_only=True``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a folder (an adapter is a folder holding {CONFIG_NAME})")
    config_path = contained_file(directory, CONFIG_NAME)
    if config_path is None:
        raise CheckpointError(f"no {CONFIG_NAME} in {directory} (is this an adapter directory?)")
    config, text = read_config(config_path)
    weights = contained_file(directory, WEIGHTS_NAME)
    if weights is not None:
        header, metadata = read_header(weights)
        expected_hash = metadata.get(CONFIG_HASH_KEY)
        if expected_hash is not None and expected_hash != hashlib.sha256(text.encode()).hexdigest():
            raise CheckpointError(
                f"{config_path} and {weights} come from different saves (an interrupted save?); save the adapter again"
            )
        files = AdapterFiles(config, weights, header)
    else:
        legacy = contained_file(directory, LEGACY_WEIGHTS_NAME)
        if legacy is None:
            raise CheckpointError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {directory}")
        files = AdapterFiles.from_legacy(config, legacy)
    check_dtypes(files.header, files.weights)
    return files


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read ``(config, tensors)`` from an adapter directory written by peftkit or HF PEFT (every tensor)."""
    files = open_adapter(directory)
    return files.config, files.read(list(files.header))


def config_from_file(files: AdapterFiles, parse) -> Any:
    """``parse(files.config)`` (the method's ``from_file``), its errors naming the config file."""
    source = files.weights.parent / CONFIG_NAME
    try:
        return parse(files.config)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from error
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(
            f"{source} is not a usable adapter config: {type(error).__name__}: {error}"
        ) from error


def read_for_model(
    files: AdapterFiles,
    expected: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    source: str,
    finite: bool = True,
) -> dict[str, torch.Tensor]:
    """The file's tensors under the model's keys, read only after its header (names and shapes) matched
    ``expected`` (a copy of a ``base`` weight may come along, of the base weight's shape). ``finite``: refuse
    NaN or infinite adapter weights."""
    mapping = model_keys(files.config, {key: key for key in files.header}, expected)  # model key -> file key
    check_header({key: files.header[file_key] for key, file_key in mapping.items()}, expected, base, source)
    read = files.read(sorted(mapping.values()))
    tensors = {key: read[file_key] for key, file_key in mapping.items()}
    if finite:
        check_finite({key: t for key, t in tensors.items() if key in expected}, source)
    return tensors


def check_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    """Every expected key present with its shape, nothing extra; errors name the key and both shapes."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit this model: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for key, tensor in expected.items():
        if tuple(found[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(found[key].shape)}, "
                f"the model expects {tuple(tensor.shape)}"
            )


def _holds_only_adapters(directory: Path) -> bool:
    """Whether ``directory`` holds adapter files and adapter subfolders only (then it may be swapped whole)."""
    for entry in directory.iterdir():
        if entry.name.endswith(STAGING_SUFFIX) or (entry.name in ADAPTER_FILES and not entry.is_symlink()):
            continue
        if entry.is_dir() and not entry.is_symlink() and (entry / CONFIG_NAME).is_file():
            continue
        return False
    return True


def _write_and_swap(directory: Path, weights_name: str, write_weights, text: str) -> None:
    """Write the whole adapter into a hidden sibling folder, carry other adapters' subfolders over (hard
    links), then exchange the two folders atomically; the old one is removed afterwards."""
    staging = Path(
        tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=STAGING_SUFFIX, dir=directory.parent)
    )
    try:
        os.chmod(staging, 0o777 & ~_umask())
        write_weights(str(staging / weights_name))
        (staging / CONFIG_NAME).write_text(text)
        for written in (staging / weights_name, staging / CONFIG_NAME):
            os.chmod(written, 0o666 & ~_umask())  # safetensors creates its file as 0600
            fsync_path(written)
        if directory.is_dir():
            for entry in directory.iterdir():
                if (
                    entry.is_dir()
                    and entry.name not in ADAPTER_FILES
                    and not entry.name.endswith(STAGING_SUFFIX)
                ):
                    shutil.copytree(entry, staging / entry.name, copy_function=os.link, symlinks=True)
                elif entry.name == "README.md":
                    os.link(entry, staging / entry.name)
            _exchange(staging, directory)
        else:
            os.rename(staging, directory)
        fsync_path(directory.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the old adapter after a swap, or a failed new one


def _write_in_place(directory: Path, weights_name: str, stale: str, write_weights, text: str) -> None:
    """A folder with the user's own files: both files written completely first, then renamed weights first;
    the config hash in the weights reveals a kill between the two renames."""
    weights = _temporary(directory, weights_name)
    config = _temporary(directory, CONFIG_NAME)
    try:
        write_weights(str(weights))
        config.write_text(text)
        for written in (weights, config):
            os.chmod(written, 0o666 & ~_umask())
            fsync_path(written)
        os.replace(weights, directory / weights_name)
        (directory / stale).unlink(missing_ok=True)
        os.replace(config, directory / CONFIG_NAME)
    finally:
        weights.unlink(missing_ok=True)
        config.unlink(missing_ok=True)


def _temporary(directory: Path, name: str) -> Path:
    handle, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(handle)
    return Path(path)


def _exchange(new: Path, old: Path) -> None:
    """Swap two folders in one step where the OS can (Linux renameat2 with RENAME_EXCHANGE), else in two."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        at_fdcwd, rename_exchange = -100, 2
        if renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(old), rename_exchange) == 0:
            return
    aside = old.with_name(old.name + ".old" + STAGING_SUFFIX)
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(old, aside)
    os.rename(new, old)
    os.rename(aside, new)


def _sort_header(path: str) -> None:
    """Rewrite a safetensors header with sorted keys (same length), so equal adapters give equal bytes:
    the library writes its metadata map in hash order."""
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        raw = handle.read(length)
        text = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
        handle.seek(8)
        handle.write(text.ljust(length))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's (its entries') writes to the disk, so a rename never outlives its data."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
