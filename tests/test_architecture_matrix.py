"""Every architecture users bring times every method and placement, with each method's default config.

A cell passes every check of ``tests.architecture_matrix.check_cell``, or it is refused on purpose when the
adapter is applied (EXPECTED_REFUSALS: a peftkit error naming the reason), or it fails today in a way being
fixed (KNOWN_FAULTS: a strict xfail, so a fixed cell fails until its entry is deleted). The user-facing table
docs/architecture_matrix.md is rendered from these tables: ``python -m tests.architecture_matrix_doc``.
"""

import pytest
import torch

from tests.architecture_matrix import METHODS, Refusal, check_cell, check_refused
from tests.architecture_matrix_doc import DOC, render
from tests.tiny_models import FAMILIES

# Why a cell is refused, and what to use instead: texts the peftkit error raised at apply time must contain.
NO_BIAS = Refusal("has no bias parameters", "use LoRA or IA3")  # LLaMA- and T5-style models
NO_BLOCK_LIST = Refusal(
    "shares one block's weights across all its layers", "name it with `block_lists`"
)  # ALBERT

# (family, method) -> why it is refused, on purpose, when the adapter is applied. One line each, sorted.
EXPECTED_REFUSALS: dict[tuple[str, str], Refusal] = {
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

# (family, method) -> the kind of fault; a strict xfail until fixed: delete the line then. One line each, sorted.
KNOWN_FAULTS: dict[tuple[str, str], str] = {}


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
        "docs/architecture_matrix.md is out of date: run `python -m tests.architecture_matrix_doc`"
    )
