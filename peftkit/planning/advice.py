"""What each method costs at inference, and which method to choose under the user's constraints.

The rules follow the papers the guides teach from: LoRA and IA3 fold into the weights (Hu et al. 2021 §4.1;
Liu et al. 2022), adapters add layers that cannot fold (Houlsby et al. 2019), prompt and prefix methods
lengthen every sequence; prompt tuning only matches fine-tuning from ~10B parameters (Lester et al. 2021,
fig. 1) and prompt methods other than P-tuning v2 trail on sequence tagging (Liu et al. 2021, P-tuning v2,
tables 2-3); QLoRA trades a quantization error for a 4-bit base (Dettmers et al. 2023).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# method -> (how it runs at inference, whether merging removes the cost)
OVERHEAD_KINDS = {
    "lora": "merge",
    "qlora": "merge",
    "ia3": "merge",
    "full": "in_place",
    "bitfit": "in_place",
    "layer_tuning": "in_place",
    "bottleneck": "layers",
    "prompt_tuning": "input_tokens",
    "p_tuning": "input_tokens",
    "prefix_tuning": "prefix",
    "p_tuning_v2": "prefix",
}
PROMPT_ONLY = ("prompt_tuning", "p_tuning", "prefix_tuning")  # weak below ~10B and on tagging
SMALL_MODEL = 10_000_000_000  # parameters below which prompt-only methods trail fine-tuning (Lester et al.)
# preference when every constraint is met: quality per trained parameter, as the guides rank them
PREFERENCE = (
    "lora",
    "qlora",
    "p_tuning_v2",
    "ia3",
    "bottleneck",
    "full",
    "bitfit",
    "layer_tuning",
    "prefix_tuning",
    "p_tuning",
    "prompt_tuning",
)


def inference_overhead(
    method: str, virtual_tokens: int | None, max_length: int, adapter_share: float
) -> dict[str, Any]:
    """``{"kind", "text", "extra_compute_percent"}``: what serving the adapter costs over the base model.

    ``adapter_share``: the adapter's parameters that run per token over the base's (matmul FLOPs scale with
    them); ``virtual_tokens`` over ``max_length``: how much longer each sequence gets.
    """
    kind = OVERHEAD_KINDS.get(method, "unknown")
    n = virtual_tokens or 0
    percent = {
        "merge": 100.0 * adapter_share,
        "layers": 100.0 * adapter_share,
        "input_tokens": 100.0 * n / max_length,
        "prefix": 100.0 * n / max_length,
    }.get(kind, 0.0)
    text = {
        "merge": f"none when merged; unmerged +{percent:.2f}% FLOPs (the adapter's own products per layer)",
        "in_place": "none: the trained weights replace the base ones (a full copy per task for full)",
        "layers": f"extra layers: +{percent:.2f}% FLOPs and one more kernel per adapter, cannot be merged",
        "input_tokens": f"longer sequences: +{n} tokens per input (+{percent:.0f}% at {max_length} tokens)",
        "prefix": f"longer attention: +{n} keys/values in every layer (+{percent:.0f}% attention at {max_length})",
    }.get(kind, "unknown")
    return {"kind": kind, "text": text, "extra_compute_percent": round(percent, 3)}


@dataclass(frozen=True)
class Recommendation:
    method: str | None
    reasons: tuple[str, ...]
    ruled_out: dict[str, str]  # method -> why not

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "reasons": list(self.reasons), "ruled_out": dict(self.ruled_out)}


def recommend(rows: list, settings: Any, base_parameters: int, task: str) -> Recommendation:
    """The first method of :data:`PREFERENCE` that meets every constraint, with the reasons; each other
    method's reason to be ruled out or ranked lower."""
    ruled_out: dict[str, str] = {}
    for row in rows:
        reason = _hard_reason(row, settings)
        if reason:
            ruled_out[row.method] = reason
    soft = {row.method: _soft_reason(row, settings, base_parameters, task) for row in rows}
    candidates = [r for r in rows if r.method not in ruled_out]
    order = sorted(candidates, key=lambda r: (soft[r.method] is not None, _rank(r.method)))
    if not order:
        return Recommendation(None, ("no method meets the constraints; see why for each",), ruled_out)
    best = order[0]
    reasons = [_fit_text(best, settings)]
    if settings.zero_latency:
        reasons.append("zero added latency: it merges into the weights (or trains them in place)")
    if settings.tasks > 1:
        reasons.append(
            f"{settings.tasks} tasks on one base: one {best.adapter_file_bytes / 2**20:.1f} MiB adapter file each"
        )
    if best.method == "qlora":
        reasons.append("16-bit LoRA does not fit: the 4-bit base is what makes it fit")
    if soft[best.method]:
        reasons.append(f"caveat: {soft[best.method]}")
    for row in order[1:]:
        ruled_out.setdefault(row.method, soft[row.method] or f"ranked after {best.method}")
    return Recommendation(best.method, tuple(reasons), ruled_out)


def _rank(method: str) -> int:
    return PREFERENCE.index(method) if method in PREFERENCE else len(PREFERENCE)


def _hard_reason(row: Any, settings: Any) -> str | None:
    if row.error:
        return row.error
    if settings.memory is not None and not fits(row, settings.memory):
        best = min(m.total for m in (row.memory, row.memory_checkpointed) if m is not None)
        return f"needs {best / 2**30:.2f} GiB at best, more than the {settings.memory / 2**30:.2f} GiB given"
    if settings.zero_latency and OVERHEAD_KINDS.get(row.method) not in ("merge", "in_place"):
        return "adds latency at inference (cannot be merged into the weights)"
    if settings.tasks > 1 and row.method == "full":
        return f"a full copy of the model per task for {settings.tasks} tasks"
    return None


def _soft_reason(row: Any, settings: Any, base_parameters: int, task: str) -> str | None:
    if row.method in PROMPT_ONLY and task == "token-classification":
        return "prompt-only methods trail on sequence tagging (P-tuning v2, table 3); P-tuning v2 does not"
    if row.method in PROMPT_ONLY and base_parameters < SMALL_MODEL:
        return (
            f"prompt-only methods trail fine-tuning below ~10B parameters (Lester et al. 2021); "
            f"this model has {base_parameters / 1e9:.2f}B"
        )
    if row.method == "qlora" and settings.memory is None:
        return "the 4-bit base adds a quantization error; only worth it when 16-bit LoRA does not fit"
    return None


def fits(row: Any, memory: int) -> bool:
    """Whether the method trains within ``memory`` bytes, with gradient checkpointing if need be."""
    options = [m for m in (row.memory, row.memory_checkpointed) if m is not None]
    return any(m.total <= memory for m in options)


def _fit_text(row: Any, settings: Any) -> str:
    plain = row.memory.total
    if settings.memory is None:
        return f"peak training memory {plain / 2**30:.2f} GiB (no --memory given)"
    if plain <= settings.memory:
        return f"fits {settings.memory / 2**30:.2f} GiB: peak {plain / 2**30:.2f} GiB"
    checkpointed = row.memory_checkpointed.total
    return (
        f"fits {settings.memory / 2**30:.2f} GiB with gradient checkpointing: peak {checkpointed / 2**30:.2f} GiB "
        f"(without: {plain / 2**30:.2f} GiB)"
    )
