"""Bytes computed from shapes and dtypes alone: a safetensors file, a 4-bit NF4 weight, a module's tensors.

Everything here works on meta tensors (no data), so a 70B model is sized without allocating it.
"""

from __future__ import annotations

import json
import math

import torch
from torch import nn

# safetensors' dtype codes, in the order of its Rust enum (`Dtype`): the writer sorts tensors by this order,
# largest first, then by name, and the data offsets in the header follow that order.
SAFETENSORS_DTYPES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.uint64: "U64",
}
_RANK = {code: rank for rank, code in enumerate(SAFETENSORS_DTYPES.values())}


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def safetensors_file_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Size in bytes of the file ``safetensors.torch.save_file(tensors, path, metadata)`` writes.

    The format (huggingface/safetensors, ``docs/format``): 8 bytes of header length, a compact JSON header
    (``__metadata__`` then each tensor's dtype, shape and ``[begin, end)`` data offsets), padded with spaces
    to a multiple of 8 bytes, then the raw data. Tensors may live on the meta device.
    """
    ordered = sorted(tensors.items(), key=lambda item: (-_RANK[SAFETENSORS_DTYPES[item[1].dtype]], item[0]))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, tensor in ordered:
        size = tensor_bytes(tensor)
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    padded = math.ceil(len(text) / 8) * 8
    return 8 + padded + offset


def nf4_weight_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes bitsandbytes stores for one 4-bit weight of ``numel`` entries (Dettmers et al. 2023, §3).

    Packed codes (two per byte); one absmax per block of ``blocksize``: fp32, or with double quantization
    8-bit codes plus one fp32 scale per 256 of them, an fp32 offset and the 256-entry fp32 code book of the
    second level; and the 16-entry fp32 NF4 code book: what one layer holds in memory. (Its state dict,
    which :func:`peftkit.quantization.storage_report` counts, holds the offset inside a ~170-byte JSON
    record of the settings instead.)
    """
    blocks = math.ceil(numel / blocksize)
    codes = math.ceil(numel / 2)
    if not double_quant:
        return codes + 4 * blocks + 4 * 16
    return codes + blocks + 4 * math.ceil(blocks / 256) + 4 + 4 * 256 + 4 * 16


def parameter_bytes(module: nn.Module, *, trainable: bool | None = None) -> int:
    """Bytes of ``module``'s distinct parameters and buffers (tied tensors once); ``trainable`` selects
    only those that do (True) or do not (False) require grad; buffers count as frozen."""
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if trainable is None or bool(tensor.requires_grad) == trainable:
            total += tensor_bytes(tensor)
    return total
