"""Adapter files in the Hugging Face PEFT layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Key names are ``base_model.model.<module path>.<tensor>`` with the adapter name removed, exactly as HF PEFT
writes them, so adapters move between the two libraries in both directions.

Saving is atomic: each file is written to a temporary name, flushed to disk and renamed into place, weights
first and config last. The weights carry the SHA-256 of the config they were written with, and loading checks
it, so a save interrupted between the two renames is reported instead of loading a mismatched pair.

Loading never unpickles arbitrary objects: ``.safetensors`` is read as is; a legacy ``adapter_model.bin`` is
only read with ``torch.load(weights_only=True)``, which accepts tensors and nothing executable.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
CONFIG_HASH_KEY = "peftkit_config_sha256"


class CheckpointError(ValueError):
    """An adapter checkpoint is missing, damaged, unsafe, or does not fit the model."""


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
    """Write one adapter's config and tensors into ``directory`` atomically; returns the weights path.

    ``safe_serialization=False`` writes ``adapter_model.bin`` (``torch.save`` of plain tensors, which
    ``torch.load(weights_only=True)`` reads back) instead of safetensors, as HF PEFT's option of that name.
    The other format's file, left by an earlier save, is removed: it would be read instead of this one."""
    directory = Path(directory)
    tensors = file_keys(config, tensors)
    directory.mkdir(parents=True, exist_ok=True)
    text = config_text(config)
    metadata = {"format": "pt", CONFIG_HASH_KEY: hashlib.sha256(text.encode()).hexdigest()}
    plain = {key: value.detach().to("cpu").contiguous().clone() for key, value in tensors.items()}
    if safe_serialization:
        weights, stale = directory / WEIGHTS_NAME, directory / LEGACY_WEIGHTS_NAME
        _atomic_write(weights, lambda path: save_file(plain, path, metadata=metadata))
    else:
        weights, stale = directory / LEGACY_WEIGHTS_NAME, directory / WEIGHTS_NAME
        _atomic_write(weights, lambda path: torch.save(plain, path))
    stale.unlink(missing_ok=True)
    _atomic_write(directory / CONFIG_NAME, lambda path: Path(path).write_text(text))
    return weights


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read ``(config, tensors)`` from an adapter directory written by peftkit or HF PEFT."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in {directory} (is this an adapter directory?)")
    text = config_path.read_text()
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from error

    weights = directory / WEIGHTS_NAME
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as handle:
            expected_hash = (handle.metadata() or {}).get(CONFIG_HASH_KEY)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open API)
        if expected_hash is not None and expected_hash != hashlib.sha256(text.encode()).hexdigest():
            raise CheckpointError(
                f"{config_path} and {weights} come from different saves (an interrupted save?); save the adapter again"
            )
        return config, tensors
    legacy = directory / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        try:
            tensors = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as error:  # the safe unpickler refuses anything but tensors and plain containers
            raise CheckpointError(
                f"refusing to load {legacy}: it holds more than tensors, and unpickling it could run code "
                f"({error}). Convert it to {WEIGHTS_NAME} with a tool you trust."
            ) from error
        return config, tensors
    raise CheckpointError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {directory}")


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


def _atomic_write(target: Path, write) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
