"""Turning the workers' results into ratios, target checks and the Markdown results file.

Every number is first reduced inside its process (median over steps or calls), then across the processes of
the same configuration (median over repeats). Ratios between peers are taken of those medians; the range
next to a ratio is the smallest and largest ratio of the same two peers run back to back in one repeat,
which shows how much the shared machine moved the comparison.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import subprocess
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import common, inference, mixed_batch, train_step

Result = dict[str, Any]
PROMPT_METHODS = {"prompt_tuning": "prompt tuning", "prefix_tuning": "prefix tuning"}
Metric = Callable[[Result], float]


def one_line(result: Result) -> str:
    what = f"{result['measurement']:<9} {result['model']:<5} {result['library']:<7}"
    if result["measurement"] in ("train", *PROMPT_METHODS):
        return f"{what} {ms(result['step']['median_s'])}/step, peak +{result['peak_train_mib']:.0f} MiB"
    if result["measurement"] == "inference":
        return f"{what} base {ms(result['base']['median_s'])}, unmerged {ms(result['unmerged']['median_s'])}, merged {ms(result['merged']['median_s'])}"
    return f"{what} single {ms(result['single']['median_s'])}, mixed {ms(result['mixed']['median_s'])}"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def check_same_layers(results: list[Result]) -> None:
    """Both libraries must wrap exactly the same layers, or the comparison means nothing."""
    for model in {r["model"] for r in results if r["measurement"] == "train"}:
        layers = {
            r["library"]: r["wrapped_layers"]
            for r in results
            if r["measurement"] == "train" and r["model"] == model and r["library"] in common.LIBRARIES
        }
        if len(layers) == 2 and layers["peftkit"] != layers["hf"]:
            differ = sorted(set(layers["peftkit"]) ^ set(layers["hf"]))
            raise SystemExit(f"{model}: peftkit and HF PEFT wrap different layers: {differ}")
    for method in PROMPT_METHODS:  # prompt methods: the same number of trained parameters
        counts = defaultdict(set)
        for r in results:
            if r["measurement"] == method:
                counts[r["model"]].add(r["trainable_params"])
        for model, found in counts.items():
            if len(found) > 1:
                raise SystemExit(
                    f"{model} {method}: the libraries train different numbers of parameters: {found}"
                )


# --- reduction -----------------------------------------------------------------------------------------
class Table:
    """Results of one measurement, by (model, library), in run order."""

    def __init__(self, results: list[Result], measurement: str) -> None:
        self.runs: dict[tuple[str, str], list[Result]] = defaultdict(list)
        for result in results:
            if result["measurement"] == measurement:
                self.runs[result["model"], result["library"]].append(result)
        self.models = list(dict.fromkeys(model for model, _ in self.runs))

    def has(self, model: str, library: str) -> bool:
        return (model, library) in self.runs

    def median(self, model: str, library: str, metric: Metric) -> float:
        return statistics.median(metric(r) for r in self.runs[model, library])

    def other_load(self, model: str) -> float:
        """The highest share of the machine other processes took while a peftkit or HF worker of ``model`` ran."""
        return max(r["other_load"] for lib in common.LIBRARIES for r in self.runs.get((model, lib), []))

    def ratio(self, model: str, a: str, b: str, metric: Metric) -> tuple[float, float, float]:
        """median(metric of a) / median(metric of b), and the range of the per-repeat ratios."""
        value = self.median(model, a, metric) / self.median(model, b, metric)
        paired = [
            metric(x) / metric(y) for x, y in zip(self.runs[model, a], self.runs[model, b], strict=False)
        ]
        return value, min(paired), max(paired)


def step_time(r: Result) -> float:
    return r["step"]["median_s"]


def peak_memory(r: Result) -> float:
    return r["peak_train_mib"]


def latency(variant: str) -> Metric:
    return lambda r: r[variant]["median_s"]


def overhead(variant: str) -> Metric:
    """Per process: latency of ``variant`` over the base model's, minus 1 (paired within the process)."""
    return lambda r: r[variant]["median_s"] / r["base"]["median_s"] - 1


def throughput(variant: str) -> Metric:
    return lambda r: r["rows"] * r["tokens"] / r[variant]["median_s"]


def fmt_ratio(value: tuple[float, float, float]) -> str:
    return f"**{value[0]:.3f}** ({value[1]:.2f}-{value[2]:.2f})"


def pct(value: float) -> str:
    return f"{value * 100:+.1f}%"


# --- sections ------------------------------------------------------------------------------------------
def training_section(results: list[Result], targets: list[list[str]]) -> list[str]:
    table = Table(results, "train")
    lines = [
        "## 1. Training step (forward + backward + AdamW) and peak memory",
        "",
        "| model | step peftkit | step HF | step full FT | **peftkit/HF** time | LoRA/full time (peftkit, HF) "
        "| peak peftkit | peak HF | peak full FT | **peftkit/HF** memory | LoRA/full memory (peftkit, HF) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in table.models:
        if not (table.has(model, "peftkit") and table.has(model, "hf")):
            continue
        time_ratio = table.ratio(model, "peftkit", "hf", step_time)
        mem_ratio = table.ratio(model, "peftkit", "hf", peak_memory)
        cells = [model] + [ms(table.median(model, lib, step_time)) for lib in ("peftkit", "hf", "full")]
        cells.append(fmt_ratio(time_ratio))
        cells.append(
            ", ".join(f"{table.ratio(model, lib, 'full', step_time)[0]:.2f}" for lib in ("peftkit", "hf"))
        )
        cells += [f"{table.median(model, lib, peak_memory):.0f} MiB" for lib in ("peftkit", "hf", "full")]
        cells.append(fmt_ratio(mem_ratio))
        cells.append(
            ", ".join(f"{table.ratio(model, lib, 'full', peak_memory)[0]:.2f}" for lib in ("peftkit", "hf"))
        )
        lines.append("| " + " | ".join(cells) + " |")
        targets.append(
            target(
                f"{model}: training step time peftkit/HF",
                time_ratio[0],
                "<= 0.95",
                0.95,
                load=table.other_load(model),
            )
        )
        targets.append(
            target(
                f"{model}: training peak memory peftkit/HF",
                mem_ratio[0],
                "<= 1.00",
                1.0,
                load=table.other_load(model),
            )
        )
    lines += [
        "",
        f"Step times are medians of {train_step.STEPS} steps after {train_step.WARMUP} warm-up steps. Peak memory is the growth of the "
        "process's resident set (VmHWM) from just before the model is built to the end of training: "
        "weights, adapter, gradients, AdamW state and activations at their peak, without the imports. "
        "In parentheses: the smallest and largest ratio of the two peers run back to back in one repeat.",
        "",
    ]
    return lines


def inference_section(results: list[Result], targets: list[list[str]]) -> list[str]:
    table = Table(results, "inference")
    lines = [
        "## 2. Inference latency (no_grad, eval, 8 x 128 tokens)",
        "",
        "| model | library | base | unmerged LoRA | merged LoRA | unmerged over base | merged over base |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in table.models:
        for lib in common.LIBRARIES:
            if table.has(model, lib):
                cells = [model, lib] + [
                    ms(table.median(model, lib, latency(v))) for v in ("base", "unmerged", "merged")
                ]
                cells += [pct(table.median(model, lib, overhead(v))) for v in ("unmerged", "merged")]
                lines.append("| " + " | ".join(cells) + " |")
        if table.has(model, "peftkit") and table.has(model, "hf"):
            ours = table.median(model, "peftkit", overhead("unmerged"))
            theirs = table.median(model, "hf", overhead("unmerged"))
            targets.append(
                target(
                    f"{model}: unmerged overhead peftkit/HF ({pct(ours)} vs {pct(theirs)})",
                    ours / theirs,
                    "<= 0.50",
                    0.5,
                    load=table.other_load(model),
                )
            )
            merged = table.median(model, "peftkit", overhead("merged"))
            targets.append(
                target(
                    f"{model}: merged peftkit over base",
                    merged,
                    "<= +2%",
                    0.02,
                    as_pct=True,
                    load=table.other_load(model),
                )
            )
    lines += [
        "",
        "All three variants are timed in one process, in alternating blocks "
        f"({inference.ROUNDS} rounds x {inference.CALLS} calls after {inference.WARMUP} warm-up calls each); overheads are per-process ratios to that process's base model, median over "
        "processes.",
        "",
    ]
    return lines


def mixed_section(results: list[Result], targets: list[list[str]]) -> list[str]:
    table = Table(results, "mixed")
    lines = [
        "## 3. Mixed batch: 16 rows, 16 different adapters vs one adapter (no_grad, eval, 16 x 128 tokens)",
        "",
        "| model | library | single adapter | 16 adapters | single tokens/s | mixed tokens/s | mixed/single throughput |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in table.models:
        for lib in common.LIBRARIES:
            if table.has(model, lib):
                per_process = table.median(
                    model, lib, lambda r: r["single"]["median_s"] / r["mixed"]["median_s"]
                )
                cells = [model, lib, ms(table.median(model, lib, latency("single")))]
                cells += [ms(table.median(model, lib, latency("mixed")))]
                cells += [f"{table.median(model, lib, throughput(v)):,.0f}" for v in ("single", "mixed")]
                cells.append(f"{per_process:.3f}")
                lines.append("| " + " | ".join(cells) + " |")
        if table.has(model, "peftkit") and table.has(model, "hf"):
            mixed_ratio = table.ratio(model, "peftkit", "hf", throughput("mixed"))
            single_ratio = table.ratio(model, "peftkit", "hf", throughput("single"))
            lines.append(
                f"| {model} | **peftkit/HF** | | | {fmt_ratio(single_ratio)} | {fmt_ratio(mixed_ratio)} | |"
            )
            targets.append(
                target(
                    f"{model}: mixed-batch throughput peftkit/HF",
                    mixed_ratio[0],
                    ">= 2.00",
                    2.0,
                    above=True,
                    load=table.other_load(model),
                )
            )
            slowdown = table.median(
                model, "peftkit", lambda r: r["mixed"]["median_s"] / r["single"]["median_s"] - 1
            )
            targets.append(
                target(
                    f"{model}: peftkit mixed batch slower than single by",
                    slowdown,
                    "<= +15%",
                    0.15,
                    as_pct=True,
                    load=table.other_load(model),
                )
            )
    lines += [
        "",
        "Single and mixed are timed in one process in alternating blocks "
        f"({mixed_batch.ROUNDS} rounds x {mixed_batch.CALLS} calls after {mixed_batch.WARMUP} warm-up call each); mixed/single is per process (1.0 = no cost for mixing), median over processes.",
        "",
    ]
    return lines


def prompt_section(results: list[Result], targets: list[list[str]]) -> list[str]:
    lines = [
        f"## Prompt tuning and prefix tuning: training step ({common.VIRTUAL_TOKENS} virtual tokens)",
        "",
        "| method | model | trained params | step peftkit | step HF | **peftkit/HF** time "
        "| peak peftkit | peak HF | **peftkit/HF** memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, label in PROMPT_METHODS.items():
        table = Table(results, method)
        for model in table.models:
            if not (table.has(model, "peftkit") and table.has(model, "hf")):
                continue
            time_ratio = table.ratio(model, "peftkit", "hf", step_time)
            params = table.runs[model, "peftkit"][0]["trainable_params"]
            cells = [label, model, f"{params:,}"]
            cells += [ms(table.median(model, lib, step_time)) for lib in common.LIBRARIES]
            cells.append(fmt_ratio(time_ratio))
            cells += [f"{table.median(model, lib, peak_memory):.0f} MiB" for lib in common.LIBRARIES]
            cells.append(fmt_ratio(table.ratio(model, "peftkit", "hf", peak_memory)))
            lines.append("| " + " | ".join(cells) + " |")
            name = f"{model}: {label} step time peftkit/HF"
            targets.append(target(name, time_ratio[0], "<= 1.00", 1.0, load=table.other_load(model)))
    lines += [
        "",
        f"Step times are medians of {train_step.STEPS} steps after {train_step.WARMUP} warm-up steps "
        "(forward + backward + AdamW on the trained parameters); peak memory as in the LoRA benchmark "
        f"(VmHWM growth from just before the model is built). Both libraries: random init, {common.VIRTUAL_TOKENS} "
        "virtual tokens, the prefix trained directly (HF `prefix_projection=False`), `task_type=CAUSAL_LM`; "
        f"the models have {common.VIRTUAL_TOKENS} more position embeddings than in the LoRA benchmark. "
        "In parentheses: the smallest and largest ratio of the two peers run back to back in one repeat.",
        "",
    ]
    return lines


DISTURBED = 0.10  # other load above which a target is called inconclusive rather than met or missed


def target(
    name: str,
    value: float,
    goal: str,
    bound: float,
    above: bool = False,
    as_pct: bool = False,
    load: float = 0.0,
) -> list[str]:
    met = value >= bound if above else value <= bound
    verdict = "met" if met else "**missed**"
    if load > DISTURBED:
        verdict = (
            f"inconclusive ({'met' if met else 'missed'} with other processes on {load:.0%} of the machine)"
        )
    shown = pct(value) if as_pct else f"{value:.3f}"
    if above:
        margin = f"{value / bound:.2f}x of the bound"
    else:
        margin = (
            f"{(bound - value) * 100:+.1f} points" if as_pct else f"{(bound - value) / bound:+.0%} headroom"
        )
    return [name, goal, shown, verdict, margin]


# --- the file ------------------------------------------------------------------------------------------
def context(**fields: Any) -> dict[str, Any]:
    versions = {pkg: importlib.metadata.version(pkg) for pkg in ("torch", "transformers", "peft", "peftkit")}
    return {
        **fields,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
        "commit": _git_commit(),
        "models": {name: spec.description for name, spec in common.MODELS.items()},
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "peftkit"], cwd=root, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return head.stdout.strip() + (" (peftkit/ has uncommitted changes)" if dirty.stdout.strip() else "")


def markdown(results: list[Result], ctx: dict[str, Any]) -> str:
    targets: list[list[str]] = []
    measured = {r["measurement"] for r in results}
    sections = {"train": training_section, "inference": inference_section, "mixed": mixed_section}
    body = [
        line for key, section in sections.items() if key in measured for line in section(results, targets)
    ]
    lora = bool(measured & set(sections))
    if measured & set(PROMPT_METHODS):
        body += prompt_section(results, targets)
    versions = ", ".join(f"{k} {v}" for k, v in ctx["versions"].items())
    others = sorted(r["other_load"] for r in results)
    retried = sum(r["attempts"] > 1 for r in results)
    allocator = (
        "jemalloc 5 via LD_PRELOAD, MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 (no decay), for every worker"
        if ctx["allocator"] == "jemalloc"
        else "glibc malloc (the default), for every worker"
    )
    head = [
        f"# {'LoRA' if lora else 'Prompt tuning and prefix tuning'}: peftkit vs Hugging Face PEFT",
        "",
        f"- command: `{ctx['command']}` (from the repository root, with `.venv/bin/python`)",
        f"- date: {ctx['date']}; total run {ctx['elapsed_s'] / 60:.1f} min, {ctx['repeats']} processes per configuration",
        f"- machine: {ctx['cpu']}, {ctx['cores']} cores, shared with other sessions: "
        f"other processes used a median {statistics.median(others):.0%} (max {others[-1]:.0%}) of the machine "
        f"while a worker ran; {retried} of {len(results)} workers were rerun because of it",
        f"- allocator: {allocator}",
        f"- software: Python {ctx['python']}, {versions}; peftkit at commit {ctx['commit']}",
        f"- settings: {common.THREADS} threads, batch {common.BATCH} x {common.TOKENS} tokens (mixed batch: 16 x "
        f"{common.TOKENS}), "
        + (
            f"LoRA r={common.RANK} alpha={common.ALPHA} dropout 0 on `all-linear` in both libraries "
            "(the same layers, checked)"
            if lora
            else f"{common.VIRTUAL_TOKENS} virtual tokens in both libraries (the same trained parameter count, checked)"
        )
        + "; random weights, same seeds, same inputs",
        "- models (random weights, built from transformers config classes):",
        *[f"  - {name}: {desc}" for name, desc in ctx["models"].items()],
        "",
        *(
            [
                f"**Caution: other sessions loaded the machine during this run (median {statistics.median(others):.0%} "
                "of it while a worker ran). Two-thread workers then wait for the CPU, so absolute times are "
                "inflated and ratios are noisy; rerun on a quiet machine before relying on a ratio within ~10%.**",
                "",
            ]
            if statistics.median(others) > 0.1
            else []
        ),
        "Ratios are in **bold**: below 1 means peftkit takes less time or memory than HF PEFT.",
        "",
    ]
    goals = [
        "## Targets",
        "",
        "| target | goal | measured | result | margin |",
        "|---|---|---|---|---|",
        *["| " + " | ".join(row) + " |" for row in targets],
        "",
    ]
    return "\n".join(head + goals + body)


def main() -> None:
    """``python -m benchmarks.report RESULTS.json``: rewrite ``RESULTS.md`` from the raw results."""
    import json
    import sys

    raw_path = Path(sys.argv[1])
    raw = json.loads(raw_path.read_text())
    raw_path.with_suffix(".md").write_text(markdown(raw["results"], raw["context"]))
    print(f"wrote {raw_path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
