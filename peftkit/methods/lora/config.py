"""LoRA's config, and its translation to and from Hugging Face PEFT's ``adapter_config.json``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from peftkit.config import (
    AdapterConfig,
    ConfigError,
    as_name_tuple,
    check_choice,
    check_number,
    check_positive_int,
    register_config,
)
from peftkit.layer import ADAPTER_DTYPES
from peftkit.task_type import TASK_TYPES, task_type_value

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("default", "gaussian", "random")

# peftkit `init` <-> HF PEFT `init_lora_weights`
_INIT_TO_HF: dict[str, bool | str] = {"default": True, "gaussian": "gaussian", "random": False}


def _init_from_hf(value: Any) -> str:
    for init, hf in _INIT_TO_HF.items():
        if value is hf or (isinstance(value, str) and value == hf):
            return init
    raise ConfigError(
        f"`init_lora_weights`={value!r} is not supported by peftkit; supported: True (A Kaiming-uniform, B zero), "
        "'gaussian', False (both random)"
    )


def _fan_in_fan_out(value: Any) -> None:
    """peftkit reads the weight layout from the layer type (``Conv1D`` is stored transposed), which is what
    HF PEFT ends up doing too (it corrects a wrong setting with a warning): the value is checked and dropped."""
    if not isinstance(value, bool):
        raise ConfigError(f"`fan_in_fan_out` must be true or false, got {value!r}")


# HF PEFT fields that change what a LoRA adapter computes. peftkit does not implement them, so an adapter
# that sets them is refused rather than loaded with the option silently ignored. Value: the neutral setting.
_HF_UNSUPPORTED: dict[str, Any] = {
    "use_dora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "fan_in_fan_out": None,  # checked separately: peftkit detects the weight layout itself
    "layer_replication": None,
    "lora_bias": False,
    "use_qalora": False,
    "trainable_token_indices": None,
    "target_parameters": None,
    "alora_invocation_tokens": None,
}


@register_config
@dataclass(frozen=True)
class LoraConfig(AdapterConfig):
    """Low-rank adaptation (Hu et al. 2021, arXiv:2106.09685).

    A frozen weight ``W0`` (out x in) gets a trainable update ``ΔW = s · B A`` with ``A`` (r x in),
    ``B`` (out x r) and ``s = alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``, Kalajdzievski 2023),
    so ``h = W0 x + s · B A x``. With ``B = 0`` at start the adapted model equals the base model.

    Fields:
        r: rank of the update.
        alpha: scale numerator.
        dropout: dropout on the adapter's input, in [0, 1).
        target_modules: a list of module names (suffix match), one regex (whole-path match), ``"all-linear"``
            (every linear layer except the output head), or ``None`` for the architecture's default.
        exclude_modules: names or a regex removed from the targets.
        layers_to_transform: indices of the repeated blocks to adapt (others are left alone).
        layers_pattern: name of the block list holding those indices (found automatically when ``None``).
        bias: which base biases train with the adapter: ``none``, ``all`` or ``lora_only`` (of adapted layers).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a fresh classifier head).
        init: ``default`` (A Kaiming-uniform, B zero), ``gaussian`` (A ~ N(0, 1/r), B zero) or ``random``
            (A and B both non-zero: the adapter changes the output from the start; for tests and analysis).
        adapter_dtype: dtype of the A and B matrices and of their compute: ``float32``,
            ``bfloat16`` or ``float16``; ``None`` follows the base layer (its weight's dtype, or for a 4-bit
            quantized layer its compute dtype). Not written to ``adapter_config.json`` (HF PEFT has no such
            field): a loaded adapter takes the default of the model it is loaded onto.
        task_type: HF PEFT's :class:`~peftkit.TaskType` (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...), written to
            ``adapter_config.json``; ``None``: the saved file says what the model's class is for.

    Hugging Face PEFT's spellings are accepted as aliases: ``lora_alpha`` (``alpha``), ``lora_dropout``
    (``dropout``), ``init_lora_weights`` (``init``: True, ``"gaussian"``, False) and ``fan_in_fan_out``
    (accepted and ignored: the layout is read from the layer type).
    """

    method: ClassVar[str] = "lora"
    aliases: ClassVar[dict[str, Any]] = {
        "lora_alpha": ("alpha", None),
        "lora_dropout": ("dropout", None),
        "init_lora_weights": ("init", _init_from_hf),
        "fan_in_fan_out": (None, _fan_in_fan_out),
    }

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: str | None = None
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: tuple[str, ...] | None = None
    init: str = "default"
    adapter_dtype: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        check_positive_int("r", self.r)
        check_number("alpha", self.alpha, low=0, high=math.inf)
        check_number("dropout", self.dropout, low=0.0, high=1.0)
        self._set("target_modules", as_name_tuple("target_modules", self.target_modules, allow_string=True))
        self._set(
            "exclude_modules", as_name_tuple("exclude_modules", self.exclude_modules, allow_string=True)
        )
        self._set(
            "modules_to_save", as_name_tuple("modules_to_save", self.modules_to_save, allow_string=False)
        )
        self._set("layers_to_transform", _as_layer_indices(self.layers_to_transform))
        if self.layers_pattern is not None and not (
            isinstance(self.layers_pattern, str) and self.layers_pattern
        ):
            raise ConfigError(
                f"`layers_pattern` must be a non-empty string or None, got {self.layers_pattern!r}"
            )
        check_choice("bias", self.bias, BIAS_MODES)
        check_choice("init", self.init, INIT_MODES)
        check_choice("adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"`use_rslora` must be true or false, got {self.use_rslora!r}")
        check_choice("task_type", getattr(self.task_type, "value", self.task_type), (*TASK_TYPES, None))
        self._set("task_type", task_type_value(self.task_type))  # a TaskType is kept as its string value

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    # --- Hugging Face PEFT adapter_config.json --------------------------------------------------------------
    def to_hf_dict(self, resolved_targets: list[str]) -> dict[str, Any]:
        """Fields of HF PEFT's ``LoraConfig``. ``all-linear`` is written as the resolved module paths so that
        both libraries adapt exactly the same layers."""
        targets = self.target_modules
        if targets is None or targets == "all-linear":
            targets = sorted(resolved_targets)
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": _jsonable(targets),
            "exclude_modules": _jsonable(self.exclude_modules),
            "layers_to_transform": _jsonable(self.layers_to_transform),
            "layers_pattern": self.layers_pattern,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "modules_to_save": _jsonable(self.modules_to_save),
            "init_lora_weights": _INIT_TO_HF[self.init],
            "fan_in_fan_out": False,
            "inference_mode": True,
        }

    @staticmethod
    def from_hf_dict(data: dict[str, Any]) -> LoraConfig:
        if data.get("peft_type") != "LORA":
            raise ConfigError(f"`peft_type` must be 'LORA' for a LoRA adapter, got {data.get('peft_type')!r}")
        for field, neutral in _HF_UNSUPPORTED.items():
            value = data.get(field, neutral)
            if field != "fan_in_fan_out" and value not in (neutral, None):
                raise ConfigError(
                    f"adapter_config.json sets `{field}`={value!r}, which peftkit does not implement; "
                    f"only {neutral!r} is supported"
                )
        init = {True: "default", "gaussian": "gaussian", False: "random"}.get(
            data.get("init_lora_weights", True)
        )
        return LoraConfig(
            r=data.get("r", 8),
            alpha=data.get("lora_alpha", 8),
            dropout=data.get("lora_dropout", 0.0),
            target_modules=data.get("target_modules"),
            exclude_modules=data.get("exclude_modules"),
            layers_to_transform=data.get("layers_to_transform"),
            layers_pattern=_one_pattern(data.get("layers_pattern")),
            bias=data.get("bias", "none"),
            use_rslora=data.get("use_rslora", False),
            modules_to_save=data.get("modules_to_save"),
            init=init or "default",
            task_type=data.get("task_type"),
        )


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


def _as_layer_indices(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, int) else value
    if (
        isinstance(value, bool)
        or not isinstance(values, list | tuple)
        or not values
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
    ):
        raise ConfigError(
            f"`layers_to_transform` must be a non-negative integer or a non-empty list of them, got {value!r}"
        )
    return tuple(values)


def _one_pattern(value: Any) -> str | None:
    if isinstance(value, list):
        if len(value) != 1:
            raise ConfigError(f"`layers_pattern` with several patterns is not supported, got {value!r}")
        return value[0]
    return value
