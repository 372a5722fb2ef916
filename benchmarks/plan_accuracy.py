"""`peftkit plan`'s predicted peak training memory against measurement, and the guides' LLaMA table.

For MiniLM and SmolLM2 (their configs; random weights of the same shapes: memory does not depend on the
values) and every method, one worker process per (model, method, gradient checkpointing) trains a few steps
exactly as ``peftkit train`` sets them up (``prepare_base``, ``get_peft_model`` with train's default adapter
config, train's loss (the fused linear cross-entropy where exact), peftkit's AdamW groups, gradient clipping) on full rows of B x T tokens, and reports its resident
memory before the model is built and its peak (``ru_maxrss``). The plan is computed in the driver on the meta
device. Then LLaMA-7B and LLaMA-65B configs are planned (meta device only) next to the guides' tables.

    nice -n 10 .venv/bin/python -m benchmarks.plan_accuracy --output benchmarks/results/plan_accuracy.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT = "RESULT "
MODELS = {  # name -> (batch, tokens)
    "minilm": (8, 128),
    "smollm2": (2, 256),
}
STEPS = 2  # the second step's peak holds AdamW's state, created by the first
# glibc's malloc: "default" raises its mmap threshold as large blocks are freed (up to 32 MiB), so freed
# activations stay in the heap and the RSS high-water mark runs above the bytes alive; "fixed" pins the
# threshold at 128 KiB, so every tensor of that size gets its own mapping, returned when freed, and the
# RSS follows the bytes alive (plus the runtime)
MALLOC = {"default": {}, "fixed": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
CHECKPOINTED_METHODS = ("lora", "full", "prompt_tuning", "qlora")  # default: --checkpointed-methods
LLAMA = {
    "LLaMA-7B": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
    },
    "LLaMA-65B": {
        "hidden_size": 8192,
        "intermediate_size": 22016,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
    },
}
# the guides' tables (shared/seeds, "Why PEFT?" and "QLoRA Memory Savings"): GB per method
GUIDE = {
    "LLaMA-7B": {"full": "~56 GB", "lora": "~8 GB (table 1) / ~16 GB (table 2)", "qlora": "~6 GB"},
    "LLaMA-65B": {"full": "~520 GB", "lora": "~40 GB (table 1) / ~130 GB (table 2)", "qlora": "~40 GB"},
}


def _machine() -> str:
    import torch
    import transformers

    return (
        f"{platform.machine()}, {os.cpu_count()} cores (shared), {platform.platform()}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )


def rss_now() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args: argparse.Namespace) -> None:
    import torch
    import transformers

    from peftkit import get_peft_model
    from peftkit.planning.meta_model import AUTO_CLASSES
    from peftkit.tasks import TASKS
    from peftkit.training.config import TrainConfig
    from peftkit.training.efficiency import loss_function
    from peftkit.training.methods import adapter_config_for, prepare_base
    from peftkit.training.optim import build_optimizer

    torch.set_num_threads(2)
    torch.manual_seed(0)
    baseline = rss_now()
    config = transformers.AutoConfig.from_pretrained(args.config_dir)
    if args.task == "sequence-classification":
        config.num_labels = 2
        config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    model = getattr(transformers, AUTO_CLASSES[args.task]).from_config(config, dtype=torch.float32)
    train = TrainConfig(method=args.method, gradient_checkpointing=args.checkpointing)
    prepare_base(train, model)
    peft = get_peft_model(model, adapter_config_for(train, TASKS[args.task].head_modules(model)))
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft.train()
    optimizer = build_optimizer(peft, learning_rate=1e-4, weight_decay=0.01)
    training_loss = loss_function(train, args.task, peft, peft, None, say=lambda _: None)  # train's own
    ready = rss_now()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.tokens))
    labels = torch.randint(0, 2, (args.batch,)) if args.task == "sequence-classification" else ids
    seconds = []
    for _ in range(STEPS):
        start = time.perf_counter()
        loss = training_loss({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in peft.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(RESULT + json.dumps({"baseline": baseline, "ready": ready, "peak": peak, "seconds": seconds}))


def measure(
    config_dir: Path, task: str, method: str, batch: int, tokens: int, checkpointing: bool, malloc: str
) -> dict:
    command = [
        "nice", "-n", "10", sys.executable, "-m", "benchmarks.plan_accuracy", "--worker",
        "--config-dir", str(config_dir), "--task", task, "--method", method,
        "--batch", str(batch), "--tokens", str(tokens),
    ] + (["--checkpointing"] if checkpointing else [])  # fmt: skip
    env = {**os.environ, **MALLOC[malloc]}
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1][len(RESULT) :])


def measured_rows(
    models: list[str], methods: list[str] | None, checkpointing: list[tuple], journal: str | None = None
) -> list[dict]:
    from peftkit.planning import plan
    from peftkit.planning.meta_model import load_config

    rows = []
    for name in models:
        batch, tokens = MODELS[name]
        with tempfile.TemporaryDirectory() as folder:
            load_config(name).save_pretrained(folder)  # config.json only: the workers build from it
            table = plan(model=folder, batch_size=batch, max_length=tokens, methods=tuple(methods or ()))
            for row in table.rows:
                for ckpt, malloc in checkpointing:
                    predicted = row.memory_checkpointed if ckpt else row.memory
                    if row.error or predicted is None or (ckpt and row.method not in CHECKPOINTED_METHODS):
                        continue
                    got = measure(Path(folder), table.task, row.method, batch, tokens, ckpt, malloc)
                    rows.append({"model": name, "method": row.method, "checkpointing": ckpt, "malloc": malloc,
                                 "batch": batch, "tokens": tokens, "predicted": predicted.to_dict(),
                                 "measured": got})  # fmt: skip
                    print(_line(rows[-1]), flush=True)
                    if journal is not None:  # kept as each run ends: a long run interrupted loses nothing
                        with open(journal, "a") as handle:
                            handle.write(json.dumps(rows[-1]) + "\n")
    return rows


def replan(results: dict) -> dict:
    from peftkit.planning import plan
    from peftkit.planning.meta_model import load_config

    for name in dict.fromkeys(row["model"] for row in results["measured"]):
        batch, tokens = next((r["batch"], r["tokens"]) for r in results["measured"] if r["model"] == name)
        with tempfile.TemporaryDirectory() as folder:
            load_config(name).save_pretrained(folder)
            table = plan(model=folder, batch_size=batch, max_length=tokens)
        for row in results["measured"]:
            if row["model"] == name:
                memory = table.row(row["method"])
                memory = memory.memory_checkpointed if row["checkpointing"] else memory.memory
                row["predicted"] = memory.to_dict()
    results["llama"] = llama_rows()
    return results


def _predicted(row: dict) -> int:
    """The plan's peak for the run's malloc: with a fixed mmap threshold nothing is held beyond the bytes
    alive, so the allocator's term does not apply."""
    p = row["predicted"]
    return p["total"] - (p.get("allocator", 0) if row.get("malloc") == "fixed" else 0)


def _line(row: dict) -> str:
    m, p = row["measured"], row["predicted"]
    if "error" in m:
        return f"{row['model']:8s} {row['method']:14s} ckpt={row['checkpointing']!s:5s} ERROR {m['error']}"
    above_p, above_m = p["total"] - p["runtime"], m["peak"] - m["baseline"]
    return (
        f"{row['model']:8s} {row['method']:14s} ckpt={row['checkpointing']!s:5s} {row['malloc']:7s} "
        f"total {p['total'] / 2**20:7.0f} vs {m['peak'] / 2**20:7.0f} MiB ({_err(p['total'], m['peak'])}); "
        f"above runtime {above_p / 2**20:6.0f} vs {above_m / 2**20:6.0f} MiB ({_err(above_p, above_m)}); "
        f"runtime measured {m['baseline'] / 2**20:.0f} MiB"
    )


def _err(predicted: float, measured: float) -> str:
    return f"{100 * (predicted - measured) / measured:+.1f}%"


def llama_rows() -> list[dict]:
    from peftkit.planning import plan

    rows = []
    for name, shape in LLAMA.items():
        with tempfile.TemporaryDirectory() as folder:
            config = {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "vocab_size": 32000,
                **shape,
            }
            Path(folder, "config.json").write_text(json.dumps(config))
            table = plan(model=folder, methods=("full", "lora", "qlora"), batch_size=1, max_length=512,
                         dtype="bf16", device="cuda")  # fmt: skip
            for row in table.rows:
                rows.append({"model": name, "method": row.method, "parameters": table.base_parameters,
                             "memory": row.memory.to_dict(), "checkpointed": row.memory_checkpointed.to_dict(),
                             "guide": GUIDE[name][row.method]})  # fmt: skip
    return rows


def markdown(results: dict) -> str:
    out = ["# `peftkit plan`: predicted against measured peak training memory", ""]
    out += [f"Command: `{results['command']}`", "", f"Machine: {results['machine']}", ""]
    out += [
        "| model | method | grad. ckpt | malloc | B x T | predicted peak | measured peak RSS | error | "
        "predicted step | measured step | error | runtime at start |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["measured"]:
        p, m = row["predicted"], row["measured"]
        ckpt = "yes" if row["checkpointing"] else "no"
        head = f"| {row['model']} | {row['method']} | {ckpt} | {row['malloc']} | {row['batch']} x {row['tokens']} |"
        if "error" in m:
            out.append(f"{head} {p['total'] / 2**20:,.0f} MiB | failed: {m['error']} | | | | | |")
            continue
        total = _predicted(row)
        step_p = total - p["runtime"] - p["base"] - p["trainable"]
        step_m = m["peak"] - m["ready"]
        out.append(
            f"{head} {total / 2**20:,.0f} MiB | {m['peak'] / 2**20:,.0f} MiB | **{_err(total, m['peak'])}** | "
            f"{step_p / 2**20:,.0f} MiB | {step_m / 2**20:,.0f} MiB | **{_err(step_p, step_m)}** | "
            f"{m['baseline'] / 2**20:,.0f} MiB |"
        )
    out += ["", "## LLaMA configs on the meta device next to the guides' tables", ""]
    out += ["bf16 weights, CUDA, batch 1 x 512 tokens, AdamW (moments in the parameters' dtype).", ""]
    out += ["| model | method | predicted peak | with grad. ckpt | base weights | trainable + grads + AdamW | "
            "activations + logits | guides |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in results["llama"]:
        m, c = row["memory"], row["checkpointed"]
        states = m["trainable"] + m["optimizer"] + m["gradients"]
        out.append(
            f"| {row['model']} | {row['method']} | {m['total'] / 1e9:,.1f} GB | {c['total'] / 1e9:,.1f} GB | "
            f"{m['base'] / 1e9:,.1f} GB | {states / 1e9:,.1f} GB | {(m['activations'] + m['logits']) / 1e9:,.1f} GB | "
            f"{row['guide']} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config-dir")
    parser.add_argument("--task")
    parser.add_argument("--method")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--methods", nargs="+")
    parser.add_argument(
        "--no-checkpointing-runs", action="store_true", help="only runs without checkpointing"
    )
    parser.add_argument(
        "--only-checkpointing-runs", action="store_true", help="only the runs with gradient checkpointing"
    )
    parser.add_argument("--mallocs", nargs="+", choices=list(MALLOC), default=list(MALLOC))
    parser.add_argument("--output", help="write the results as Markdown here (and .json beside it)")
    parser.add_argument("--report-from", help="only rewrite --output from this earlier .json")
    parser.add_argument("--journal", help="append each run's result to this JSON-lines file as it ends")
    parser.add_argument("--from-journals", nargs="+", help="with --output: the report from these journals")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.report_from or args.from_journals:  # measurements kept, predictions of the planner as it is now
        if args.report_from:
            results = json.loads(Path(args.report_from).read_text())
        else:
            rows = [
                json.loads(line)
                for path in args.from_journals
                for line in Path(path).read_text().splitlines()
            ]
            command = "python -m benchmarks.plan_accuracy " + " ".join(sys.argv[1:])
            results = {"command": command, "machine": _machine(), "measured": rows}
        results = replan(results)
        Path(args.output).write_text(markdown(results))
        Path(args.output).with_suffix(".json").write_text(json.dumps(results, indent=1))
        return
    checkpointing = [] if args.only_checkpointing_runs else [(False, m) for m in args.mallocs]
    checkpointing += [] if args.no_checkpointing_runs else [(True, "fixed")]
    results = {
        "command": "python -m benchmarks.plan_accuracy " + " ".join(sys.argv[1:]),
        "machine": _machine(),
        "measured": measured_rows(args.models, args.methods, checkpointing, args.journal),
        "llama": llama_rows(),
    }
    if args.output:
        Path(args.output).write_text(markdown(results))
        Path(args.output).with_suffix(".json").write_text(json.dumps(results, indent=1))
    else:
        print(json.dumps(results["llama"], indent=1))


if __name__ == "__main__":
    main()
