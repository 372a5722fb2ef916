"""Length-grouped step order (deterministic, resumable, less padding) and packing (per-example losses equal
those of each example alone, on a tiny LLaMA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from peftkit import LoraConfig, get_peft_model
from peftkit.data import DataError
from peftkit.data.batching import StepOrder, pack_batch, pack_rows
from peftkit.losses import shift_labels
from peftkit.losses.language_model import fused_training_loss
from tests.tiny_models import TINY_GQA_DECODER, VOCAB


def _lengths(n=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 120, (n,), generator=g).tolist()


def test_without_lengths_it_is_the_seeded_permutation_used_so_far():
    order = StepOrder(size=103, global_batch=8, seed=7)
    for epoch in range(2):
        want = torch.randperm(103, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        assert order.epoch(epoch) == want
    assert order.step_rows(12 + 3) == want[3 * 8 : 4 * 8]  # step 15 is epoch 1, position 3


def test_grouped_epochs_are_permutations_deterministic_and_seed_dependent():
    lengths = _lengths()
    order = StepOrder(size=500, global_batch=16, seed=3, lengths=lengths, group_batches=4)
    first = order.epoch(0)
    assert sorted(first) == list(range(500))
    assert first == StepOrder(size=500, global_batch=16, seed=3, lengths=lengths, group_batches=4).epoch(0)
    assert first != order.epoch(1)
    assert first != StepOrder(size=500, global_batch=16, seed=4, lengths=lengths, group_batches=4).epoch(0)


def _padding(order: StepOrder, lengths, steps):
    padded = 0
    for step in range(steps):
        rows = [lengths[i] for i in order.step_rows(step)]
        padded += max(rows) * len(rows) - sum(rows)
    return padded


def test_grouping_cuts_padding_and_keeps_batches_shuffled():
    lengths = _lengths()
    steps = 500 // 16
    grouped = StepOrder(size=500, global_batch=16, seed=0, lengths=lengths, group_batches=8)
    plain = StepOrder(size=500, global_batch=16, seed=0)
    assert _padding(grouped, lengths, steps) < 0.25 * _padding(plain, lengths, steps)
    longest = [max(lengths[i] for i in grouped.step_rows(s)) for s in range(steps)]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)  # not one long sweep


def test_resuming_at_any_step_gives_the_same_examples():
    lengths = _lengths()
    run = StepOrder(size=500, global_batch=16, seed=1, lengths=lengths)
    straight = [run.step_rows(s) for s in range(70)]  # over two epochs
    resumed = StepOrder(size=500, global_batch=16, seed=1, lengths=list(lengths))
    assert [resumed.step_rows(s) for s in range(40, 70)] == straight[40:]
    seen = [i for rows in straight[: run.steps_per_epoch] for i in rows]
    assert len(set(seen)) == len(seen)  # no example twice within an epoch


def test_bad_orders_are_refused():
    with pytest.raises(DataError, match="fewer than one batch"):
        StepOrder(size=3, global_batch=4, seed=0)
    with pytest.raises(DataError, match="lengths"):
        StepOrder(size=8, global_batch=4, seed=0, lengths=[1, 2])


def test_pack_rows_fills_rows_within_capacity():
    lengths = _lengths(60)
    rows = pack_rows(lengths, 200)
    assert sorted(i for r in rows for i in r) == list(range(60))
    assert all(sum(lengths[i] for i in r) <= 200 for r in rows)
    assert len(rows) < 0.6 * 60 and len(rows) >= sum(lengths) / 200
    with pytest.raises(DataError, match="more than a row of 50"):
        pack_rows([10, 60], 50)


# --- packing inside a model --------------------------------------------------------------------------------


ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def _base(model_type="llama"):
    torch.manual_seed(0)
    config_class, model_class = ARCHITECTURES[model_type]
    return model_class(config_class(**TINY_GQA_DECODER))


def _model(model_type="llama"):
    return get_peft_model(_base(model_type), LoraConfig(r=4, target_modules="all-linear", init="random"))


def _examples(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, prompt in [(9, 3), (4, 1), (12, 5), (6, 2), (3, 1)]:
        ids = torch.randint(1, VOCAB, (n,), generator=g)
        labels = ids.clone()
        labels[:prompt] = -100
        out.append((ids, labels))
    return out


def _padded(examples, pad=0):
    width = max(len(ids) for ids, _ in examples)
    batch = {
        "input_ids": torch.full((len(examples), width), pad),
        "attention_mask": torch.zeros(len(examples), width, dtype=torch.long),
        "labels": torch.full((len(examples), width), -100),
    }
    for r, (ids, labels) in enumerate(examples):
        batch["input_ids"][r, : len(ids)] = ids
        batch["attention_mask"][r, : len(ids)] = 1
        batch["labels"][r, : len(ids)] = labels
    return batch


def _token_losses(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    targets = shift_labels(batch["labels"])
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none"), targets  # (rows, seq)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_packed_rows_give_each_example_the_loss_it_has_alone(model_type):
    from peftkit.training.efficiency import PACKING_MODEL_TYPES

    assert sorted(PACKING_MODEL_TYPES) == sorted(ARCHITECTURES)  # every one packing allows is checked here
    model = _model(model_type).eval()
    examples = _examples()
    packed = pack_batch(_padded(examples), capacity=16, pad_token_id=0)
    assert packed["input_ids"].shape[0] < len(examples)  # several examples share a row
    lengths = [len(ids) for ids, _ in examples]
    with torch.no_grad():
        losses, _ = _token_losses(model, packed)
        for r, row in enumerate(pack_rows(lengths, 16)):
            at = 0
            for i in row:
                alone, _ = _token_losses(model, _padded([examples[i]]))
                n = lengths[i]
                torch.testing.assert_close(losses[r, at : at + n], alone[0, :n], rtol=1e-5, atol=1e-6)
                at += n


@pytest.mark.parametrize("fused", [False, True])
def test_packed_batch_loss_and_gradients_equal_the_padded_batch(fused):
    model = _model().train()
    padded = _padded(_examples(1))
    packed = pack_batch(padded, capacity=20, pad_token_id=0)
    results = []
    for batch in (padded, packed):
        model.zero_grad(set_to_none=True)
        loss = fused_training_loss(model, model, batch) if fused else model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_batch_runs_under_bf16_autocast():
    model = _model().train()
    padded = _padded(_examples(2))
    packed = pack_batch(padded, capacity=20, pad_token_id=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = model(**padded).loss, model(**packed).loss
    torch.testing.assert_close(b, a, rtol=3e-2, atol=3e-2)


# --- the run's choices (peftkit.training.efficiency) --------------------------------------------------------


def _settings(**overrides):
    from types import SimpleNamespace

    values = {"group_by_length": None, "max_length": 32, "seed": 0, "fused_loss": True, "packing": False}
    return SimpleNamespace(**{**values, **overrides})


class _Tokenizer:
    pad_token_id = 0


def test_length_grouping_is_on_by_default_only_for_generation_tasks():
    from peftkit.training.efficiency import groups_by_length

    assert groups_by_length(_settings(), "causal-lm") and groups_by_length(_settings(), "seq2seq")
    assert not groups_by_length(_settings(), "sequence-classification")
    assert groups_by_length(_settings(group_by_length=True), "sequence-classification")
    assert not groups_by_length(_settings(group_by_length=False), "causal-lm")


def test_batch_order_measures_lengths_with_the_tasks_collate():
    from peftkit.training.efficiency import batch_order

    class Task:
        name = "causal-lm"

        def collate(self, records, tokenizer, max_length):
            width = max(len(r["ids"]) for r in records)
            mask = torch.tensor([[1] * len(r["ids"]) + [0] * (width - len(r["ids"])) for r in records])
            return {"input_ids": mask, "attention_mask": mask, "labels": mask}

    records = [{"ids": [1] * n} for n in _lengths(300)]
    order = batch_order(_settings(), Task(), records, _Tokenizer(), 8)
    assert order.lengths == [len(r["ids"]) for r in records]
    Task.name = "sequence-classification"
    assert batch_order(_settings(), Task(), records, _Tokenizer(), 8).lengths is None


def test_loss_function_is_fused_where_exact_and_falls_back_with_a_message():
    from peftkit import PromptTuningConfig
    from peftkit.training.efficiency import loss_function

    model = _model().train()
    batch = _padded(_examples(3))
    said = []
    fused = loss_function(_settings(), "causal-lm", model, model, _Tokenizer(), said.append)
    ordinary = loss_function(
        _settings(fused_loss=False), "causal-lm", model, model, _Tokenizer(), said.append
    )
    torch.testing.assert_close(fused(batch), ordinary(batch), rtol=1e-5, atol=1e-6)
    assert said == []
    prompted = get_peft_model(_base(), PromptTuningConfig(num_virtual_tokens=2))
    loss_function(_settings(), "causal-lm", prompted, prompted, _Tokenizer(), said.append)
    assert len(said) == 1 and "fused loss off" in said[0]


def test_packing_in_the_loss_function_keeps_the_loss_and_is_refused_where_not_exact():
    from peftkit import PromptTuningConfig
    from peftkit.config import ConfigError
    from peftkit.training.efficiency import loss_function

    model = _model().train()
    batch = _padded(_examples(4))
    packed = loss_function(_settings(packing=True), "causal-lm", model, model, _Tokenizer(), print)
    torch.testing.assert_close(packed(batch), model(**batch).loss, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="causal-lm"):
        loss_function(_settings(packing=True), "seq2seq", model, model, _Tokenizer(), print)
    prompted = get_peft_model(_base(), PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ConfigError, match="prompt_tuning"):
        loss_function(_settings(packing=True), "causal-lm", prompted, prompted, _Tokenizer(), print)
