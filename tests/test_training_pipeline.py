"""`peftkit train` end to end on tiny models: learning, resume after SIGKILL, two processes, eval/predict."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from peftkit.cli.main import main
from peftkit.config import ConfigError
from peftkit.training.config import TrainConfig
from peftkit.training.loop import train
from tests import pipeline_fixtures as fx

PEFTKIT = [sys.executable, "-m", "peftkit.cli.main"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {
        "bert": fx.tiny_bert(root / "bert"),
        "sentiment": fx.sentiment_csv(root / "reviews.csv"),
    }


def _classification(assets, out, **overrides):
    settings = dict(
        model=str(assets["bert"]),
        dataset=str(assets["sentiment"]),
        task="sequence-classification",
        columns={"text": "review", "label": "sentiment"},
        limit=None,
        max_steps=40,
        batch_size=8,
        learning_rate=1e-2,
        target_modules="all-linear",
        eval_every=20,
        save_every=20,
        dropout=0.0,
        output_dir=str(out),
        max_length=16,
    )
    settings.update(overrides)
    return TrainConfig.from_sources(None, settings)


def _adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_training_learns_and_writes_the_run(assets, tmp_path):
    result = train(_classification(assets, tmp_path / "run"), log=lambda *_: None)
    assert result.test_metrics["accuracy"] > 0.85  # chance is 0.5
    entries = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in entries if e["kind"] == "train"]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert [e["step"] for e in entries if e["kind"] == "eval"] == [20, 40]
    for name in (
        "config.yaml",
        "curves.png",
        "labels.json",
        "adapter/adapter_model.safetensors",
        "checkpoint",
    ):
        assert (tmp_path / "run" / name).exists(), name
    assert (
        result.adapter_file_bytes
        == (tmp_path / "run" / "adapter" / "adapter_model.safetensors").stat().st_size
    )


def test_an_existing_run_is_not_overwritten_without_resume(assets, tmp_path):
    train(
        _classification(assets, tmp_path / "run", max_steps=2, eval_every=2, save_every=2),
        log=lambda *_: None,
    )
    with pytest.raises(ConfigError, match="pass --resume"):
        train(_classification(assets, tmp_path / "run", max_steps=2), log=lambda *_: None)


def test_resume_after_sigkill_ends_with_the_same_adapter(assets, tmp_path):
    settings = dict(max_steps=60, save_every=3, eval_every=30, dropout=0.1)
    train(_classification(assets, tmp_path / "straight", **settings), log=lambda *_: None)

    config = _classification(assets, tmp_path / "killed", **settings)
    config.save(tmp_path / "killed.yaml")
    process = subprocess.Popen(
        [*PEFTKIT, "train", "--config", str(tmp_path / "killed.yaml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = tmp_path / "killed" / "checkpoint" / "trainer_state.pt"
    deadline = time.time() + 120
    while not state.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = torch.load(state, weights_only=True)["progress"]["step"]
    assert killed_at < 60, "the run was killed before it finished"
    assert not (tmp_path / "killed" / "adapter").exists()

    result = train(_classification(assets, tmp_path / "killed", resume=True, **settings), log=lambda *_: None)
    assert result.steps == 60
    straight, resumed = _adapter(tmp_path / "straight"), _adapter(tmp_path / "killed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_two_processes_match_one_process_with_twice_the_batch(assets, tmp_path):
    common = [
        "--model",
        str(assets["bert"]),
        "--dataset",
        str(assets["sentiment"]),
        *fx.SENTIMENT_FLAGS,
        "--limit",
        "none",
        "--max-steps",
        "6",
        "--eval-every",
        "6",
        "--save-every",
        "6",
        "--dropout",
        "0",
        "--max-length",
        "16",
        "--target-modules",
        "all-linear",
        "--learning-rate",
        "0.01",
    ]
    single = subprocess.run(
        [*PEFTKIT, "train", *common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")],
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    launcher = os.path.join(os.path.dirname(sys.executable), "torchrun")
    double = subprocess.run(
        [
            launcher,
            "--nproc_per_node",
            "2",
            "-m",
            "peftkit.cli.main",
            "train",
            *common,
            "--batch-size",
            "4",
            "--output-dir",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert double.returncode == 0, double.stderr[-2000:]
    one, two = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    # each process pads its half of a step's batch to its own longest row, the single one pads the whole batch:
    # the sums round differently, and Adam (dividing by each entry's own gradient size) moves an entry whose
    # gradient is near zero by a few 1e-6 for it
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=5e-6)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
    assert double.stdout.count("test accuracy") == 1, "only rank 0 reports"
    assert "processes: 2; global batch 8 = batch size 4 x 2 processes" in double.stdout
    assert "processes: 1; global batch 8 = batch size 8 x 1 processes" in single.stdout
    recorded = json.loads((tmp_path / "two" / "result.json").read_text())
    assert (recorded["world_size"], recorded["global_batch"]) == (2, 8)


def test_eval_and_predict_commands(assets, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(_classification(assets, run_dir), log=lambda *_: None)
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] > 0.85
    rows = list(csv.reader(assets["sentiment"].open()))[1:41]
    assert main(["predict", str(run_dir), *[text for text, _ in rows]]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["input"] for line in lines] == [text for text, _ in rows]
    agreement = sum(line["output"] == label for line, (_, label) in zip(lines, rows, strict=True)) / len(rows)
    assert agreement > 0.85


def test_bad_input_is_reported_without_a_traceback(assets, tmp_path, capsys):
    code = main(
        [
            "train",
            "--model",
            str(assets["bert"]),
            "--dataset",
            str(assets["sentiment"]),
            "--task",
            "sequence-classification",
            "--output-dir",
            str(tmp_path / "x"),
        ]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert "review" in error and "text" in error  # names the missing column and the ones that exist


def test_a_checkpoint_save_after_a_kill_that_left_a_stale_previous_one(tmp_path):
    # a run killed while the old previous checkpoint was being removed leaves both `checkpoint` and a
    # (partial) `checkpoint.previous`; the next save must replace it, not fail on the occupied name
    from peftkit import LoraConfig, get_peft_model
    from peftkit.training.layout import RunFolder
    from peftkit.training.state import Progress, trainer_state
    from tests.tiny_models import TINY_MODELS

    model = get_peft_model(TINY_MODELS["llama"].build(), LoraConfig(r=2, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    folder = RunFolder(tmp_path)
    folder.save_checkpoint(model, trainer_state(optimizer, scheduler, Progress(step=1)))
    stale = tmp_path / "checkpoint.previous"
    stale.mkdir()
    (stale / "leftover").write_text("")
    folder.save_checkpoint(model, trainer_state(optimizer, scheduler, Progress(step=2)))
    assert not (stale / "leftover").exists()  # the stale one went; the step-1 checkpoint took its place
    assert folder.load_trainer_state(stale)["progress"]["step"] == 1
    assert folder.load_trainer_state(folder.find_checkpoint())["progress"]["step"] == 2
