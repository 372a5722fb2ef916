"""The end-to-end LoRA demo: a tiny BERT-style classifier, trained with LoRA on a synthetic task.

Everything is built locally (random-weight model from a config, generated data), so it runs anywhere in
well under a minute. It walks the whole lifecycle a user meets: apply LoRA, train only the adapter and the
new head, evaluate, save in the Hugging Face PEFT format, reload, merge for zero-latency inference, and run
two adapters in one mixed batch.

The task: a sequence of tokens is labelled 1 when most of its tokens come from the upper half of the
vocabulary. A frozen random encoder cannot solve it without adaptation (accuracy starts near chance).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import BertConfig, BertForSequenceClassification

from peftkit.accounting import format_bytes
from peftkit.checkpoint import WEIGHTS_NAME
from peftkit.methods.lora import LoraConfig
from peftkit.model import PeftModel, get_peft_model

VOCAB, SEQ = 128, 16


@dataclass(frozen=True)
class DemoResult:
    accuracy_before: float
    accuracy_after: float
    trainable: int
    base: int
    adapter_file_bytes: int
    reload_max_diff: float
    merge_max_diff: float
    mixed_batch_max_diff: float
    seconds: float


def build_model(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=SEQ,
        num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


def make_data(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (count, SEQ), generator=generator)  # (count, seq)
    labels = ((tokens >= VOCAB // 2).sum(dim=1) > SEQ // 2).long()  # majority from the upper half
    return tokens, labels


@torch.no_grad()
def accuracy(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return (model(input_ids=tokens).logits.argmax(-1) == labels).float().mean().item()


def run_demo(output_dir: str | Path, steps: int = 600, seed: int = 0, log=print) -> DemoResult:
    """LoRA end to end on a tiny BERT-style classifier built locally (no download): train ``steps`` steps,
    save into ``output_dir``, reload, mix adapters in one batch, merge; each step checked and logged.
    Times in seconds, sizes in bytes. LoRA: Hu et al. 2021 (arXiv:2106.09685)."""
    start = time.perf_counter()
    output_dir = Path(output_dir)
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = make_data(4096, generator)
    test_x, test_y = make_data(1024, generator)

    config = LoraConfig(
        r=8, alpha=16, dropout=0.05, target_modules="all-linear", modules_to_save=["classifier"]
    )
    model = get_peft_model(build_model(seed), config)
    count = model.trainable_parameters()
    log(f"LoRA on a tiny BERT-style classifier: {count.summary()}")
    accuracy_before = accuracy(model, test_x, test_y)

    _train(model, train_x, train_y, steps, generator)
    accuracy_after = accuracy(model, test_x, test_y)
    log(f"test accuracy: {accuracy_before:.3f} before -> {accuracy_after:.3f} after training the adapter")

    model.save_pretrained(output_dir)
    file_bytes = (output_dir / WEIGHTS_NAME).stat().st_size
    log(f"saved the adapter to {output_dir} ({format_bytes(file_bytes)}; the base model is not in it)")

    reload_diff, mixed_diff, merge_diff = _round_trips(model, output_dir, test_x, seed, log)

    return DemoResult(
        accuracy_before=accuracy_before,
        accuracy_after=accuracy_after,
        trainable=count.trainable,
        base=count.base,
        adapter_file_bytes=file_bytes,
        reload_max_diff=reload_diff,
        merge_max_diff=merge_diff,
        mixed_batch_max_diff=mixed_diff,
        seconds=time.perf_counter() - start,
    )


def _train(model: PeftModel, tokens: torch.Tensor, labels: torch.Tensor, steps: int, generator) -> None:
    """``steps`` AdamW steps on random batches of 64 rows drawn with ``generator``."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    progress = tqdm(range(steps), desc="training", unit="step", mininterval=0.5)
    for step in progress:
        rows = torch.randint(0, len(tokens), (64,), generator=generator)
        loss = model(input_ids=tokens[rows], labels=labels[rows]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}")


@torch.no_grad()
def _round_trips(
    model: PeftModel, output_dir: Path, test_x: torch.Tensor, seed: int, log
) -> tuple[float, float, float]:
    """Max |logit difference| after reloading the saved adapter onto a fresh base, in a mixed batch (one
    adapter per row) against each adapter alone, and after merging into a plain model."""
    expected = model(input_ids=test_x).logits
    reloaded = PeftModel.from_pretrained(build_model(seed), output_dir)
    reload_diff = (reloaded(input_ids=test_x).logits - expected).abs().max().item()
    log(f"reloaded onto a fresh base model: max |logit difference| = {reload_diff:.2e}")

    # a second adapter that starts at zero: its rows give the base model's answer
    reloaded.add_adapter("fresh", LoraConfig(r=4, target_modules=["query", "value"]))
    rows = ["default", "fresh"] * 4
    mixed = reloaded(input_ids=test_x[:8], adapter_names=rows).logits
    with reloaded.disable_adapter():
        base_logits = reloaded(input_ids=test_x[:8]).logits
    reference = torch.where(torch.tensor([r == "default" for r in rows])[:, None], expected[:8], base_logits)
    mixed_diff = (mixed - reference).abs().max().item()
    log(f"mixed batch, one adapter per row: max |difference| from each adapter alone = {mixed_diff:.2e}")

    reloaded.delete_adapter("fresh")
    merged = reloaded.merge_and_unload()
    merge_diff = (merged(input_ids=test_x).logits - expected).abs().max().item()
    log(f"merged into a plain {type(merged).__name__}: max |logit difference| = {merge_diff:.2e}")
    return reload_diff, mixed_diff, merge_diff
