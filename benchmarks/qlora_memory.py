"""QLoRA memory: bytes per quantized parameter, resident model size fp32 vs NF4, peak memory of a training step.

    .venv/bin/python -m benchmarks.qlora_memory --output benchmarks/results/qlora_memory.md

Each configuration runs in a fresh process (``--worker``), so one's allocations never inflate another's
peak. A LLaMA-style model is built from a config with random weights (nothing downloaded), then:

- ``lora-fp32``: LoRA on the fp32 base (``get_peft_model``);
- ``qlora-nf4``: the base's linear layers (all but the head) quantized to NF4 with double quantization,
  blocks of 64, fp32 compute, fp32 adapters (``get_qlora_model``);
- ``qlora-nf4-bf16``: the same with bf16 compute and bf16 adapters.

LoRA is r=16, alpha=32 on all linear layers; AdamW on the adapters; batch 1 x 256 tokens, next-token loss;
``--steps`` training steps (default 1: the first step already allocates everything, AdamW's state included).
Memory is the process's resident set (Linux ``VmRSS``; the peak is ``VmHWM``, reset just before the first
training step, so it covers the steps only, not building or quantizing the model). glibc's malloc is pinned
to mmap for blocks >= 64 KiB so freed tensors go back to the system and RSS means what is live.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

MODELS = {
    # name: (description, LlamaConfig kwargs)
    "llama-0.6b": (
        "LLaMA-style, hidden 2048, 12 layers, 16 heads (4 KV), FFN 5632, vocab 32000, untied head",
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=12,
            num_attention_heads=16,
            num_key_value_heads=4,
            vocab_size=32000,
            tie_word_embeddings=False,
        ),
    ),
    "smollm2-135m-shape": (
        "SmolLM2-135M's shape: hidden 576, 30 layers, 9 heads (3 KV), FFN 1536, vocab 49152, tied head",
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            tie_word_embeddings=True,
        ),
    ),
}
CONFIGS = ("lora-fp32", "qlora-nf4", "qlora-nf4-bf16")
BATCH, TOKENS = 1, 256
RANK, ALPHA = 16, 32
RESULT = "RESULT "


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def _state_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def worker(model_name: str, config_name: str, gradient_checkpointing: bool, steps: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftkit import LoraConfig, get_peft_model, get_qlora_model, storage_report
    from peftkit.quantization import QuantizationConfig

    torch.set_num_threads(2)
    torch.manual_seed(0)
    started = time.perf_counter()
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=TOKENS, **MODELS[model_name][1]))
    model.train()
    parameters = sum(p.numel() for p in model.parameters())
    fp32_bytes = _state_bytes(model)
    lora = dict(r=RANK, alpha=ALPHA, target_modules="all-linear")
    if config_name == "lora-fp32":
        model.requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        peft_model = get_peft_model(model, LoraConfig(**lora))
    else:
        bf16 = config_name.endswith("bf16")
        peft_model = get_qlora_model(
            model,
            LoraConfig(**lora, adapter_dtype="bfloat16" if bf16 else "float32"),
            QuantizationConfig(compute_dtype="bfloat16" if bf16 else "float32"),
            gradient_checkpointing=gradient_checkpointing,
        )
    peft_model.train()
    build_s = time.perf_counter() - started
    report = storage_report(peft_model.base_model)
    gc.collect()
    rss_ready = _status_mib("VmRSS")

    optimizer = torch.optim.AdamW(peft_model.adapter_parameters("default"), lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, TOKENS), generator=generator)
    _reset_peak()
    step_s, losses = [], []
    for _ in range(steps):
        tick = time.perf_counter()
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - tick)
        losses.append(loss.item())
    peak = _status_mib("VmHWM")
    return {
        "model": model_name,
        "config": config_name,
        "gradient_checkpointing": gradient_checkpointing,
        "parameters": parameters,
        "trainable": sum(p.numel() for p in peft_model.adapter_parameters("default")),
        "fp32_model_bytes": fp32_bytes,
        "model_bytes": report.total_bytes
        if report.quantized_parameters
        else _state_bytes(peft_model.base_model),
        "quantized_parameters": report.quantized_parameters,
        "quantized_bytes": report.quantized_bytes,
        "bytes_per_quantized_parameter": report.bytes_per_quantized_parameter,
        "build_s": build_s,
        "rss_ready_mib": rss_ready,
        "peak_step_mib": peak,
        "step_s": step_s,
        "losses": losses,
    }


def merge_error(steps: int = 30) -> dict:
    """The error merging adds, on a small LLaMA-style model (hidden 512, 4 layers, vocab 8000) whose QLoRA
    adapter was trained ``steps`` AdamW steps (lr 1e-3) on one fixed batch, so that ΔW has a trained size.
    Relative errors are ||logits - reference|| / ||reference|| on a held-out batch."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    from peftkit import LoraConfig, get_qlora_model, quantize_model
    from peftkit.quantization import dequantize_weight

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8000,
        max_position_embeddings=128,
    )
    full = LlamaForCausalLM(config).eval()
    model = get_qlora_model(copy.deepcopy(full), LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(1)
    train_ids = torch.randint(0, config.vocab_size, (4, 64), generator=generator)
    test_ids = torch.randint(0, config.vocab_size, (4, 64), generator=generator)
    optimizer = torch.optim.AdamW(model.adapter_parameters("default"), lr=1e-3)
    model.train()
    for _ in range(steps):
        model(input_ids=train_ids, labels=train_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()

    def logits(m):
        with torch.no_grad():
            return m(input_ids=test_ids).logits

    def relative(a, b):
        return ((a - b).norm() / b.norm()).item()

    qlora = logits(model)
    with model.disable_adapter():
        nf4_base = logits(model)
    layer = model.base_model.model.layers[0].self_attn.q_proj
    delta = layer.delta_weight("default").norm() / layer.base_layer.weight.quant_state.shape.numel() ** 0.5
    exact = dequantize_weight(layer.base_layer) + layer.delta_weight("default")  # dequant(W) + ΔW
    model.merge_adapter()
    merged_in_place = logits(model)
    lost = (dequantize_weight(layer.base_layer) - exact).norm() / layer.delta_weight("default").norm()
    model.unmerge_adapter()
    unmerged = logits(model)
    plain = model.merge_and_unload()
    merged_full = logits(plain)
    quantize_model(plain)
    requantized = logits(plain)
    return {
        "steps": steps,
        "delta_rms_q_proj_0": delta.item(),
        "nf4_base_vs_fp32_base": relative(nf4_base, logits(full)),
        "qlora_vs_nf4_base": relative(qlora, nf4_base),
        "merge_and_unload_fp32_vs_qlora": relative(merged_full, qlora),
        "merge_and_unload_fp32_max_abs": (merged_full - qlora).abs().max().item(),
        "merge_adapter_requantized_vs_qlora": relative(merged_in_place, qlora),
        "requantization_error_over_delta_norm_q_proj_0": lost.item(),
        "merge_and_unload_then_quantize_vs_qlora": relative(requantized, qlora),
        "unmerge_exact": bool(torch.equal(unmerged, qlora)),
    }


def run_one(model_name: str, config_name: str, gradient_checkpointing: bool, steps: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    command = [sys.executable, "-m", "benchmarks.qlora_memory", "--worker", model_name, config_name]
    command += ["--steps", str(steps)]
    if gradient_checkpointing:
        command.append("--gradient-checkpointing")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        sys.exit(f"{model_name}/{config_name} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT) :])


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def markdown(results: list[dict], command: str) -> str:
    lines = [
        "# QLoRA memory",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (2 threads used), Linux {platform.release()}; "
        f"torch {torch.__version__}, bitsandbytes {_version('bitsandbytes')}, "
        f"transformers {_version('transformers')}. Random weights from a config (seed 0), LoRA r={RANK} "
        f"alpha={ALPHA} on all linear layers, AdamW on the adapters, batch {BATCH} x {TOKENS} tokens, "
        "steps as in the table (the peak covers them all). Each row is its own process.",
        "",
        "Models:",
        "",
    ]
    lines += [f"- `{name}`: {MODELS[name][0]}" for name in dict.fromkeys(r["model"] for r in results)]
    lines += [
        "",
        "| model | config | grad. ckpt | params | quantized params | bytes / quantized param | model size "
        "(tensors) | RSS, model ready | peak RSS, training steps | steps | last step time | loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        quantized = r["quantized_parameters"]
        lines.append(
            f"| {r['model']} | {r['config']} | {'yes' if r['gradient_checkpointing'] else 'no'} "
            f"| {r['parameters'] / 1e6:,.1f} M | {quantized / 1e6:,.1f} M "
            f"| {r['bytes_per_quantized_parameter']:.4f} | {mib(r['model_bytes'])} (fp32: {mib(r['fp32_model_bytes'])}) "
            f"| {r['rss_ready_mib']:,.0f} MiB | {r['peak_step_mib']:,.0f} MiB "
            f"| {len(r['step_s'])} | {r['step_s'][-1]:.1f} s | {r['losses'][-1]:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=1, help="training steps per process (default 1)")
    parser.add_argument(
        "--merge-error", action="store_true", help="measure the error merging adds, then exit"
    )
    parser.add_argument("--output", type=Path, help="write the Markdown table (and a .json beside it)")
    args = parser.parse_args()
    if args.merge_error:
        print(json.dumps(merge_error(), indent=2))
        return
    if args.worker:
        result = worker(*args.worker, gradient_checkpointing=args.gradient_checkpointing, steps=args.steps)
        print(RESULT + json.dumps(result), flush=True)
        return
    results = []
    for model_name in args.models:
        for config_name in args.configs:
            result = run_one(model_name, config_name, args.gradient_checkpointing, args.steps)
            print(
                f"{model_name} {config_name}: model {mib(result['model_bytes'])}, "
                f"{result['bytes_per_quantized_parameter']:.4f} B/quantized param, "
                f"peak {result['peak_step_mib']:,.0f} MiB, step {result['step_s'][-1]:.1f} s",
                flush=True,
            )
            results.append(result)
    command = "python -m benchmarks.qlora_memory " + " ".join(sys.argv[1:])
    text = markdown(results, command)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        args.output.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
