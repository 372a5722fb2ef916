"""Choose a method before training: every method's parameters, adapter file, training memory and inference
cost on a model built on the meta device (no weights), and a recommendation under the user's constraints.

    from peftkit.planning import plan
    table = plan(model="smollm2", batch_size=4, max_length=512, memory=parse_bytes("8GiB"))
    print(table.render()); table.to_json(); table.chart("plan.png")
"""

from __future__ import annotations

import dataclasses
import re

from peftkit.config import ConfigError
from peftkit.planning.estimate import Memory, MethodPlan, Settings
from peftkit.planning.report import Plan

__all__ = ["Memory", "MethodPlan", "Plan", "Settings", "parse_bytes", "plan", "predicted_peaks"]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
DEVICES = ("cpu", "cuda")


def parse_bytes(text: str) -> int:
    """``"24GiB"``, ``"24 GB"``, ``"512MiB"``, ``"1e9"`` -> bytes (GB = 10^9, GiB = 2^30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"memory must be a number with an optional unit (GiB, GB, MiB, MB, ...), got {text!r}"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def plan(settings: Settings | None = None, **fields) -> Plan:
    """Predict every method (default: all that ``peftkit train`` knows) for ``settings`` (or its fields as
    keyword arguments). Raises ConfigError for an unknown model, task, method, device or dtype."""
    import peftkit.training.config  # noqa: F401  (declares every method peftkit train knows)
    from peftkit.method_spec import METHOD_SPECS
    from peftkit.planning import meta_model
    from peftkit.planning.advice import recommend
    from peftkit.planning.estimate import plan_method

    settings = settings or Settings(**fields)
    # HF PEFT's spellings too (LORA, PREFIX_TUNING, p-tuning)
    methods = tuple(m.lower().replace("-", "_") for m in settings.methods) or tuple(METHOD_SPECS)
    _validate(settings, methods, METHOD_SPECS)
    config = meta_model.load_config(settings.model)
    task = settings.task or meta_model.infer_task(config)
    settings = dataclasses.replace(settings, task=task, methods=tuple(methods))
    rows = tuple(plan_method(config, task, method, settings) for method in methods)
    base = max((r.base_parameters for r in rows if r.applicable), default=0)
    return Plan(
        settings=settings,
        task=task,
        model_type=getattr(config, "model_type", "?"),
        layers=meta_model.num_layers(config),
        base_parameters=base,
        rows=rows,
        recommendation=recommend(list(rows), settings, base, task),
    )


def _validate(settings: Settings, methods, known) -> None:
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; known: {sorted(known)}")
    for name in ("batch_size", "max_length", "num_labels", "tasks"):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"`{name}` must be a positive integer, got {value!r}")
    if settings.device not in DEVICES:
        raise ConfigError(f"`device` must be one of {list(DEVICES)}, got {settings.device!r}")
    if settings.memory is not None and settings.memory <= 0:
        raise ConfigError(f"`memory` must be a positive number of bytes, got {settings.memory!r}")


def predicted_peaks(config, methods) -> dict[str, int | None]:
    """Predicted peak training memory in bytes of each of ``methods`` for a ``peftkit train`` config (its
    model, task, batch size, max length, gradient checkpointing, loss; CPU, fp32 weights as train keeps them), or
    None where the plan cannot say (an unknown method, a model whose step cannot be simulated). Never raises:
    ``peftkit compare`` shows it next to the measured peak and goes on without it."""
    import peftkit.training.config  # noqa: F401  (declares every method peftkit train knows)
    from peftkit.data.builtin import BUILTIN_DATASETS
    from peftkit.method_spec import METHOD_SPECS

    builtin = BUILTIN_DATASETS.get(config.dataset)
    task = config.task or (builtin.tasks[0] if builtin is not None else None)
    known = tuple(m for m in methods if m in METHOD_SPECS)
    peaks: dict[str, int | None] = dict.fromkeys(methods)
    try:
        table = plan(
            model=config.model,
            task=task,
            batch_size=config.batch_size,
            max_length=config.max_length or Settings.max_length,  # (None: chosen from the data later)
            methods=known,
            fused_loss=config.fused_loss,
        )
    except (ValueError, RuntimeError, OSError, ImportError):  # an extra: the measurements stand alone
        return peaks
    for row in table.rows:
        memory = row.memory_checkpointed if config.gradient_checkpointing else row.memory
        peaks[row.method] = memory.total if memory is not None else None
    return peaks
