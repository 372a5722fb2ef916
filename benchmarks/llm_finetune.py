"""Causal-LM fine-tuning, peftkit against Hugging Face PEFT inside transformers' ``Trainer``.

    nice -n 10 .venv/bin/python -m benchmarks.llm_finetune --output benchmarks/results/llm_finetune.md
    .venv/bin/python -m benchmarks.llm_finetune --quick          # one short round: does it run?

SmolLM2-135M-Instruct (the real weights peftkit bundles, ``peftkit.assets``) with LoRA (r=8, alpha=16,
dropout 0.05, all linear layers) and QLoRA (the same adapter on an NF4 base, double quantization) on the
bundled chat pairs (``chatterbot``: the loss on the response only), both libraries with the same training
records, the same tokenization and labels (``peftkit.tasks`` CausalLM collate), maximum length, batch size,
steps, learning rate, schedule, weight decay, clipping and seed:

- ``peftkit``: peftkit's training step as ``peftkit train`` runs it for a causal LM: length-grouped batches
  (``StepOrder``), the fused linear cross-entropy (``fused_training_loss``), AdamW (QLoRA on CUDA: paged
  8-bit AdamW), linear schedule;
- ``hf``: ``Trainer`` with ``peft.get_peft_model`` (QLoRA: ``BitsAndBytesConfig`` + ``prepare_model_for_kbit_
  training``), its defaults otherwise (random batches, ``optim="adamw_torch"``; QLoRA on CUDA
  ``"paged_adamw_8bit"``).

Each configuration runs in its own process; rounds interleave the peers (the order alternates). Reported per
process: real tokens/s (non-padding input tokens of the steps after warm-up over their wall time, data
loading included), peak memory (the growth of the resident set, or CUDA's peak allocation, while training,
above the loaded model; and from before the model was loaded), and the loss on 16 held-out pairs after
training. On CUDA the models run in bf16 autocast (fp32 master weights) in both libraries.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULT = "RESULT "
CONFIGS = ("peftkit-lora", "hf-lora", "peftkit-qlora", "hf-qlora")
EVAL_RECORDS = 16


# --- worker ------------------------------------------------------------------------------------------------
def _memory_mib(cuda: bool) -> tuple[float, float]:
    """(current, peak since the last reset) in MiB: CUDA allocations, else the resident set."""
    if cuda:
        return torch.cuda.memory_allocated() / 2**20, torch.cuda.max_memory_allocated() / 2**20
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _reset_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")


def _data(args):
    from peftkit.assets import resolve_model
    from peftkit.data import load_splits
    from peftkit.tasks import TASKS

    task = TASKS["causal-lm"]
    model_dir = resolve_model("smollm2")
    tokenizer = task.load_tokenizer(model_dir)
    splits = load_splits("chatterbot", seed=args.seed)

    def collate(records):
        return task.collate(records, tokenizer, args.max_length)

    return model_dir, splits.train, splits.validation[:EVAL_RECORDS], collate


def _lora_kwargs(library: str) -> dict:
    if library == "peftkit":
        return {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"}
    return {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"}


def _load_model(library: str, method: str, model_dir, cuda: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = torch.bfloat16 if cuda else torch.float32
    device = "cuda" if cuda else "cpu"
    if library == "peftkit":
        from peftkit import LoraConfig, get_peft_model, get_qlora_model
        from peftkit.quantization import QuantizationConfig

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
        if method == "lora":
            return get_peft_model(base, LoraConfig(**_lora_kwargs("peftkit")))
        dtype = "bfloat16" if cuda else "float32"
        return get_qlora_model(
            base,
            LoraConfig(**_lora_kwargs("peftkit"), adapter_dtype="float32"),
            QuantizationConfig(compute_dtype=dtype),
        )
    import peft

    quantization = None
    if method == "qlora":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, quantization_config=quantization, device_map={"": device}
    )
    if method == "qlora":
        base = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    return peft.get_peft_model(base, peft.LoraConfig(**_lora_kwargs("hf"), task_type="CAUSAL_LM"))


def _eval_loss(model, records, collate, cuda: bool) -> float:
    """Token-weighted mean loss (the ordinary forward) on ``records``, batches of 16."""
    model.eval()
    total, count = 0.0, 0
    device = "cuda" if cuda else "cpu"
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
        for start in range(0, len(records), 16):
            batch = {k: v.to(device) for k, v in collate(records[start : start + 16]).items()}
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total += model(**batch).loss.item() * tokens
            count += tokens
    return total / count


def _train_peftkit(model, train, collate, args, cuda: bool):
    from peftkit.data.batching import StepOrder
    from peftkit.losses.language_model import fused_training_loss
    from peftkit.qlora import paged_adamw_8bit
    from peftkit.training.optim import linear_schedule

    device = "cuda" if cuda else "cpu"
    lengths = [int(collate([r])["attention_mask"].sum()) for r in train]
    order = StepOrder(size=len(train), global_batch=args.batch_size, seed=args.seed, lengths=lengths)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.method == "qlora" and cuda:
        optimizer = paged_adamw_8bit(params, lr=args.lr, weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    scheduler = linear_schedule(optimizer, args.steps, warmup_steps=args.warmup)
    model.train()
    torch.manual_seed(args.seed)
    times, tokens, losses = [], [], []
    for step in range(args.steps):
        tick = time.perf_counter()
        batch = {k: v.to(device) for k, v in collate([train[i] for i in order.step_rows(step)]).items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = fused_training_loss(model, model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronises on CUDA, so the time is the step's
        times.append(time.perf_counter() - tick)
        tokens.append(int(batch["attention_mask"].sum()))
    return times, tokens, losses


def _train_hf(model, train, collate, args, cuda: bool):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    tokens, ends, losses = [], [], []

    def counting_collate(records):
        batch = collate(records)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps,
            learning_rate=args.lr,
            weight_decay=0.0,
            warmup_steps=args.warmup,
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            seed=args.seed,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            remove_unused_columns=False,
            dataloader_num_workers=0,
            use_cpu=not cuda,
            bf16=cuda,
            optim="paged_adamw_8bit" if args.method == "qlora" and cuda else "adamw_torch",
            disable_tqdm=True,
        )
        start = time.perf_counter()
        trainer = Trainer(
            model=model, args=training_args, train_dataset=train, data_collator=counting_collate
        )
        trainer.add_callback(Clock())
        trainer.train()
    times = [b - a for a, b in zip([start, *ends[:-1]], ends, strict=True)]
    return times, tokens[: len(times)], losses


def worker(args) -> dict:
    cuda = torch.cuda.is_available()
    torch.set_num_threads(args.threads)
    library, method = args.config.split("-")
    args.method = method
    model_dir, train, validation, collate = _data(args)
    _reset_peak(cuda)
    before_load, _ = _memory_mib(cuda)
    model = _load_model(library, method, model_dir, cuda)
    with torch.no_grad():  # weights still mapped from the file become resident now, not during the first step
        sum(float(p.float().sum()) for p in model.parameters())
    loaded, load_peak = _memory_mib(cuda)
    _reset_peak(cuda)
    run = _train_peftkit if library == "peftkit" else _train_hf
    times, tokens, losses = run(model, train, collate, args, cuda)
    _, train_peak = _memory_mib(cuda)
    timed = slice(args.warmup_steps, None)
    return {
        "config": args.config,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "tokens_per_s": sum(tokens[timed]) / sum(times[timed]),
        "step_s": times,
        "tokens": tokens,
        "peak_above_model_mib": train_peak - loaded,
        "peak_total_mib": max(train_peak, load_peak) - before_load,
        "model_mib": loaded - before_load,
        "train_losses": losses,
        "eval_loss": _eval_loss(model, validation, collate, cuda),
    }


# --- driver ------------------------------------------------------------------------------------------------
def run_config(config: str, args) -> dict:
    command = [sys.executable, "-m", "benchmarks.llm_finetune", "--worker", config]
    for name in ("steps", "warmup", "warmup_steps", "batch_size", "max_length", "lr", "seed", "threads"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    # glibc pinned to mmap for blocks >= 64 KiB (both peers alike): freed tensors leave the resident set, so
    # its peak is what was alive at once, not what glibc's heap kept from the first step.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith(RESULT)), None)
    if done.returncode or line is None:
        return {"config": config, "failed": f"exit {done.returncode}: {done.stderr[-2000:]}"}
    return json.loads(line[len(RESULT) :])


def _ratio_rows(results: dict[str, list[dict]], method: str) -> list[str]:
    ours = [r for r in results.get(f"peftkit-{method}", []) if "failed" not in r]
    theirs = [r for r in results.get(f"hf-{method}", []) if "failed" not in r]
    if not ours or not theirs:
        return []

    def median(runs, key):
        return statistics.median(r[key] for r in runs)

    rows = []
    for key, label, target in (
        ("tokens_per_s", "real tokens/s", ">= 1.3x"),
        ("peak_above_model_mib", "peak memory above the loaded model (MiB)", "<= 0.6x"),
        ("peak_total_mib", "peak memory from before loading (MiB)", ""),
        ("eval_loss", "held-out loss after training", "no worse"),
    ):
        a, b = median(ours, key), median(theirs, key)
        rows.append(f"| {method} | {label} | {a:,.3f} | {b:,.3f} | **{a / b:.2f}x** | {target} |")
    return rows


def markdown(results: dict[str, list[dict]], args, command: str, seconds: float) -> str:
    first = next((r for runs in results.values() for r in runs if "device" in r), {"device": "?"})
    lines = [
        "# Causal-LM fine-tuning: peftkit vs Hugging Face PEFT + Trainer",
        "",
        f"Command: `{command}`",
        "",
        f"SmolLM2-135M-Instruct (bundled), chatterbot pairs, {args.steps} steps ({args.warmup_steps} not timed), "
        f"batch {args.batch_size}, max length {args.max_length}, lr {args.lr}, warm-up {args.warmup}, seed "
        f"{args.seed}, {args.rounds} interleaved round(s), {args.threads} thread(s); device: {first['device']}; "
        f"torch {torch.__version__}; {seconds / 60:.1f} min. Medians over rounds; ratio = peftkit / HF.",
        "",
        "| method | measure | peftkit | HF PEFT + Trainer | ratio | target |",
        "|---|---|---|---|---|---|",
        *_ratio_rows(results, "lora"),
        *_ratio_rows(results, "qlora"),
        "",
        "Per process (config: tokens/s, peak above model MiB, eval loss):",
        "",
    ]
    for config, runs in results.items():
        cells = ", ".join(
            "failed"
            if "failed" in r
            else f"{r['tokens_per_s']:.1f} / {r['peak_above_model_mib']:.0f} / {r['eval_loss']:.4f}"
            for r in runs
        )
        lines.append(f"- `{config}`: {cells}")
    for runs in results.values():
        lines += [f"\nFailure of `{r['config']}`:\n\n```\n{r['failed']}\n```" for r in runs if "failed" in r]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=CONFIGS, dest="config")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup-steps", type=int, default=1, help="first steps left out of tokens/s")
    # No learning-rate warm-up by default: transformers' schedule starts at 0 and peftkit's at lr/warmup,
    # so over a few steps they would differ; without warm-up both decay linearly from lr alike.
    parser.add_argument("--warmup", type=int, default=0, help="learning-rate warm-up steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one round of 3 steps")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.config:
        sys.stdout.write(RESULT + json.dumps(worker(args)) + "\n")
        return
    if args.quick:
        args.rounds, args.steps, args.warmup_steps = 1, 3, 1
    from peftkit.assets import resolve_model

    resolve_model("smollm2")  # converted once, before any worker is timed
    start = time.perf_counter()
    results: dict[str, list[dict]] = {c: [] for c in args.configs}
    for round_ in range(args.rounds):
        for method in ("lora", "qlora"):
            pair = [c for c in (f"peftkit-{method}", f"hf-{method}") if c in args.configs]
            for config in pair if round_ % 2 == 0 else pair[::-1]:
                result = run_config(config, args)
                results[config].append(result)
                _write(results, args, start)
                if "failed" in result:
                    print(f"round {round_ + 1} {config} failed: {result['failed'][-500:]}", flush=True)
                    continue
                print(
                    f"round {round_ + 1} {config}: {result['tokens_per_s']:.1f} tokens/s, "
                    f"{result['peak_above_model_mib']:.0f} MiB above the model, loss {result['eval_loss']:.4f}",
                    flush=True,
                )
    print(_write(results, args, start))


def _write(results: dict[str, list[dict]], args, start: float) -> str:
    """The report so far; written after every worker, so a run cut short keeps what it measured."""
    command = "python -m benchmarks.llm_finetune " + " ".join(sys.argv[1:])
    report = markdown(results, args, command, time.perf_counter() - start)
    if args.output:
        args.output.write_text(report)
        args.output.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
