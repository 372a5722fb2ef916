"""docs/architecture_matrix.md, rendered from the matrix's tables: ``python -m tests.architecture_matrix_doc``
rewrites it; ``test_docs_table_is_the_matrix`` fails while the committed file differs."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.architecture_matrix import METHODS, pristine
from tests.tiny_models import FAMILIES

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture_matrix.md"
KINDS = {"encoder": "Encoders", "decoder": "Decoders", "seq2seq": "Encoder-decoders"}
PASSES, REFUSED, FAULT = "✓", "refused", "fault"


def render(refusals: dict[tuple[str, str], str], faults: dict[tuple[str, str], str]) -> str:
    """docs/architecture_matrix.md from the matrix's tables: one row per family, one column per method."""
    lines = [
        "# What runs on your model",
        "",
        "Generated from `tests/test_architecture_matrix.py` by `python -m tests.architecture_matrix_doc`; the test",
        "`test_docs_table_is_the_matrix` keeps the two equal. Each cell is a tiny model of the family (random",
        "weights, transformers' own classes) with the method's **default** config, and passes every check:",
        "the adapter applies; a training step changes only the adapter and every trainable tensor gets a",
        "gradient; a fresh adapter is the identity where the method promises it; `disable_adapter()` is the",
        "base exactly; merging gives the unmerged outputs (methods that merge); save then load is exact; the",
        "trained adapter moves the output; for decoders a left-padded row equals the row alone and",
        "`generate()` equals greedy decoding by hand; LoRA, QLoRA and IA3 files load in Hugging Face PEFT",
        "with the same logits. On a bf16, fp16 or 4-bit base the adapters are fp32 (half-precision updates",
        "of a learning-rate-sized step mostly round away), and unmerging restores the base's exact bits.",
        "A prompt ensemble's `generate()` is refused with a message (the average of k prompts' logits has no",
        "single next token to feed back); its forward pass averages them.",
        "",
        f"{PASSES}: passes every check. {REFUSED}: refused when applied, with a peftkit `ConfigError` that",
        f"names the reason (listed below) and what to use instead. {FAULT}: a known fault being fixed (below).",
        "",
    ]
    header = ["family", "model class", *(m.label for m in METHODS.values())]
    for kind, title in KINDS.items():
        lines += [f"## {title}", "", _row(header), _row(["---"] * len(header))]
        for family, tiny in FAMILIES.items():
            if tiny.kind == kind:
                cells = [_mark((family, m), refusals, faults) for m in METHODS]
                lines.append(_row([f"`{family}`", f"`{type(pristine(family)).__name__}`", *cells]))
        lines.append("")
    lines += _grouped("Refused on purpose, and why", refusals)
    lines += _grouped("Known faults (being fixed)", faults)
    return "\n".join(lines).rstrip("\n") + "\n"


def _mark(cell: tuple[str, str], refusals: dict, faults: dict) -> str:
    return REFUSED if cell in refusals else FAULT if cell in faults else PASSES


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _grouped(title: str, table: dict[tuple[str, str], str]) -> list[str]:
    """One line per (method, reason) with the families it concerns."""
    if not table:
        return [f"## {title}", "", "None.", ""]
    groups: dict[tuple[str, str], list[str]] = {}
    for (family, method), reason in table.items():
        groups.setdefault((method, reason), []).append(family)
    lines = [f"## {title}", ""]
    for (method, reason), families in sorted(
        groups.items(), key=lambda g: (list(METHODS).index(g[0][0]), g[0][1])
    ):
        names = ", ".join(f"`{f}`" for f in sorted(families, key=list(FAMILIES).index))
        lines.append(f"- **{METHODS[method].label}** on {names}: {reason}")
    return [*lines, ""]


if __name__ == "__main__":
    from tests.test_architecture_matrix import EXPECTED_REFUSALS, KNOWN_FAULTS

    DOC.write_text(render(EXPECTED_REFUSALS, KNOWN_FAULTS))
    sys.stdout.write(f"wrote {DOC}\n")
