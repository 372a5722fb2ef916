"""The default run's batches: length-grouped for every task, keeping each batch's label mix in sequence
classification; and evaluation that batches texts of similar length without changing any metric."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

from peftkit.data.batching import StepOrder
from peftkit.tasks import TASKS
from peftkit.training.config import TrainConfig
from peftkit.training.efficiency import batch_order, class_labels, groups_by_length
from tests import pipeline_fixtures as fx

TASK_NAMES = ("sequence-classification", "token-classification", "causal-lm", "seq2seq")


def _correlated(n=1024, seed=0):
    """Lengths that give the label away: label 1 texts are long, label 0 texts short (spam and ham)."""
    g = random.Random(seed)
    labels = [g.randrange(2) for _ in range(n)]
    lengths = [g.randint(40, 120) if y else g.randint(3, 40) for y in labels]
    return lengths, labels


def _batches(order: StepOrder):
    return [order.step_rows(step) for step in range(order.steps_per_epoch)]


def test_the_default_groups_by_length_for_every_task_and_null_keeps_its_recorded_rule():
    config = TrainConfig()
    assert config.group_by_length is True
    assert all(groups_by_length(config, task) for task in TASK_NAMES)
    recorded = SimpleNamespace(group_by_length=None)  # a run recorded before grouping was the default
    assert [groups_by_length(recorded, task) for task in TASK_NAMES] == [False, False, True, True]
    off = SimpleNamespace(group_by_length=False)
    assert not any(groups_by_length(off, task) for task in TASK_NAMES)


def test_plain_grouping_would_sort_labels_apart_where_length_gives_them_away():
    """The fault the label-keeping order exists for: sorted by length alone, most batches hold one label."""
    lengths, labels = _correlated()
    plain = StepOrder(size=1024, global_batch=16, seed=0, lengths=lengths, group_batches=8)
    one_label = [len({labels[i] for i in rows}) == 1 for rows in _batches(plain)]
    assert sum(one_label) > 0.7 * len(one_label)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouping_with_labels_keeps_every_batch_label_mix_and_still_groups_lengths(seed):
    lengths, labels = _correlated(seed=seed)
    kept = StepOrder(size=1024, global_batch=16, seed=seed, lengths=lengths, group_batches=8, labels=labels)
    epoch = kept.epoch(0)
    assert sorted(epoch) == list(range(1024))
    assert epoch == StepOrder(1024, 16, seed, lengths=list(lengths), group_batches=8, labels=labels).epoch(0)
    permutation = torch.randperm(1024, generator=torch.Generator().manual_seed(seed)).tolist()
    mega = 16 * 8
    batch_of = {i: step for step, rows in enumerate(_batches(kept)) for i in rows}
    for start in range(0, 1024, mega):  # each mega-batch's share of label 1, and its batches' counts
        group = permutation[start : start + mega]
        share = sum(labels[i] for i in group) / len(group)
        for step in {batch_of[i] for i in group}:
            rows = kept.step_rows(step)
            assert set(rows) <= set(group)
            assert abs(sum(labels[i] for i in rows) - share * 16) <= 1  # the group's mix, to one example
    # lengths still grouped within each label: a label's examples in one batch span a narrow band
    spans = []
    for rows in _batches(kept):
        for label in (0, 1):
            mine = [lengths[i] for i in rows if labels[i] == label]
            spans.append(max(mine) - min(mine) if mine else 0)
    assert sum(spans) / len(spans) < 0.2 * 40  # a random batch's labels span about 35 (label 0) and 75


def test_grouping_with_labels_pads_as_little_as_plain_grouping_when_length_does_not_give_labels_away():
    g = random.Random(3)
    lengths = [g.randint(3, 120) for _ in range(1024)]
    labels = [g.randrange(3) for _ in range(1024)]

    def padding(order):
        return sum(
            max(lengths[i] for i in rows) * len(rows) - sum(lengths[i] for i in rows)
            for rows in _batches(order)
        )

    plain = StepOrder(1024, 16, 0, lengths=lengths, group_batches=8)
    kept = StepOrder(1024, 16, 0, lengths=lengths, group_batches=8, labels=labels)
    shuffled = StepOrder(1024, 16, 0)
    assert padding(kept) < 0.25 * padding(shuffled)
    assert padding(kept) < 2.5 * padding(plain)


def test_labels_need_lengths_and_one_per_example():
    from peftkit.data import DataError

    with pytest.raises(DataError, match="labels"):
        StepOrder(size=8, global_batch=4, seed=0, labels=[0] * 8)
    with pytest.raises(DataError, match="labels"):
        StepOrder(size=8, global_batch=4, seed=0, lengths=[1] * 8, labels=[0] * 7)


def test_the_run_order_keeps_labels_only_where_records_have_one_class_each():
    tokenizer = fx.tokenizer()
    g = random.Random(0)
    texts = [" ".join(g.choices(fx.FILLER, k=g.randint(1, 12))) for _ in range(64)]
    sentences = [{"text": t, "label": i % 3} for i, t in enumerate(texts)]
    settings = SimpleNamespace(group_by_length=True, max_length=32, seed=0)
    order = batch_order(settings, TASKS["sequence-classification"], sentences, tokenizer, 8)
    assert order.labels == [r["label"] for r in sentences]
    assert order.lengths == [len(tokenizer(t)["input_ids"]) for t in texts]
    tagged = [{"tokens": t.split(), "tags": [0] * len(t.split())} for t in texts]
    assert batch_order(settings, TASKS["token-classification"], tagged, tokenizer, 8).labels is None
    assert class_labels([{"label": True}, {"label": 1}]) is None  # a flag is not a class
    off = SimpleNamespace(group_by_length=False, max_length=32, seed=0)
    assert batch_order(off, TASKS["sequence-classification"], sentences, tokenizer, 8).lengths is None


def _tiny(model_class, num_labels):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=num_labels,
    )  # fmt: skip
    return model_class(config).eval()


def test_sequence_classification_metrics_equal_those_of_each_text_alone_in_any_order():
    """Evaluation batches texts by length: the metrics must be those of each text scored alone, unpadded."""
    tokenizer, model = fx.tokenizer(), _tiny(BertForSequenceClassification, 3)
    g = random.Random(1)
    records = [
        {"text": " ".join(g.choices(fx.FILLER + fx.POSITIVE, k=g.randint(1, 20))), "label": g.randrange(3)}
        for _ in range(37)
    ]
    task = TASKS["sequence-classification"]
    got = task.evaluate(model, records, tokenizer, batch_size=8, max_length=32, label_names=["a", "b", "c"])
    alone = []
    with torch.no_grad():
        for r in records:
            batch = task.collate([r], tokenizer, 32)
            out = model(**batch)
            alone.append((out.logits.argmax(-1).item(), out.loss.item()))
    accuracy = sum(p == r["label"] for (p, _), r in zip(alone, records, strict=True)) / len(records)
    assert got["accuracy"] == pytest.approx(accuracy)
    assert got["loss"] == pytest.approx(sum(loss for _, loss in alone) / len(records), rel=1e-5)
    reversed_order = task.evaluate(
        model, records[::-1], tokenizer, batch_size=8, max_length=32, label_names=["a", "b", "c"]
    )
    assert reversed_order == pytest.approx(got, rel=1e-5)


def test_token_classification_metrics_do_not_depend_on_the_order():
    tokenizer, model = fx.tokenizer(), _tiny(BertForTokenClassification, 3)
    g = random.Random(2)
    records = []
    for _ in range(30):
        words = g.choices([*fx.FILLER, "paris", "london"], k=g.randint(1, 12))
        records.append({"tokens": words, "tags": [1 if w in ("paris", "london") else 0 for w in words]})
    task = TASKS["token-classification"]
    names = ["O", "B-LOC", "I-LOC"]
    got = task.evaluate(model, records, tokenizer, batch_size=4, max_length=32, label_names=names)
    one_by_one = task.evaluate(model, records, tokenizer, batch_size=1, max_length=32, label_names=names)
    assert got == pytest.approx(one_by_one, rel=1e-5)
    assert task.evaluate(model, records[::-1], tokenizer, batch_size=4, max_length=32, label_names=names) == (
        pytest.approx(got, rel=1e-5)
    )
