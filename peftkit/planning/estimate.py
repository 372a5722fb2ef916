"""One method on the meta model: its real parameter counts, its adapter file's size and its training memory.

The method is applied exactly as ``peftkit train`` applies it (``prepare_base`` + ``get_peft_model`` with the
adapter config ``peftkit train`` builds from its defaults), so the counts are peftkit's own; the memory of
a training step is then simulated (:mod:`peftkit.planning.trace`) with and without gradient checkpointing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from peftkit.checkpoint import CONFIG_HASH_KEY
from peftkit.config import ConfigError
from peftkit.planning import meta_model
from peftkit.planning.advice import inference_overhead
from peftkit.planning.four_bit import quantized_weight_ids, stand_in_matmuls
from peftkit.planning.sizes import parameter_bytes, safetensors_file_bytes, tensor_bytes
from peftkit.planning.trace import StepTrace, TraceError, trace_step
from peftkit.training.config import TrainConfig
from peftkit.training.efficiency import fused_loss_off_reason

# What the process holds besides tensors: on CPU the RSS after importing torch, transformers and what peftkit
# train imports (402 MiB measured by benchmarks/plan_accuracy.py once the evaluation metrics' scikit-learn /
# pandas were imported only where used; 534 MiB before) plus what building a model adds beyond its tensors (its
# code and module objects: 10-25 MiB measured); on a GPU a CUDA context plus cuBLAS workspace, which torch's
# allocator does not count (typical for recent drivers; not measured here).
RUNTIME_BYTES = {"cpu": 420 * 2**20, "cuda": 512 * 2**20}
# glibc's malloc (CPU) raises its mmap threshold as large blocks are freed (up to 32 MiB), so blocks of that
# size freed during the step stay in its heap and the peak RSS runs above the bytes alive. The term is this
# share of the step's peak held in such blocks (trace.HEAP_BLOCK), fitted to the peak RSS of every method's
# run on MiniLM and SmolLM2 (benchmarks/results/plan_accuracy.md, where with MALLOC_MMAP_THRESHOLD_=131072 the
# RSS follows the bytes alive). torch's CUDA caching allocator keeps freed blocks for reuse instead: no term.
ALLOCATOR_SLACK = {"cpu": 0.75}
# The checkpoint's metadata: the format tag and the config's SHA-256 in hex (64 characters).
FILE_METADATA = {"format": "pt", CONFIG_HASH_KEY: "0" * 64}
# Layers of the reduced models a deep model's step is traced at: two depths 2 apart (a period of alternating
# layers), each deep enough that the backward has middle layers (trace.StepTrace.phase_peaks).
TRACE_DEPTHS = (6, 8)


@dataclass(frozen=True)
class Settings:
    """What a plan is for: the model, the task, one training batch, and where it trains."""

    model: str = TrainConfig.model
    task: str | None = None  # None: inferred from the model's architecture
    batch_size: int = TrainConfig.batch_size
    max_length: int = 64  # tokens per row (peftkit train picks its own from the data)
    memory: int | None = None  # bytes available for training; None: no limit given
    device: str = "cpu"
    dtype: str = "fp32"
    methods: tuple[str, ...] = ()  # empty: every method peftkit train knows
    num_labels: int = 2
    tasks: int = 1  # tasks to serve from one base model
    zero_latency: bool = False  # inference must cost what the base model costs
    fused_loss: bool = TrainConfig.fused_loss  # as peftkit train: the fused linear cross-entropy where exact


@dataclass(frozen=True)
class Memory:
    """Bytes at the peak of a training step, by component; they add up to ``total``.

    ``base``: frozen weights as stored (4-bit ones for QLoRA), and the original values of parameters a
    method trains in place (full fine-tuning keeps a copy of the whole model); ``trainable``: the trained parameters;
    ``optimizer``: AdamW's two moments (in the parameters' dtype) and step counters; ``activations``: what the
    forward keeps for the backward; ``logits``: what the output head and the loss keep on top; ``backward``:
    what the backward and the optimizer step add at their peak (gradients, the logits' gradient, a
    checkpointed layer's recomputation, AdamW's temporaries); ``allocator``: memory the allocator holds but
    no tensor uses (:data:`ALLOCATOR_SLACK`); ``runtime``: the process itself.
    """

    base: int
    trainable: int
    optimizer: int
    activations: int
    logits: int
    backward: int
    allocator: int
    runtime: int
    gradients: int = 0  # informative: the .grad tensors alone (part of ``backward``)

    COMPONENTS = (
        "base",
        "trainable",
        "optimizer",
        "activations",
        "logits",
        "backward",
        "allocator",
        "runtime",
    )

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in self.COMPONENTS)

    def to_dict(self) -> dict[str, int]:
        return {
            **{n: getattr(self, n) for n in self.COMPONENTS},
            "gradients": self.gradients,
            "total": self.total,
        }


@dataclass(frozen=True)
class MethodPlan:
    method: str
    error: str | None = None  # why the method does not apply to this model (then nothing else is set)
    trainable: int = 0
    base_parameters: int = 0
    adapter_parameters: int = 0
    adapter_file_bytes: int = 0
    memory: Memory | None = None
    memory_checkpointed: Memory | None = None
    overhead: dict[str, Any] = field(default_factory=dict)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.base_parameters if self.base_parameters else 0.0

    @property
    def applicable(self) -> bool:
        return self.error is None


def plan_method(config: Any, task: str, method: str, settings: Settings, simulate: bool = True) -> MethodPlan:
    """Apply ``method`` with ``peftkit train``'s default settings to a meta model of ``config`` and predict;
    ``simulate=False`` leaves the training step out (counts and file size only, ``memory`` None)."""
    from peftkit.model import get_peft_model
    from peftkit.training.methods import adapter_config_for, prepare_base

    model = meta_model.build_meta_model(config, task, settings.dtype, settings.num_labels)
    train_config = _train_config(method, settings)
    try:
        prepare_base(train_config, model)
        peft = get_peft_model(model, adapter_config_for(train_config, meta_model.head_modules(model, task)))
    except ConfigError as error:
        return MethodPlan(method, error=str(error))
    count = peft.trainable_parameters()
    file_bytes = safetensors_file_bytes(_file_tensors(peft), FILE_METADATA)
    if not simulate:
        return MethodPlan(method, None, count.trainable, count.base, count.adapter, file_bytes)
    try:
        plain = _layer_extrapolated(config, task, method, settings, checkpointing=False)
    except TraceError as error:
        return MethodPlan(method, error=f"cannot simulate a training step: {error}")
    try:
        traced = _layer_extrapolated(config, task, method, settings, checkpointing=True)
        checkpointed = _memory(peft, traced, settings)
    except (ValueError, TraceError):  # prefix tuning, ALBERT refuse checkpointing: the row says n/a
        checkpointed = None
    plain = _memory(peft, plain, settings)
    overhead = inference_overhead(
        method,
        getattr(peft.peft_config["default"], "num_virtual_tokens", None),
        settings.max_length,
        count.adapter / count.base if count.base else 0.0,
    )
    return MethodPlan(
        method=method,
        trainable=count.trainable,
        base_parameters=count.base,
        adapter_parameters=count.adapter,
        adapter_file_bytes=file_bytes,
        memory=plain,
        memory_checkpointed=checkpointed,
        overhead=overhead,
    )


def _file_tensors(peft: nn.Module) -> dict:
    """The adapter's tensors under the keys ``save_pretrained`` writes them with (HF PEFT's prompt-learning
    layout for prompt methods), from the same file config it writes."""
    from peftkit.checkpoint import file_keys
    from peftkit.methods import method_for_config

    config = peft.peft_config["default"]
    file_config = method_for_config(config).to_file(config, peft._targets["default"], peft.base_model)
    return file_keys(file_config, peft.adapter_state_dict("default"))


def _layer_extrapolated(
    config: Any, task: str, method: str, settings: Settings, checkpointing: bool
) -> StepTrace:
    """The step's trace for the full depth ``L``; deep models are traced at ``TRACE_DEPTHS`` (6 and 8 layers)
    and extrapolated linearly, ``v(L) = v(6) + (v(8) - v(6)) (L - 6) / 2``: exact for a stack of identical
    layers, and for layers alternating with period 2 (sliding / global attention), since every quantity of a
    step is a sum over layers plus what lies outside them; layer tuning's top layers stay the top layers.
    The peak is extrapolated phase by phase (``StepTrace.phase_peaks``): the step's overall maximum is not a
    line in ``L`` where it moves from the backward's end (every gradient) at a few layers to its start
    (every layer's activations) at many."""
    depth = meta_model.num_layers(config)
    if depth is None or depth <= 2 * TRACE_DEPTHS[1] - TRACE_DEPTHS[0]:
        return _trace_method(config, task, method, settings, checkpointing)
    low, high = (
        _trace_method(meta_model.with_depth(config, d), task, method, settings, checkpointing)
        for d in TRACE_DEPTHS
    )
    factor = (depth - TRACE_DEPTHS[0]) / (TRACE_DEPTHS[1] - TRACE_DEPTHS[0])

    def line(a: int, b: int) -> int:
        return round(a + (b - a) * factor)

    return StepTrace(
        activations=line(low.activations, high.activations),
        logits=line(low.logits, high.logits),
        gradients=line(low.gradients, high.gradients),
        phase_peaks=tuple(
            (line(a_peak, b_peak), line(a_small, b_small))
            for (a_peak, a_small), (b_peak, b_small) in zip(low.phase_peaks, high.phase_peaks, strict=True)
        ),
    )


def _trace_method(config: Any, task: str, method: str, settings: Settings, checkpointing: bool) -> StepTrace:
    from peftkit.model import get_peft_model
    from peftkit.training.methods import adapter_config_for, prepare_base

    model = meta_model.build_meta_model(config, task, settings.dtype, settings.num_labels)
    train_config = _train_config(method, settings)
    prepare_base(train_config, model)
    peft = get_peft_model(model, adapter_config_for(train_config, meta_model.head_modules(model, task)))
    head = meta_model.output_head(model, task)
    inputs = meta_model.meta_inputs(model, task, settings.batch_size, settings.max_length)
    fused = fused_loss_off_reason(settings.fused_loss, task, peft) is None
    layers = [layer for stack in meta_model.layer_stacks(model, config) for layer in stack]
    return _trace(peft, head, inputs, checkpointing, fused, layers)


def _train_config(method: str, settings: Settings) -> TrainConfig:
    """``peftkit train``'s defaults for ``method``; QLoRA computes in the plan's dtype (train's default,
    float32, would turn a bf16 model's activations back to fp32)."""
    from peftkit.method_spec import method_spec

    dtype = str(meta_model.DTYPES[settings.dtype]).split(".")[-1]
    takes_dtype = "compute_dtype" in method_spec(method).option_names  # a method option: QLoRA's only
    return TrainConfig(method=method, options={"compute_dtype": dtype} if takes_dtype else {})


def _trace(
    peft: nn.Module,
    head: nn.Module | None,
    inputs: dict,
    checkpointing: bool,
    fused_loss: bool,
    layers: list[nn.Module],
) -> StepTrace:
    base = peft.base_model
    config = getattr(base, "config", None)
    use_cache = getattr(config, "use_cache", None)
    with warnings.catch_warnings():  # transformers 5 renamed it; peftkit train calls it by this name
        warnings.simplefilter("ignore", FutureWarning)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if use_cache:  # training keeps no cache; transformers would say so on stderr at every plan
                config.use_cache = False
        try:
            with stand_in_matmuls(base):
                return trace_step(peft, head, inputs, fused_loss, layers)
        finally:
            if checkpointing:
                base.gradient_checkpointing_disable()
                if use_cache:
                    config.use_cache = use_cache


def _memory(peft: nn.Module, trace: StepTrace, settings: Settings) -> Memory:
    quantized = quantized_weight_ids(peft)
    frozen = [p for p in _unique_tensors(peft) if not p.requires_grad]
    base = sum(quantized.get(id(t), tensor_bytes(t)) for t in frozen)
    # methods that train base parameters in place (full, BitFit, layer tuning) keep their original values
    # beside them, so that the base model stays available (peftkit.parameter_bank)
    base += peft._bank.nbytes()
    trained = [p for p in _unique_tensors(peft) if p.requires_grad]
    trainable = parameter_bytes(peft, trainable=True)
    optimizer = 2 * trainable + 4 * len(trained)  # exp_avg, exp_avg_sq; one fp32 step counter per tensor
    # AdamW's update: on CPU one tensor at a time (a temporary the size of the largest parameter); on CUDA
    # the foreach kernels hold a temporary for every parameter at once (sqrt of exp_avg_sq)
    largest = max((tensor_bytes(p) for p in trained), default=0)
    step_temporaries = trainable if settings.device == "cuda" else largest
    dynamic = max(trace.peak, trace.gradients + step_temporaries)
    # the fused loss frees the hidden states it does not keep: then the forward keeps what is alive after it
    activations, logits = min(trace.activations, trace.activations + trace.logits), max(trace.logits, 0)
    return Memory(
        base=base,
        trainable=trainable,
        optimizer=optimizer,
        activations=activations,
        logits=logits,
        backward=dynamic - activations - logits,
        allocator=round(ALLOCATOR_SLACK.get(settings.device, 0.0) * trace.small_at_peak),
        runtime=RUNTIME_BYTES.get(settings.device, 0),
        gradients=trace.gradients,
    )


def _unique_tensors(module: nn.Module) -> list:
    seen: dict[int, Any] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        seen.setdefault(id(tensor), tensor)
    return list(seen.values())
