"""A freshly initialised task head trains at its own learning rate (`--head-learning-rate`), in optimizer
groups of its own, for every method; and bitsandbytes' optional-kernel warning stays out of the output."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from peftkit import get_peft_model
from peftkit.cli.main import build_parser
from peftkit.cli.train import config_from_args
from peftkit.method_spec import method_spec
from peftkit.training.config import HEAD_LEARNING_RATE, TrainConfig
from peftkit.training.optim import build_optimizer, head_parameters
from peftkit.training.run import TrainingRun
from tests import pipeline_fixtures as fx

BODY_RATE, HEAD_RATE = 1e-4, 1e-1
METHODS = ["lora", "full", "ia3", "bitfit", "bottleneck", "layer_tuning", "prompt_tuning", "p_tuning_v2"]


def _tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertForSequenceClassification(config)


@pytest.mark.parametrize("method", METHODS)
def test_the_first_adam_step_moves_the_head_by_its_rate_and_the_rest_by_theirs(method):
    """Adam's first step moves every entry with a real gradient by lr · g / (|g| + eps) ~ lr: the head's
    entries by HEAD_RATE, every other trained entry by at most BODY_RATE."""
    base = _tiny_bert()
    spec = method_spec(method)
    model = get_peft_model(base, spec.build(spec.defaults(), ["classifier"]))
    head = head_parameters(base, ["classifier"])
    trained = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in head} & {id(p) for p in trained}  # the head trains, under every method
    optimizer = build_optimizer(model, BODY_RATE, 0.0, head, HEAD_RATE)
    before = {id(p): p.detach().clone() for p in trained}
    ids = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(1))
    model.train()
    model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    optimizer.step()
    head_ids = {id(p) for p in head}
    for p in trained:
        moved = (p.detach() - before[id(p)]).abs().max().item()
        rate = HEAD_RATE if id(p) in head_ids else BODY_RATE
        assert moved <= rate + 1e-6  # (float32 rounding of weights near 1)
        if id(p) in head_ids:
            assert moved == pytest.approx(HEAD_RATE, abs=1e-5)


def test_without_a_head_rate_there_is_one_rate():
    base = _tiny_bert()
    spec = method_spec("lora")
    model = get_peft_model(base, spec.build(spec.defaults(), ["classifier"]))
    optimizer = build_optimizer(model, BODY_RATE, 0.01, head_parameters(base, ["classifier"]))
    assert {g["lr"] for g in optimizer.param_groups} == {BODY_RATE}
    decays = {g["weight_decay"] for g in optimizer.param_groups}
    assert decays == {0.0, 0.01}  # matrices decay, biases do not, in the head's groups too


def test_head_rate_from_flag_yaml_and_default(tmp_path):
    parse = lambda *flags: config_from_args(build_parser(["train"]).parse_args(["train", *flags]))  # noqa: E731
    assert parse("--head-learning-rate", "3e-3").head_learning_rate == 3e-3
    assert parse("--learning-rate", "1e-4").head_learning_rate == HEAD_LEARNING_RATE  # whatever the rate
    settings = tmp_path / "run.yaml"
    settings.write_text("head_learning_rate: 5e-3\n")  # YAML 1.1 reads this as a string: parsed here
    assert TrainConfig.from_sources(settings).head_learning_rate == 5e-3
    for method in METHODS:  # one default for every method: the head is the same random layer
        assert TrainConfig(method=method).head_learning_rate == HEAD_LEARNING_RATE
    with pytest.raises(ValueError, match="head_learning_rate"):
        TrainConfig.from_dict({"head_learning_rate": 0})


def test_a_training_run_gives_its_head_the_head_rate(tmp_path):
    config = TrainConfig.from_dict(
        dict(model=str(fx.tiny_bert(tmp_path / "bert")), dataset=str(fx.sentiment_csv(tmp_path / "s.csv")),
             task="sequence-classification", columns={"text": "review", "label": "sentiment"}, learning_rate=1e-3, head_learning_rate=2e-2, max_steps=2,
             output_dir=str(tmp_path / "run"))
    )  # fmt: skip
    run = TrainingRun.prepare(config, log=lambda *_: None)
    head = {id(p) for p in run.model.base_model.classifier.parameters() if p.requires_grad}
    assert len(head) == 2  # the trained copy's weight and bias
    for group in run.optimizer.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1  # a group is all head or all adapter
        peak = 2e-2 if in_head == {True} else 1e-3
        assert group["lr"] == pytest.approx(peak * run.scheduler.get_last_lr()[0] / 1e-3)  # (warm-up factor)


@pytest.mark.slow  # a fresh interpreter importing torch, transformers and bitsandbytes
def test_bitsandbytes_import_keeps_its_optional_kernel_warning_to_itself():
    code = (
        "import logging, torch\n"
        "from peftkit.quantization import QuantizationConfig, quantize_model\n"
        "model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 2))\n"
        "quantize_model(model, QuantizationConfig(target_modules=['0']))\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('other bitsandbytes warnings pass')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "kernels-community" not in done.stderr + done.stdout
    assert "other bitsandbytes warnings pass" in done.stderr
