"""Shared pieces of the benchmark workers: models, inputs, wrapping with either library, clocks, memory.

Every worker process builds the same model from a transformers config class (random weights, fixed seed,
nothing downloaded), the same inputs, and wraps it with LoRA r=8 alpha=16 on all linear layers in the
library it was asked for. peftkit and Hugging Face PEFT are only imported by the process that uses them,
so neither pays for importing the other.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

THREADS = 2
SEED = 0
INPUT_SEED = 1234
BATCH, TOKENS = 8, 128
RANK, ALPHA = 8, 16
VIRTUAL_TOKENS = 20  # prompt and prefix tuning: n virtual tokens, prefix without projection
METHODS = ("lora", "prompt_tuning", "prefix_tuning")
LIBRARIES = ("peftkit", "hf")
RESULT_PREFIX = "RESULT "  # the worker's one result line on stdout starts with this


@dataclass(frozen=True)
class ModelSpec:
    """A model built from a config class; ``head`` is a fresh task head both libraries train in full."""

    name: str
    description: str
    build: Callable[[Size], nn.Module]
    task: str  # "classification" (label per row) or "causal-lm" (next-token labels)
    head: tuple[str, ...] = ()


@dataclass(frozen=True)
class Size:
    vocab: int = 16000
    hidden: int = 384
    layers: int = 4
    heads: int = 6
    ffn: int = 1536
    positions: int = TOKENS  # position embeddings (prompt methods need TOKENS + VIRTUAL_TOKENS)


SIZE = Size()
TINY = Size(vocab=64, hidden=16, layers=1, heads=2, ffn=32)  # for the untimed pre-run, see `preload`


def _bert(size: Size) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        intermediate_size=size.ffn,
        max_position_embeddings=size.positions,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def _gpt2(size: Size) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=size.vocab,
        n_embd=size.hidden,
        n_layer=size.layers,
        n_head=size.heads,
        n_inner=size.ffn,
        n_positions=size.positions,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def _llama(size: Size) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        intermediate_size=size.ffn * 688 // 1024,  # SwiGLU: about 8/3 x hidden, as LLaMA
        max_position_embeddings=size.positions,
    )
    return LlamaForCausalLM(config)


_SHAPE = f"hidden {SIZE.hidden}, {SIZE.layers} layers, {SIZE.heads} heads, vocab {SIZE.vocab}"
MODELS: dict[str, ModelSpec] = {
    "bert": ModelSpec(
        "bert",
        f"BertForSequenceClassification: {_SHAPE}, FFN {SIZE.ffn}, 2 labels (classifier trained in full)",
        _bert,
        "classification",
        head=("classifier",),
    ),
    "gpt2": ModelSpec(
        "gpt2",
        f"GPT2LMHeadModel: {_SHAPE}, FFN {SIZE.ffn}, LM head tied to the embeddings",
        _gpt2,
        "causal-lm",
    ),
    "llama": ModelSpec(
        "llama",
        f"LlamaForCausalLM: {_SHAPE}, SwiGLU FFN {SIZE.ffn * 688 // 1024}, untied LM head",
        _llama,
        "causal-lm",
    ),
}


def setup() -> None:
    """Same threads, same seeds, quiet libraries: call first in every worker."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()


def build_model(name: str, size: Size = SIZE) -> nn.Module:
    torch.manual_seed(SEED)
    return MODELS[name].build(size)


def make_batch(
    name: str, rows: int = BATCH, with_labels: bool = True, size: Size = SIZE
) -> dict[str, torch.Tensor]:
    """Token ids (and labels for training) from a fixed generator: identical in every process."""
    generator = torch.Generator().manual_seed(INPUT_SEED)
    input_ids = torch.randint(0, size.vocab, (rows, TOKENS), generator=generator)
    batch = {"input_ids": input_ids}
    if with_labels:
        if MODELS[name].task == "classification":
            batch["labels"] = torch.randint(0, 2, (rows,), generator=generator)
        else:
            batch["labels"] = input_ids
    return batch


def wrap_lora(library: str, model: nn.Module, model_name: str, adapter: str = "default") -> nn.Module:
    """LoRA r=8, alpha=16, no dropout, on every linear layer but the output head; a fresh task head (BERT's
    classifier) is trained in full in both libraries, so both wrap exactly the same layers."""
    torch.manual_seed(SEED)
    head = list(MODELS[model_name].head) or None
    if library == "peftkit":
        import peftkit

        config = peftkit.LoraConfig(r=RANK, alpha=ALPHA, target_modules="all-linear", modules_to_save=head)
        return peftkit.get_peft_model(model, config, adapter_name=adapter)
    if library == "hf":
        import peft

        config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", modules_to_save=head)
        return peft.get_peft_model(model, config, adapter_name=adapter)
    raise ValueError(f"unknown library {library!r}; expected one of {LIBRARIES}")


def wrap(library: str, model: nn.Module, model_name: str, method: str = "lora") -> nn.Module:
    """``method``: LoRA as in :func:`wrap_lora`, or prompt / prefix tuning of a causal LM with
    ``VIRTUAL_TOKENS`` virtual tokens, random init, the prefix trained directly (no projection) in both."""
    if method == "lora":
        return wrap_lora(library, model, model_name)
    torch.manual_seed(SEED)
    n = VIRTUAL_TOKENS
    if library == "peftkit":
        import peftkit

        config = {"prompt_tuning": peftkit.PromptTuningConfig, "prefix_tuning": peftkit.PrefixTuningConfig}
        return peftkit.get_peft_model(model, config[method](num_virtual_tokens=n))
    import peft

    if method == "prompt_tuning":
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)
    else:
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prefix_projection=False)
    return peft.get_peft_model(model, config)


def model_size(method: str) -> Size:
    """Prompt methods put ``VIRTUAL_TOKENS`` positions in front of the ``TOKENS`` real ones."""
    return SIZE if method == "lora" else replace(SIZE, positions=TOKENS + VIRTUAL_TOKENS)


def add_lora(library: str, model: nn.Module, model_name: str, adapter: str) -> None:
    """A further adapter with the same config as :func:`wrap_lora`'s."""
    head = list(MODELS[model_name].head) or None
    if library == "peftkit":
        import peftkit

        model.add_adapter(
            adapter,
            peftkit.LoraConfig(r=RANK, alpha=ALPHA, target_modules="all-linear", modules_to_save=head),
        )
    else:
        import peft

        model.add_adapter(
            adapter,
            peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", modules_to_save=head),
        )


def wrapped_layer_paths(library: str, model: nn.Module) -> list[str]:
    """Paths (relative to the base model) of the layers carrying LoRA: to check both libraries match."""
    if library == "peftkit":
        from peftkit.layer import AdapterLayer
        from peftkit.modules_to_save import ModulesToSave

        return sorted(
            path
            for path, module in model.base_model.named_modules()
            if isinstance(module, AdapterLayer) and not isinstance(module, ModulesToSave)
        )
    from peft.tuners.lora import LoraLayer

    return sorted(
        path.removeprefix("base_model.model.")
        for path, module in model.named_modules()
        if isinstance(module, LoraLayer)
    )


def preload(model_name: str, library: str, method: str = "lora") -> None:
    """Run a tiny model of the same class through one training step and one inference pass, untimed.

    transformers imports model code lazily and HF PEFT imports much of it eagerly: without this, the process
    that imports peftkit would count ~100 MB of transformers modules as "training memory" that the HF PEFT
    process had already paid for at import. Afterwards both start their memory baseline alike."""
    tiny = replace(TINY, positions=model_size(method).positions)
    model = build_model(model_name, tiny)
    if library in LIBRARIES:
        model = wrap(library, model, model_name, method)
    batch = make_batch(model_name, rows=2, size=tiny)
    model.train()
    model(**batch).loss.backward()
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    del model
    gc.collect()


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- clocks --------------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_medians(
    variants: dict[str, tuple[Callable[[], None], Callable[[], Any], Callable[[], None]]],
    *,
    warmup: int,
    rounds: int,
    calls: int,
) -> dict[str, dict[str, float]]:
    """Median seconds per call of each variant, measured in alternating blocks so drift hits all alike.

    ``variants[name] = (enter, call, leave)``: ``enter``/``leave`` switch the model into that variant (merge,
    unmerge, ...) outside the clock. Each round runs every variant once: enter, ``calls`` timed calls, leave.
    The first round is preceded by ``warmup`` untimed calls per variant.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(rounds):
        for name, (enter, call, leave) in variants.items():
            enter()
            for _ in range(warmup if round_index == 0 else 0):
                call()
            times[name].extend(timed(call) for _ in range(calls))
            leave()
    return {name: summarise(values) for name, values in times.items()}


def summarise(values: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(values), "min_s": min(values), "n": len(values)}


# --- memory --------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    """High-water mark of resident memory (VmHWM) since the last :func:`reset_peak_rss`."""
    return _status_kib("VmHWM") / 1024


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0, ``clear_refs`` value 5), so that the peak measured
    afterwards excludes what the imports and earlier phases touched."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def allocator() -> str:
    """``jemalloc`` when libjemalloc is mapped into this process (LD_PRELOAD), else ``glibc``."""
    with open("/proc/self/maps") as maps:
        return "jemalloc" if "libjemalloc" in maps.read() else "glibc"


# --- worker plumbing -----------------------------------------------------------------------------------
def worker_args(description: str, libraries: tuple[str, ...], methods: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--library", choices=libraries, required=True)
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--quick", action="store_true", help="fewer calls: checks the script runs")
    if methods:
        parser.add_argument("--method", choices=METHODS, default="lora", help="what the peers train")
    return parser.parse_args()


def emit(result: dict[str, Any]) -> None:
    """Print the worker's result as one JSON line for the driver to pick up."""
    result = {**result, "allocator": allocator(), "threads": torch.get_num_threads(), "pid": os.getpid()}
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
