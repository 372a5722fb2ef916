"""One configuration of ``benchmarks.llm_finetune`` in its own process: load, train, measure, evaluate.

Measured per process:

- real tokens/s: non-padding input tokens of the steps after warm-up over their wall time (data loading
  included), and over the process's CPU time (``time.process_time``: with one thread, the work done, which
  other jobs on a shared machine do not inflate, unlike wall time);
- peak memory while training, above the loaded model (the growth of the resident set, or CUDA's peak
  allocation), over the run (which depends on the widest batch each library happened to draw) and for one
  training step on the same batch in both libraries (the 8 longest records: forward, loss, backward);
- the loss on 16 held-out pairs after training (the ordinary forward).
"""

from __future__ import annotations

import platform
import tempfile
import time

import torch

EVAL_RECORDS = 16


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


def _same_batch_peak(step, cuda: bool) -> float:
    """MiB the training step ``step()`` (forward, loss, backward) adds at its peak to what is alive before."""
    if cuda:
        torch.cuda.synchronize()
    _reset_peak(cuda)
    before, _ = _memory_mib(cuda)
    step()
    if cuda:
        torch.cuda.synchronize()
    return _memory_mib(cuda)[1] - before


def _train_peftkit(model, train, collate, args, cuda: bool, lengths, widest):
    from peftkit.data.batching import StepOrder
    from peftkit.losses.language_model import fused_training_loss
    from peftkit.qlora import paged_adamw_8bit
    from peftkit.training.optim import linear_schedule

    device = "cuda" if cuda else "cpu"
    order = StepOrder(size=len(train), global_batch=args.batch_size, seed=args.seed, lengths=lengths)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.method == "qlora" and cuda:
        optimizer = paged_adamw_8bit(params, lr=args.lr, weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    scheduler = linear_schedule(optimizer, args.steps, warmup_steps=args.warmup)
    model.train()
    torch.manual_seed(args.seed)

    def loss_of(batch):
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            return fused_training_loss(model, model, batch), int(batch["attention_mask"].sum())

    run = {"step_s": [], "step_cpu_s": [], "tokens": [], "train_losses": []}
    for step in range(args.steps):
        tick, cpu = time.perf_counter(), time.process_time()
        loss, tokens = loss_of(collate([train[i] for i in order.step_rows(step)]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        run["train_losses"].append(loss.item())  # synchronises on CUDA, so the time is the step's
        run["step_s"].append(time.perf_counter() - tick)
        run["step_cpu_s"].append(time.process_time() - cpu)
        run["tokens"].append(tokens)

    def widest_step():
        loss_of(collate(widest))[0].backward()

    run["run_peak"] = _memory_mib(cuda)[1]  # before the same-batch step resets it
    run["same_batch_peak_mib"] = _same_batch_peak(widest_step, cuda)
    optimizer.zero_grad(set_to_none=True)
    return run


def _train_hf(model, train, collate, args, cuda: bool, lengths, widest):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    tokens, ends, cpu_ends, losses = [], [], [], []

    def counting_collate(records):
        batch = collate(records)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())

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
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer = Trainer(
            model=model, args=training_args, train_dataset=train, data_collator=counting_collate
        )
        trainer.add_callback(Clock())
        trainer.train()
        # The Trainer's own step (forward, its loss, backward) on the same widest batch as peftkit's.
        widest_batch = collate(widest)
        run_peak = _memory_mib(cuda)[1]
        peak = _same_batch_peak(lambda: trainer.training_step(model, widest_batch), cuda)
        model.zero_grad(set_to_none=True)
    return {
        "step_s": [b - a for a, b in zip([start, *ends[:-1]], ends, strict=True)],
        "step_cpu_s": [b - a for a, b in zip([cpu_start, *cpu_ends[:-1]], cpu_ends, strict=True)],
        "tokens": tokens[: len(ends)],
        "train_losses": losses,
        "same_batch_peak_mib": peak,
        "run_peak": run_peak,
    }


def worker(args) -> dict:
    cuda = torch.cuda.is_available()
    torch.set_num_threads(args.threads)
    library, method = args.config.split("-")
    args.method = method
    model_dir, train, validation, collate = _data(args)
    lengths = [int(collate([r])["attention_mask"].sum()) for r in train]
    widest = [train[i] for i in sorted(range(len(train)), key=lambda i: -lengths[i])[: args.batch_size]]
    _reset_peak(cuda)
    before_load, _ = _memory_mib(cuda)
    model = _load_model(library, method, model_dir, cuda)
    with torch.no_grad():  # weights still mapped from the file become resident now, not during the first step
        sum(float(p.float().sum()) for p in model.parameters())
    loaded, load_peak = _memory_mib(cuda)
    _reset_peak(cuda)
    train_fn = _train_peftkit if library == "peftkit" else _train_hf
    run = train_fn(model, train, collate, args, cuda, lengths, widest)
    train_peak = run.pop("run_peak")
    timed = slice(args.warmup_steps, None)
    tokens = sum(run["tokens"][timed])
    return {
        "config": args.config,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "tokens_per_s": tokens / sum(run["step_s"][timed]),
        "tokens_per_cpu_s": tokens / sum(run["step_cpu_s"][timed]),
        **run,
        "peak_above_model_mib": train_peak - loaded,
        "peak_total_mib": max(train_peak, load_peak) - before_load,
        "model_mib": loaded - before_load,
        "eval_loss": _eval_loss(model, validation, collate, cuda),
    }
