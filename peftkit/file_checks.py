"""Checks on adapter files before peftkit trusts them: links that leave the folder, configs that are not a
JSON object, safetensors headers (names, shapes, dtypes) compared with the model before any tensor is read,
and non-finite values. Every error is a :class:`CheckpointError` naming the file and the key."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open


class CheckpointError(ValueError):
    """An adapter checkpoint is missing, damaged, unsafe, or does not fit the model."""


# Adapter tensors are trained weights: floating point only. Integers or booleans would be cast silently.
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
Header = dict[str, tuple[tuple[int, ...], str]]  # key -> (shape, safetensors dtype name)


def contained_file(directory: Path, name: str) -> Path | None:
    """``directory/name`` if it is a file whose real location (links followed) is inside ``directory``;
    ``None`` if absent. A link that leaves the folder is refused: a weights "file" linked to a system file
    would be read as an adapter."""
    path = directory / name
    if not path.exists() and not path.is_symlink():
        return None
    real, root = path.resolve(), directory.resolve()
    if not real.is_relative_to(root):
        raise CheckpointError(
            f"{path} is a link to {real}, outside the adapter folder {root}; peftkit only reads adapter files "
            "that lie inside the folder (copy the file in instead of linking it)"
        )
    if not real.is_file():
        raise CheckpointError(f"{path} is not a regular file")
    return path


def read_config(path: Path) -> tuple[dict[str, Any], str]:
    """``(config, text)`` of an ``adapter_config.json``, which must be a JSON object."""
    try:
        text = path.read_text(encoding="utf-8")
        config = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{path} must hold a JSON object (the adapter's fields), got {type(config).__name__}"
        )
    return config, text


def read_header(path: Path) -> tuple[Header, dict[str, str]]:
    """The tensors' names, shapes and dtypes and the metadata of a safetensors file, without reading any
    tensor. Damaged files (empty, truncated, random bytes, a header too large) raise naming the file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = {}
            for key in handle.keys():  # noqa: SIM118 (safe_open API)
                piece = handle.get_slice(key)
                header[key] = (tuple(piece.get_shape()), piece.get_dtype())
            return header, dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error


def check_dtypes(header: Header, source: Path) -> None:
    for key, (_, dtype) in sorted(header.items()):
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{source}: tensor {key!r} is stored as {dtype}; adapter tensors must be floating point "
                f"({sorted(FLOAT_DTYPES)}), peftkit does not cast them"
            )


def check_header(
    header: Header, expected: dict[str, torch.Tensor], extra_ok: dict[str, torch.Tensor], source: str
) -> None:
    """Every expected key present with its shape, nothing unknown (``extra_ok``: base weights a file may
    copy, checked by shape too), before any tensor is read; errors name the key and both shapes."""
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected) - set(extra_ok))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit this model: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for key, (shape, _) in header.items():
        want = tuple((expected.get(key) if key in expected else extra_ok[key]).shape)
        if shape != want:
            raise CheckpointError(f"{source}: tensor {key!r} has shape {shape}, the model expects {want}")


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse NaN or infinite adapter weights, naming the tensor: they give NaN or silently wrong outputs."""
    for key, tensor in sorted(tensors.items()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{source}: tensor {key!r} holds {bad} NaN or infinite value(s) of {tensor.numel()}; "
                "pass check_finite=False to load it anyway"
            )


_TORCH_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


@dataclasses.dataclass
class AdapterFiles:
    """An adapter folder's config and its tensors' header; :meth:`read` reads the tensors asked for."""

    config: dict[str, Any]
    weights: Path
    header: Header
    loaded: dict[str, torch.Tensor] | None = None  # a legacy .bin, read whole

    @classmethod
    def from_legacy(cls, config: dict[str, Any], path: Path) -> AdapterFiles:
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # the safe unpickler refuses anything but tensors and plain containers
            raise CheckpointError(
                f"refusing to load {path}: it holds more than tensors, and unpickling it could run code, or it "
                f"is damaged ({error}). Convert it to adapter_model.safetensors with a tool you trust."
            ) from error
        if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
        ):
            raise CheckpointError(f"{path} must hold a dict of tensor names to tensors")
        header = {k: (tuple(v.shape), _TORCH_DTYPES.get(v.dtype, str(v.dtype))) for k, v in tensors.items()}
        return cls(config, path, header, tensors)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        if self.loaded is not None:
            return {key: self.loaded[key] for key in keys}
        try:
            with safe_open(str(self.weights), framework="pt") as handle:
                return {key: handle.get_tensor(key) for key in keys}
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{self.weights} could not be read: {error}") from error
