"""Every architecture users bring times every method and placement, with each method's default config.

A cell passes every check of ``tests.architecture_matrix.check_cell``, or it is refused on purpose when the
adapter is applied (EXPECTED_REFUSALS: a peftkit error naming the reason), or it fails today in a way being
fixed (KNOWN_FAULTS: a strict xfail, so a fixed cell fails until its entry is deleted). The user-facing table
docs/architecture_matrix.md is rendered from these tables: ``python -m tests.architecture_matrix``.
"""

import pytest
import torch

from tests.architecture_matrix import DOC, METHODS, check_cell, check_refused, render
from tests.tiny_models import FAMILIES

# Why a cell is refused: text the peftkit error raised at apply time must contain; the docs quote it.
NO_BIAS = "has no bias parameters (LLaMA- and T5-style models are built without them), so BitFit would train nothing"
NO_BLOCK_LIST = "no list of repeated blocks found"  # ALBERT: one layer, shared by every position

# (family, method) -> why it is refused, on purpose, when the adapter is applied. One line each, sorted.
EXPECTED_REFUSALS: dict[tuple[str, str], str] = {
    ("albert", "layer_tuning"): NO_BLOCK_LIST,
    ("albert-token", "layer_tuning"): NO_BLOCK_LIST,
    ("gemma2", "bitfit"): NO_BIAS,
    ("gemma3", "bitfit"): NO_BIAS,
    ("llama", "bitfit"): NO_BIAS,
    ("mistral", "bitfit"): NO_BIAS,
    ("mt5", "bitfit"): NO_BIAS,
    ("phi3", "bitfit"): NO_BIAS,
    ("qwen3", "bitfit"): NO_BIAS,
    ("smollm3", "bitfit"): NO_BIAS,
    ("t5", "bitfit"): NO_BIAS,
    ("t5-gated-gelu", "bitfit"): NO_BIAS,
}

# The kinds of fault still known (each is being fixed as a kind, in the library, not in this file).
NO_LORA_DEFAULTS = "no LoRA default targets for this model type"
NO_IA3_DEFAULTS = "no IA3 default targets for this model type"
NO_BOTTLENECK_POSITIONS = "no bottleneck positions for this model type"
QUANTIZED_FP32_MODULES = (
    "4-bit base computes garbage: layers the model keeps in fp32 (T5's `wo`) are quantized"
)
QUANTIZE_SKIPS_LINEAR_SUBCLASSES = "QLoRA skips subclasses of nn.Linear (Falcon's layers)"
QUANTIZE_REFUSES_CONV1D = (
    "QLoRA refuses GPT-2's Conv1D layers (transformers' bitsandbytes integration takes them)"
)
PREFIX_ENCODER_WITHOUT_CACHE = (
    "prefix on an encoder whose forward takes no cache: ignored, or a crash in attention"
)
PREFIX_MULTI_QUERY = "prefix built with 4 KV heads; multi-query Falcon has 1: a crash in attention"
PREFIX_BART = "fails at apply inside transformers: BartConfig has no `num_layers`"

# (family, method) -> the kind of fault; a strict xfail until fixed: delete the line then. One line each, sorted.
KNOWN_FAULTS: dict[tuple[str, str], str] = {
    ("albert", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("albert", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("albert", "ia3"): NO_IA3_DEFAULTS,
    ("albert", "lora"): NO_LORA_DEFAULTS,
    ("albert", "p_tuning_v2"): PREFIX_ENCODER_WITHOUT_CACHE,
    ("albert", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("albert", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("albert", "prefix_tuning"): PREFIX_ENCODER_WITHOUT_CACHE,
    ("albert", "qlora"): NO_LORA_DEFAULTS,
    ("albert-token", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("albert-token", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("albert-token", "ia3"): NO_IA3_DEFAULTS,
    ("albert-token", "lora"): NO_LORA_DEFAULTS,
    ("albert-token", "p_tuning_v2"): PREFIX_ENCODER_WITHOUT_CACHE,
    ("albert-token", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("albert-token", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("albert-token", "prefix_tuning"): PREFIX_ENCODER_WITHOUT_CACHE,
    ("albert-token", "qlora"): NO_LORA_DEFAULTS,
    ("bart", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("bart", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("bart", "ia3"): NO_IA3_DEFAULTS,
    ("bart", "p_tuning_v2"): PREFIX_BART,
    ("bart", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("bart", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("bart", "prefix_tuning"): PREFIX_BART,
    ("bloom", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("bloom", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("bloom", "ia3"): NO_IA3_DEFAULTS,
    ("bloom", "lora"): NO_LORA_DEFAULTS,
    ("bloom", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("bloom", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("bloom", "qlora"): NO_LORA_DEFAULTS,
    ("deberta-v2", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("deberta-v2", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("deberta-v2", "ia3"): NO_IA3_DEFAULTS,
    ("deberta-v2", "lora"): NO_LORA_DEFAULTS,
    ("deberta-v2", "p_tuning_v2"): PREFIX_ENCODER_WITHOUT_CACHE,
    ("deberta-v2", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("deberta-v2", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("deberta-v2", "prefix_tuning"): PREFIX_ENCODER_WITHOUT_CACHE,
    ("deberta-v2", "qlora"): NO_LORA_DEFAULTS,
    ("deberta-v2-token", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("deberta-v2-token", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("deberta-v2-token", "ia3"): NO_IA3_DEFAULTS,
    ("deberta-v2-token", "lora"): NO_LORA_DEFAULTS,
    ("deberta-v2-token", "p_tuning_v2"): PREFIX_ENCODER_WITHOUT_CACHE,
    ("deberta-v2-token", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("deberta-v2-token", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("deberta-v2-token", "prefix_tuning"): PREFIX_ENCODER_WITHOUT_CACHE,
    ("deberta-v2-token", "qlora"): NO_LORA_DEFAULTS,
    ("distilbert", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("distilbert", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("distilbert", "ia3"): NO_IA3_DEFAULTS,
    ("distilbert", "p_tuning_v2"): PREFIX_ENCODER_WITHOUT_CACHE,
    ("distilbert", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("distilbert", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("distilbert", "prefix_tuning"): PREFIX_ENCODER_WITHOUT_CACHE,
    ("distilbert-token", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("distilbert-token", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("distilbert-token", "ia3"): NO_IA3_DEFAULTS,
    ("distilbert-token", "p_tuning_v2"): PREFIX_ENCODER_WITHOUT_CACHE,
    ("distilbert-token", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("distilbert-token", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("distilbert-token", "prefix_tuning"): PREFIX_ENCODER_WITHOUT_CACHE,
    ("electra", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("electra", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("electra", "ia3"): NO_IA3_DEFAULTS,
    ("electra", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("electra", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("electra-token", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("electra-token", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("electra-token", "ia3"): NO_IA3_DEFAULTS,
    ("electra-token", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("electra-token", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("falcon", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("falcon", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("falcon", "ia3"): NO_IA3_DEFAULTS,
    ("falcon", "lora"): NO_LORA_DEFAULTS,
    ("falcon", "p_tuning_v2"): PREFIX_MULTI_QUERY,
    ("falcon", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("falcon", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("falcon", "prefix_tuning"): PREFIX_MULTI_QUERY,
    ("falcon", "qlora"): QUANTIZE_SKIPS_LINEAR_SUBCLASSES,
    ("falcon-new", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("falcon-new", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("falcon-new", "ia3"): NO_IA3_DEFAULTS,
    ("falcon-new", "lora"): NO_LORA_DEFAULTS,
    ("falcon-new", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("falcon-new", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("falcon-new", "qlora"): QUANTIZE_SKIPS_LINEAR_SUBCLASSES,
    ("gemma2", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("gemma2", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("gemma2", "ia3"): NO_IA3_DEFAULTS,
    ("gemma2", "lora"): NO_LORA_DEFAULTS,
    ("gemma2", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("gemma2", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("gemma2", "qlora"): NO_LORA_DEFAULTS,
    ("gemma3", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("gemma3", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("gemma3", "ia3"): NO_IA3_DEFAULTS,
    ("gemma3", "lora"): NO_LORA_DEFAULTS,
    ("gemma3", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("gemma3", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("gemma3", "qlora"): NO_LORA_DEFAULTS,
    ("gpt-j", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("gpt-j", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("gpt-j", "ia3"): NO_IA3_DEFAULTS,
    ("gpt-j", "lora"): NO_LORA_DEFAULTS,
    ("gpt-j", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("gpt-j", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("gpt-j", "qlora"): NO_LORA_DEFAULTS,
    ("gpt-neox", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("gpt-neox", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("gpt-neox", "ia3"): NO_IA3_DEFAULTS,
    ("gpt-neox", "lora"): NO_LORA_DEFAULTS,
    ("gpt-neox", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("gpt-neox", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("gpt-neox", "qlora"): NO_LORA_DEFAULTS,
    ("gpt2", "qlora"): QUANTIZE_REFUSES_CONV1D,
    ("modernbert", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("modernbert", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("modernbert", "ia3"): NO_IA3_DEFAULTS,
    ("modernbert", "lora"): NO_LORA_DEFAULTS,
    ("modernbert", "p_tuning_v2"): PREFIX_ENCODER_WITHOUT_CACHE,
    ("modernbert", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("modernbert", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("modernbert", "prefix_tuning"): PREFIX_ENCODER_WITHOUT_CACHE,
    ("modernbert", "qlora"): NO_LORA_DEFAULTS,
    ("modernbert-token", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("modernbert-token", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("modernbert-token", "ia3"): NO_IA3_DEFAULTS,
    ("modernbert-token", "lora"): NO_LORA_DEFAULTS,
    ("modernbert-token", "p_tuning_v2"): PREFIX_ENCODER_WITHOUT_CACHE,
    ("modernbert-token", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("modernbert-token", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("modernbert-token", "prefix_tuning"): PREFIX_ENCODER_WITHOUT_CACHE,
    ("modernbert-token", "qlora"): NO_LORA_DEFAULTS,
    ("mt5", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("mt5", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("mt5", "ia3"): NO_IA3_DEFAULTS,
    ("mt5", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("mt5", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("mt5", "qlora"): QUANTIZED_FP32_MODULES,
    ("opt", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("opt", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("opt", "ia3"): NO_IA3_DEFAULTS,
    ("opt", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("opt", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("phi3", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("phi3", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("phi3", "ia3"): NO_IA3_DEFAULTS,
    ("phi3", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("phi3", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("qwen3", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("qwen3", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("qwen3", "ia3"): NO_IA3_DEFAULTS,
    ("qwen3", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("qwen3", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("smollm3", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("smollm3", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("smollm3", "ia3"): NO_IA3_DEFAULTS,
    ("smollm3", "lora"): NO_LORA_DEFAULTS,
    ("smollm3", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("smollm3", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("smollm3", "qlora"): NO_LORA_DEFAULTS,
    ("t5", "qlora"): QUANTIZED_FP32_MODULES,
    ("t5-gated-gelu", "qlora"): QUANTIZED_FP32_MODULES,
    ("xlm-roberta", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("xlm-roberta", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("xlm-roberta", "ia3"): NO_IA3_DEFAULTS,
    ("xlm-roberta", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("xlm-roberta", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
    ("xlm-roberta-token", "fusion"): NO_BOTTLENECK_POSITIONS,
    ("xlm-roberta-token", "houlsby"): NO_BOTTLENECK_POSITIONS,
    ("xlm-roberta-token", "ia3"): NO_IA3_DEFAULTS,
    ("xlm-roberta-token", "parallel"): NO_BOTTLENECK_POSITIONS,
    ("xlm-roberta-token", "pfeiffer"): NO_BOTTLENECK_POSITIONS,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; on a shared machine two threads per op wait on each other
    (an LSTM step of P-tuning: 4 ms alone, 300 ms with two threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cells():
    for family in FAMILIES:
        for method in METHODS:
            fault = KNOWN_FAULTS.get((family, method))
            marks = [pytest.mark.xfail(strict=True, reason=fault)] if fault else []
            yield pytest.param(family, method, marks=marks, id=f"{family}-{method}")


@pytest.mark.parametrize(("family", "method"), _cells())
def test_cell(family, method, tmp_path):
    reason = EXPECTED_REFUSALS.get((family, method))
    if reason is not None:
        check_refused(family, method, reason)
    else:
        check_cell(family, method, tmp_path)


def test_tables_name_only_real_cells():
    for family, method in [*EXPECTED_REFUSALS, *KNOWN_FAULTS]:
        assert family in FAMILIES and method in METHODS, (family, method)
    assert not set(EXPECTED_REFUSALS) & set(KNOWN_FAULTS)


def test_docs_table_is_the_matrix():
    assert DOC.read_text() == render(EXPECTED_REFUSALS, KNOWN_FAULTS), (
        "docs/architecture_matrix.md is out of date: run `python -m tests.architecture_matrix`"
    )
