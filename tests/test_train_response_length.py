"""A causal LM is scored on the response only: a ``max_length`` that ends within most examples' prompts is
refused before the first step (naming the length that keeps them), one that does so for fewer warns,
and a micro-batch of only such rows gives loss 0 (zero gradients), never the NaN of a mean over no token."""

from __future__ import annotations

import json
import re

import pytest
import torch

from peftkit.cli.main import main
from peftkit.config import ConfigError
from peftkit.tasks import TASKS
from peftkit.training.config import TrainConfig
from peftkit.training.divergence import diverged, loss_problem
from peftkit.training.lengths import check_responses, response_needs
from peftkit.training.loop import train
from peftkit.training.run import TrainingRun
from tests import pipeline_fixtures as fx

SHORT = "is it good"
LONG = "tell me please whether the following long sentence about a film is good or bad in your view"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    data = root / "qa.jsonl"
    with data.open("w") as handle:  # one example in four has a long prompt
        for i in range(40):
            handle.write(
                json.dumps({"prompt": LONG if i % 4 == 0 else SHORT, "response": "yes it is"}) + "\n"
            )
    return {"llama": fx.tiny_llama(root / "llama"), "data": data}


def _settings(assets, out, **overrides):
    values = dict(
        model=str(assets["llama"]),
        dataset=str(assets["data"]),
        task="causal-lm",
        max_steps=2,
        batch_size=4,
        dropout=0.0,
        eval_every=2,
        save_every=2,
        eval_limit=8,
        output_dir=str(out),
    )
    return {**values, **overrides}  # fmt: skip


def _need(tokenizer, prompt):
    record = {"prompt": prompt, "response": "yes it is"}
    return response_needs(TASKS["causal-lm"], [record], tokenizer)[0]


def test_the_need_is_the_shortest_length_that_scores_a_response_token(assets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets["llama"])
    task = TASKS["causal-lm"]
    for prompt in (SHORT, LONG):
        need = _need(tokenizer, prompt)
        record = [{"prompt": prompt, "response": "yes it is"}]
        scored = [
            int((task.collate(record, tokenizer, n)["labels"][:, 1:] != -100).sum()) for n in (need - 1, need)
        ]
        assert scored == [0, 1]
    assert response_needs(TASKS["seq2seq"], [{"source": "a b", "target": "c"}], tokenizer) == []


def test_check_responses_refuses_all_warns_some_and_passes_none():
    with pytest.raises(ConfigError, match=r"no response token .* for all 3 .*--max-length 9 or more"):
        check_responses(4, [5, 9, 6])
    assert check_responses(6, [5, 9, 6]).startswith(
        "warning: --max-length 6 leaves no response token to train on for 33.3% of the training examples"
    )
    with pytest.raises(ConfigError, match=r"for 66.7% of the training examples .*--max-length 9 or more"):
        check_responses(5, [5, 9, 6])  # most would train on nothing
    assert check_responses(9, [5, 9, 6]) is None


def test_a_length_within_every_prompt_is_refused_before_training(assets, tmp_path, capsys):
    flags = ["--model", str(assets["llama"]), "--dataset", str(assets["data"]), "--task", "causal-lm",
             "--max-steps", "2", "--batch-size", "2", "--max-length", "3", "--output-dir", str(tmp_path / "r")]  # fmt: skip
    assert main(["train", *flags]) == 2
    error = capsys.readouterr().err
    assert re.search(
        r"peftkit train: error: --max-length 3 leaves no response token to train on for all \d+ of", error
    )
    assert not (tmp_path / "r" / "adapter").exists()


def test_a_length_within_some_prompts_warns_and_trains_with_finite_losses(assets, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets["llama"])
    short, long = _need(tokenizer, SHORT), _need(tokenizer, LONG)
    said = []
    result = train(
        TrainConfig.from_dict(_settings(assets, tmp_path / "r", max_length=short)), log=said.append
    )
    share = re.search(
        r"no response token to train on for ([\d.]+)% of the training examples", "\n".join(said)
    )
    assert share and 10 < float(share.group(1)) < 40  # the long prompts: one in four of the data
    assert f"--max-length {long} or more keeps a response token of every one" in "\n".join(said)
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.loss_curve)


def test_a_micro_batch_with_no_scored_token_has_loss_zero_and_zero_gradients(assets, tmp_path):
    run = TrainingRun.prepare(TrainConfig.from_dict(_settings(assets, tmp_path / "r", max_length=16)))
    long_rows = [r for r in run.splits.train if r["prompt"] == LONG][:2]
    batch = run.task.collate(long_rows, run.tokenizer, 16)
    assert int((batch["labels"][:, 1:] != -100).sum()) == 0  # the model's own loss would be 0/0 = NaN
    loss = run.loss(batch)
    loss.backward()
    assert loss.item() == 0.0
    trained = [p for p in run.model.parameters() if p.requires_grad]
    assert all(p.grad is not None and not p.grad.any() for p in trained)
    evaluated = run.task.evaluate(run.model, long_rows + run.splits.train[:0], run.tokenizer, batch_size=2,
                                  max_length=16, label_names=None)  # fmt: skip
    assert evaluated["loss"] == 0.0  # no token scored: nothing added, never NaN


def test_a_non_finite_loss_at_step_one_does_not_blame_the_learning_rate():
    first = str(diverged(loss_problem(float("nan")), 1, 2e-4, "no checkpoint had been written yet"))
    assert "before any update, so not because of the learning rate" in first and "--max-length" in first
    assert "lower --learning-rate" not in first
    later = str(diverged(loss_problem(float("nan")), 3, 2e-4, "kept"))
    assert "training diverged at step 3" in later and "lower --learning-rate" in later
