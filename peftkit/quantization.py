"""A model's linear layers in 4-bit NormalFloat with double quantization (QLoRA's storage), via bitsandbytes.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) stores each frozen weight in NF4: blocks of 64 values, each
block scaled by its absolute maximum ``c`` and rounded to the nearest of 16 levels placed at quantiles of
N(0, 1), so ``W ≈ c · q``. Double quantization stores the fp32 block scales themselves in 8 bit (blocks of
256 scales, one fp32 second-level scale each): ``4 + 8/64 + 32/(64·256) ≈ 4.127`` bits, about 0.516 bytes per
parameter. Compute de-quantizes on the fly to the compute dtype.

The kernels are bitsandbytes' (``bnb.nn.Linear4bit``, ``quant_type="nf4"``, ``compress_statistics=True``),
which run on CPU and CUDA; a model loaded by transformers with ``BitsAndBytesConfig(load_in_4bit=True, ...)``
holds the same layers and works with everything here. The output head and the embeddings stay in full
precision (``"all-linear"`` leaves the head out; embeddings are not linear layers), and so do the modules a
transformers model keeps in float32 (``_keep_in_fp32_modules``: T5's ``wo``, whose forward casts its input
to the weight's dtype). As in transformers' own bitsandbytes integration, ``Conv1D`` layers (GPT-2) are
quantized with their weight transposed to the (out, in) layout, and so are subclasses of ``nn.Linear`` that
compute a plain linear map (Falcon's ``FalconLinear``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.config import ConfigError, as_name_tuple, check_choice
from peftkit.layer import AdapterLayer
from peftkit.targeting import name_matches, output_head_names, select_modules

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


# bitsandbytes' CPU backend, while it is imported, tries to fetch an optional kernel from the Hugging Face hub
# through the `kernels` package and logs "Failed to load CPU gemm_4bit_forward from kernels-community: No
# module named 'kernels'" on every run without it. peftkit never downloads at run time and bitsandbytes falls
# back to its own kernel, so that one message is dropped during the import; its other messages pass.
_OPTIONAL_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
_OPTIONAL_KERNEL_NOISE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_optional_kernel_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_OPTIONAL_KERNEL_NOISE)


def import_bitsandbytes():
    """bitsandbytes, imported on first use (it takes seconds, and plain LoRA never needs it), without its
    optional-kernel warning. Raises ImportError naming the package when it is missing."""
    logger = logging.getLogger(_OPTIONAL_KERNEL_LOGGER)
    logger.addFilter(_not_optional_kernel_noise)
    try:
        import bitsandbytes
    except ImportError as error:  # pragma: no cover - it is a dependency of peftkit
        raise ImportError("4-bit quantization needs bitsandbytes: pip install bitsandbytes") from error
    finally:
        logger.removeFilter(_not_optional_kernel_noise)
    return bitsandbytes


@dataclass(frozen=True)
class QuantizationConfig:
    """Which linear layers to store in 4 bit, and how.

    Fields:
        target_modules: ``"all-linear"`` (every ``nn.Linear`` but the output head), a list of names (suffix
            match) or one regex (whole-path match), as in :class:`~peftkit.LoraConfig`.
        exclude_modules: names or a regex kept in full precision.
        quant_type: ``nf4`` (QLoRA's NormalFloat) or ``fp4``.
        double_quant: quantize the block scales too (8 bit, blocks of 256): ~0.127 instead of 0.5 bits/param.
        blocksize: values per quantization block (QLoRA: 64).
        compute_dtype: dtype the weights are de-quantized to for the matmul.
    """

    target_modules: str | tuple[str, ...] = "all-linear"
    exclude_modules: str | tuple[str, ...] | None = None
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules"):
            value = as_name_tuple(name, getattr(self, name), allow_string=True)
            object.__setattr__(self, name, value)
        if self.target_modules is None:
            raise ConfigError(
                "`target_modules` must name the layers to quantize, e.g. 'all-linear'; got None"
            )
        check_choice("quant_type", self.quant_type, QUANT_TYPES)
        if not isinstance(self.double_quant, bool):
            raise ConfigError(f"`double_quant` must be true or false, got {self.double_quant!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ConfigError(f"`blocksize` must be one of {list(BLOCKSIZES)}, got {self.blocksize!r}")
        check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return getattr(torch, self.compute_dtype)


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit linear layer (checked without importing bitsandbytes)."""
    return any(
        f"{cls.__module__}.{cls.__qualname__}" == "bitsandbytes.nn.modules.Linear4bit"
        for cls in type(module).__mro__
    )


def is_quantized(model: nn.Module) -> bool:
    return any(is_quantized_linear(m) for m in model.modules())


# --- one layer -------------------------------------------------------------------------------------------
def quantize_linear(linear: nn.Linear | Conv1D, config: QuantizationConfig) -> nn.Module:
    """A ``bnb.nn.Linear4bit`` holding ``linear``'s weight (out, in) in 4 bit (on the weight's device) and its
    bias as is; a ``Conv1D`` weight (in, out) is transposed first. De-quantizing gives the (out, in) weight
    back in its original dtype."""
    bnb = import_bitsandbytes()
    weight = linear.weight.detach()
    if isinstance(linear, Conv1D):
        weight = weight.T.contiguous()
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=linear.bias is not None,
        compute_dtype=config.torch_compute_dtype,
        compress_statistics=config.double_quant,
        quant_type=config.quant_type,
        device="meta",  # no full-precision copy is allocated: the weight arrives quantized below
    )
    _set_quantized_weight(layer, weight, blocksize=config.blocksize)
    layer.source_cls = type(linear)  # as transformers' integration records it
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=linear.bias.requires_grad)
    layer.train(linear.training)
    return layer


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight (out, in) de-quantized, in the dtype it had before quantization."""
    bnb = import_bitsandbytes()
    param = layer.weight
    state = param.quant_state if param.quant_state is not None else layer.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks a weight for its CPU inference kernel (AVX512-BF16) on the first eval forward,
        # undoing double quantization; put it back in the standard layout (what its own state_dict does)
        param.data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(param.data, state)
        param.quant_state = layer.quant_state = state
    with torch.no_grad():
        return bnb.functional.dequantize_4bit(param.data, state)


def requantize_(layer: nn.Module, weight: torch.Tensor) -> None:
    """Store ``weight`` (out, in) in ``layer`` with the layer's own quantization settings (in place)."""
    old = layer.weight
    _set_quantized_weight(
        layer,
        weight,
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_type=old.quant_type,
        quant_storage=old.quant_storage,
    )


def dequantize_linear(layer: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` with the de-quantized weight (dtype: the original one unless given)."""
    weight = dequantize_weight(layer)
    dtype = dtype or weight.dtype
    plain = nn.Linear(
        layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta", dtype=dtype
    )
    plain.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if layer.bias is not None:
        plain.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    plain.train(layer.training)
    return plain


def _set_quantized_weight(layer: nn.Module, weight: torch.Tensor, **settings) -> None:
    bnb = import_bitsandbytes()
    settings.setdefault("compress_statistics", layer.weight.compress_statistics)
    settings.setdefault("quant_type", layer.weight.quant_type)
    param = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, module=layer, **settings)
    layer.weight = param.to(weight.device)  # Params4bit quantizes when moved to a real device
    # keep the double-quantized storage on CPU too (bitsandbytes would repack it for inference, see above)
    layer.support_avx512bf16_for_cpu = False


# --- a whole model ---------------------------------------------------------------------------------------
def quantize_model(model: nn.Module, config: QuantizationConfig | None = None) -> list[str]:
    """Replace the targeted linear layers of ``model`` in place by 4-bit ones; returns their paths.

    Quantized: ``nn.Linear``, transformers' ``Conv1D`` (transposed) and subclasses of ``nn.Linear`` whose
    forward computes ``x W^T + b`` (checked on a probe input). Never quantized, even when named: the output
    head, the modules the model keeps in float32 (:func:`kept_in_fp32`), layers already 4-bit or wrapped by
    an adapter. Quantizing a layer frees its full-precision weight once nothing else holds it.

    Raises :class:`ConfigError` when the targets leave no layer to quantize."""
    config = config or QuantizationConfig()
    kept = output_head_names(model) | kept_in_fp32(model)
    targets = select_modules(
        model,
        target_modules=config.target_modules,
        exclude_modules=config.exclude_modules,
        supported=lambda m: True,
        supported_text="nn.Linear",
    )
    targets = [path for path in targets if path not in kept and _quantizable(model.get_submodule(path))]
    if not targets:
        raise ConfigError(
            f"`target_modules`={config.target_modules!r} selects no full-precision linear layer to quantize in "
            f"{type(model).__name__} (the output head and the modules it keeps in float32 stay unquantized: "
            f"{sorted(kept - {''})[:10]})"
        )
    for path in targets:
        parent, _, child = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, quantize_linear(getattr(owner, child), config))
    return targets


def kept_in_fp32(model: nn.Module) -> set[str]:
    """Paths of the modules a transformers model keeps in float32 (``_keep_in_fp32_modules`` and
    ``_keep_in_fp32_modules_strict`` of each of its pretrained submodels; T5's ``wo``). transformers'
    bitsandbytes integration never quantizes them either; a 4-bit T5 ``wo`` makes the model cast its
    activations to the 4-bit storage type (garbage forward, training fails)."""
    kept: set[str] = set()
    for prefix, module in model.named_modules():
        names = [
            *(getattr(module, "_keep_in_fp32_modules", None) or ()),
            *(getattr(module, "_keep_in_fp32_modules_strict", None) or ()),
        ]
        if not names:
            continue
        for path, _ in module.named_modules():
            if path and name_matches(path, names):
                kept.add(f"{prefix}.{path}" if prefix else path)
    return kept


def _quantizable(module: nn.Module) -> bool:
    """A full-precision layer whose computation a 4-bit ``Linear4bit`` reproduces: ``nn.Linear``, ``Conv1D``,
    or an ``nn.Linear`` subclass that computes ``x W^T + b`` (Falcon's), checked on one probe row so that a
    subclass computing something else stays unquantized. Not: 4-bit layers, adapter wrappers, other types."""
    if isinstance(module, AdapterLayer) or is_quantized_linear(module):
        return False
    if type(module) in (nn.Linear, Conv1D):
        return True
    if not isinstance(module, nn.Linear) or module.weight.is_meta:
        return False
    if type(module).forward is nn.Linear.forward:
        return True
    weight = module.weight
    probe = torch.randn(
        2, module.in_features, generator=torch.Generator().manual_seed(0), dtype=torch.float32
    ).to(weight.device, weight.dtype)
    with torch.no_grad():
        got, expected = module(probe), F.linear(probe, weight, module.bias)
    return got.shape == expected.shape and torch.allclose(got.float(), expected.float(), rtol=1e-3, atol=1e-4)


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every 4-bit linear layer of ``model`` in place by a plain ``nn.Linear``; returns their paths."""
    paths = [
        p for p, m in model.named_modules() if is_quantized_linear(m) and not isinstance(m, AdapterLayer)
    ]
    for path in paths:
        parent, _, child = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, dequantize_linear(getattr(owner, child), dtype))
    return paths


# --- storage accounting ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StorageReport:
    """Bytes held by a model, from its actual tensors (``state_dict``, tied tensors once).

    ``quantized_bytes`` counts everything a 4-bit layer stores for its weight: packed 4-bit codes, 8-bit block
    scales, their fp32 second-level scales and offset, both code books and bitsandbytes' packed settings."""

    quantized_parameters: int  # logical weight entries held in 4 bit
    quantized_bytes: int
    other_bytes: int  # everything else: embeddings, head, norms, biases, adapters

    @property
    def bytes_per_quantized_parameter(self) -> float:
        return self.quantized_bytes / self.quantized_parameters if self.quantized_parameters else 0.0

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.other_bytes


def storage_report(model: nn.Module) -> StorageReport:
    quantized_parameters = quantized_bytes = 0
    counted: set[tuple[int, int]] = set()
    # state_dict() builds some tensors on the fly (bitsandbytes' packed quantization state); they are kept
    # alive until the count is done, or a freed one's address could be reused and taken for a duplicate
    alive: list[dict[str, torch.Tensor]] = []
    for module in model.modules():
        if is_quantized_linear(module):
            quantized_parameters += module.in_features * module.out_features
            alive.append(module.state_dict())
            for key, tensor in alive[-1].items():
                if key == "weight" or key.startswith("weight."):
                    quantized_bytes += _count_once(tensor, counted)
    alive.append(model.state_dict())
    other_bytes = sum(_count_once(t, counted) for t in alive[-1].values())
    return StorageReport(quantized_parameters, quantized_bytes, other_bytes)


def _count_once(tensor: torch.Tensor, counted: set[tuple[int, int]]) -> int:
    key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
    if key in counted:
        return 0
    counted.add(key)
    return tensor.numel() * tensor.element_size()


# --- preparation for k-bit training ----------------------------------------------------------------------
def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = False) -> nn.Module:
    """What training on a quantized base needs, done once (HF PEFT leaves it to the user as
    ``prepare_model_for_kbit_training``): the base frozen; normalisation layers in fp32 (their statistics
    lose too much in 16 bit); the input embeddings' output made to require grad (transformers models), so
    that checkpointed blocks whose own parameters are all frozen still pass gradients to the adapters inside
    them, also when checkpointing is switched on later; with ``gradient_checkpointing``, checkpointing on
    (non-reentrant)."""
    model.requires_grad_(False)
    for module in model.modules():
        if is_quantized_linear(module):
            # keep the double-quantized storage when it runs for inference too (bitsandbytes would repack
            # it for its AVX512-BF16 CPU kernel, undoing double quantization; that also fails on layers
            # narrower than one block)
            module.support_avx512bf16_for_cpu = False
        if "norm" in type(module).__name__.lower():
            for param in module.parameters(recurse=False):
                if param.is_floating_point() and param.dtype != torch.float32:
                    param.data = param.data.float()
    if hasattr(model, "enable_input_require_grads"):
        # always, not only when checkpointing is asked for here: switching it on later stays safe
        model.enable_input_require_grads()
    if gradient_checkpointing:
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise ConfigError(
                f"`gradient_checkpointing`=True needs a transformers model; {type(model).__name__} has no "
                "gradient_checkpointing_enable()"
            )
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict | None = None,
) -> nn.Module:
    """Hugging Face PEFT's name and defaults for :func:`prepare_for_kbit_training`: checkpointing is on
    unless ``use_gradient_checkpointing=False`` (non-reentrant unless ``gradient_checkpointing_kwargs`` say
    otherwise)."""
    prepare_for_kbit_training(model)
    if use_gradient_checkpointing:
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise ConfigError(
                f"`use_gradient_checkpointing`=True needs a transformers model; {type(model).__name__} has no "
                "gradient_checkpointing_enable(); pass use_gradient_checkpointing=False"
            )
        enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs or {"use_reentrant": False})
    return model
