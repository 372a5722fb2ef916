"""`max_length`: chosen from the training data unless given (99th percentile, rounded up to 8, capped), and
a run says which share of the training examples its length cuts."""

from __future__ import annotations

import math

import pytest
import yaml

from peftkit.tasks import TASKS
from peftkit.training import lengths
from peftkit.training.config import TrainConfig
from peftkit.training.lengths import CEILING, choose_max_length, model_positions, token_lengths
from peftkit.training.run import TrainingRun
from tests import pipeline_fixtures as fx


def test_the_rule_on_known_lengths():
    measured = list(range(1, 101))  # 1 .. 100 tokens: the 99th percentile (nearest rank) is 99
    choice = choose_max_length(None, measured)
    assert (choice.max_length, choice.percentile_length, choice.cut_share) == (104, 99, 0.0)
    assert choice.chosen and "99th percentile of 100 training examples" in choice.message()
    capped = choose_max_length(None, measured, positions=64, reserved=20)  # 44 positions left for the text
    assert (capped.max_length, capped.cap, capped.cut_share) == (44, 44, 0.56)
    assert "56.0% of the training examples are cut" in capped.message()
    assert choose_max_length(None, [5000] * 10).max_length == CEILING


def test_a_given_length_is_kept_and_warns_only_when_it_cuts():
    measured = [10] * 90 + [60] * 10
    given = choose_max_length(48, measured)
    assert (given.max_length, given.chosen, given.cut_share) == (48, False, 0.1)
    assert given.message().startswith("warning: --max-length 48 cuts 10.0% of the training examples")
    assert choose_max_length(64, measured).message() is None


def test_model_positions_read_the_architectures_names():
    class Bert:
        max_position_embeddings = 512

    class Gpt2:
        n_positions = 1024

    class T5:
        pass

    assert [model_positions(c) for c in (Bert, Gpt2, T5)] == [512, 1024, None]


def test_token_lengths_are_the_tasks_own_layout():
    tokenizer = fx.tokenizer()
    texts = [{"text": "a good film", "label": 0}, {"text": "bad " * 40, "label": 1}]
    assert token_lengths(TASKS["sequence-classification"], texts, tokenizer) == [
        len(tokenizer(r["text"])["input_ids"]) for r in texts
    ]
    tokenizer.eos_token = tokenizer.sep_token
    qa = [{"prompt": "is it good", "response": "yes it is"}]
    prompt = TASKS["causal-lm"].collate(qa, tokenizer, 10**6)["attention_mask"].sum().item()
    assert token_lengths(TASKS["causal-lm"], qa, tokenizer) == [prompt]
    pairs = [{"source": "one two", "target": "three four five six seven"}]
    target = len(tokenizer(text_target=pairs[0]["target"])["input_ids"])
    assert token_lengths(TASKS["seq2seq"], pairs, tokenizer) == [target]  # the longer of the two


def _prepare(tmp_path, **settings):
    said = []
    config = TrainConfig.from_dict(
        dict(model=str(fx.tiny_bert(tmp_path / "bert")), dataset=str(fx.sentiment_csv(tmp_path / "s.csv")),
             task="sequence-classification", columns={"text": "review", "label": "sentiment"}, max_steps=2,
             output_dir=str(tmp_path / "run"), **settings)
    )  # fmt: skip
    return TrainingRun.prepare(config, log=said.append), said


def test_a_run_without_max_length_chooses_it_from_its_data_and_saves_it(tmp_path):
    run, said = _prepare(tmp_path)
    measured = token_lengths(run.task, run.splits.train, run.tokenizer)
    percentile = sorted(measured)[math.ceil(0.99 * len(measured)) - 1]
    assert run.config.max_length == 8 * math.ceil(percentile / 8)
    assert any(line.startswith(f"max length {run.config.max_length} tokens") for line in said)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["max_length"] == run.config.max_length  # eval, predict and --resume use the same


def test_a_run_whose_max_length_cuts_says_how_much(tmp_path):
    run, said = _prepare(tmp_path, max_length=6)
    share = sum(n > 6 for n in token_lengths(run.task, run.splits.train, run.tokenizer)) / len(
        run.splits.train
    )
    assert share > 0.5
    assert f"warning: --max-length 6 cuts {share:.1%} of the training examples" in "\n".join(said)


def test_prompt_methods_leave_room_for_their_virtual_tokens(tmp_path, monkeypatch):
    monkeypatch.setattr(lengths, "token_lengths", lambda task, records, tokenizer: [1000] * len(records))
    run, said = _prepare(tmp_path, method="prompt_tuning", num_virtual_tokens=20)
    assert run.config.max_length == 64 - 20  # tiny_bert embeds 64 positions; the prompt takes 20
    assert "at most 44" in "\n".join(said)


@pytest.mark.parametrize("value", [0, -3, 2.5, "long"])
def test_bad_max_length_is_refused(value):
    with pytest.raises(ValueError, match="max_length"):
        TrainConfig.from_dict({"max_length": value})


def test_a_resumed_run_keeps_the_length_its_data_gave_it(tmp_path):
    from peftkit.training.loop import train

    run, _ = _prepare(tmp_path, save_every=1)
    run.fit()
    run.finish()
    chosen = run.config.max_length
    again = dict(run.config.to_dict(), max_length=None, max_steps=3, resume=True)  # as `--resume` gives it
    result = train(TrainConfig.from_dict(again), log=lambda *_: None)
    assert result.steps == 3
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["max_length"] == chosen
