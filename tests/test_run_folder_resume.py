"""`--resume` continues the run its folder records: other settings are refused with each difference listed,
the allowed ones (longer runs, evaluation and checkpoint cadence) go through and are recorded; an empty or
foreign folder is an error, never a silent fresh start. Local paths are recorded absolute, so `peftkit
eval` works from another directory, and a path that moved is reported with where it was recorded."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from peftkit.cli.main import main
from peftkit.config import ConfigError
from peftkit.training.config import TrainConfig
from peftkit.training.layout import RunFolder
from peftkit.training.loop import train
from peftkit.training.resume import MAY_CHANGE_ON_RESUME
from tests import run_folder_helpers as rf


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return rf.make_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """A finished 4-step run (r=8, batch 8), copied afresh by each test that changes it."""
    return rf.finished_run(tmp_path_factory, assets, r=8)


def _files(run):
    """Every file's bytes but the lock's (which names its last holder)."""
    return {
        p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "train.lock"
    }


def _copy(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize(
    ("changes", "listed"),
    [
        ({"r": 4}, ["r: 8 -> 4"]),
        ({"batch_size": 4}, ["batch_size: 8 -> 4"]),
        (
            {"seed": 1, "learning_rate": 0.001},
            ["seed: 0 -> 1", " learning_rate: 0.01 -> 0.001"],  # (the head keeps its own rate)
        ),
        ({"method": "bitfit"}, ["method: 'lora' -> 'bitfit'", "r: 8 -> (not a setting of this method)"]),
        ({"max_length": 32, "bf16": True}, ["max_length: 16 -> 32", "bf16: False -> True"]),
    ],
)
def test_resume_with_settings_that_change_the_run_lists_each_and_changes_nothing(
    assets, finished, tmp_path, changes, listed
):
    run = _copy(finished, tmp_path)
    before = _files(run)
    values = rf.settings(assets, run, resume=True, **{"r": 8, **changes})
    if "method" in changes:  # the options of the recorded method that the new one does not take
        values = {k: v for k, v in values.items() if k not in ("r", "target_modules", "dropout")}
    with pytest.raises(ConfigError) as error:
        train(TrainConfig.from_sources(None, values), log=rf.QUIET)
    message = str(error.value)
    assert f"{run}/config.yaml" in message and "another --output-dir" in message
    for line in listed:
        assert line in message
    if "method" not in changes:  # (another method: each option of either method is listed too)
        assert message.count(" -> ") == len(listed)  # the allowed and equal settings are not listed
    assert _files(run) == before  # config.yaml, log, checkpoints and adapter untouched


def test_a_different_model_or_dataset_is_refused(assets, finished, tmp_path):
    run = _copy(finished, tmp_path)
    other_data = rf.fx.sentiment_csv(tmp_path / "other.csv", rows=120, seed=1)
    with pytest.raises(ConfigError, match=f"dataset: '{assets['sentiment']}' -> '{other_data}'"):
        train(rf.config(assets, run, resume=True, dataset=str(other_data)), log=rf.QUIET)
    with pytest.raises(ConfigError, match=r"model: .* -> 'minilm'"):
        train(rf.config(assets, run, resume=True, model="minilm"), log=rf.QUIET)


def test_resume_may_train_longer_and_change_the_cadence_and_says_so(assets, finished, tmp_path):
    run = _copy(finished, tmp_path)
    said = []
    longer = dict(max_steps=6, eval_every=3, save_every=3, eval_limit=8, check_finite=False)
    result = train(rf.config(assets, run, resume=True, **longer), log=said.append)
    assert result.steps == 6
    assert any("resuming from" in s and "at step 4" in s and "max_steps: 4 -> 6" in s for s in said)
    assert RunFolder(run).read_config().max_steps == 6  # config.yaml: what the run now did
    entries = RunFolder(run).entries()
    marks = [e for e in entries if e["kind"] == "resume"]
    assert marks == [
        {
            "kind": "resume",
            "step": 4,
            "checkpoint": "checkpoint",
            "changed": {
                "check_finite": [True, False],
                "eval_every": [2, 3],
                "eval_limit": [16, 8],
                "max_steps": [4, 6],
                "save_every": [2, 3],
            },
        }
    ]
    assert [e["step"] for e in entries if e["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert {"max_steps", "epochs", "eval_every", "save_every"} <= MAY_CHANGE_ON_RESUME
    assert (
        not {"r", "batch_size", "learning_rate", "seed", "model", "dataset", "method"} & MAY_CHANGE_ON_RESUME
    )


def test_resume_with_fewer_steps_than_done_is_refused(assets, finished, tmp_path):
    run = _copy(finished, tmp_path)
    config_before = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="at step 4, past the 2 steps"):
        train(rf.config(assets, run, resume=True, max_steps=2), log=rf.QUIET)
    assert (run / "config.yaml").read_text() == config_before


@pytest.mark.parametrize(
    ("prepare", "expected"),
    [
        (lambda run: None, "does not exist"),
        (lambda run: run.mkdir(), "is empty or does not exist"),
        (lambda run: (run.mkdir(), (run / "notes.txt").write_text("mine")), "is not a peftkit run folder"),
    ],
)
def test_resume_into_a_folder_without_a_run_is_an_error_not_a_fresh_start(
    assets, tmp_path, prepare, expected
):
    run = tmp_path / "run"
    prepare(run)
    with pytest.raises(ConfigError, match=expected):
        train(rf.config(assets, run, resume=True), log=rf.QUIET)
    assert not (run / "config.yaml").exists() and not (run / "adapter").exists()


def test_resume_of_a_run_stopped_before_its_first_checkpoint_is_an_error(assets, finished, tmp_path):
    run = _copy(finished, tmp_path)
    for name in ("checkpoint", "checkpoint.previous", "adapter"):
        shutil.rmtree(run / name)
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        train(rf.config(assets, run, resume=True), log=rf.QUIET)
    said = []  # without --resume it starts afresh, saying so, with a fresh log
    train(rf.config(assets, run), log=said.append)
    assert any("stopped before its first checkpoint: starting it afresh" in s for s in said)
    assert [e["step"] for e in RunFolder(run).entries() if e["kind"] == "train"] == [1, 2, 3, 4]


def test_local_paths_are_recorded_absolute_and_builtin_names_stay_names(assets, tmp_path, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(assets["bert"], work / "models" / "bert")
    shutil.copy(assets["sentiment"], work / "data.csv")
    monkeypatch.chdir(work)
    train(rf.config({"bert": "models/bert", "sentiment": "data.csv"}, "run"), log=rf.QUIET)
    recorded = RunFolder(work / "run").read_config()
    assert (recorded.model, recorded.dataset) == (str(work / "models" / "bert"), str(work / "data.csv"))
    monkeypatch.chdir(tmp_path)  # elsewhere: eval reads the same files, and the relative --resume matches
    assert main(["eval", str(work / "run")]) == 0
    monkeypatch.chdir(work)
    train(rf.config({"bert": "models/bert", "sentiment": "data.csv"}, "run", resume=True), log=rf.QUIET)

    from peftkit.training.resume import with_absolute_paths

    named = with_absolute_paths(rf.config(assets, "x", model="minilm", dataset="rotten_tomatoes"))
    assert (named.model, named.dataset) == ("minilm", "rotten_tomatoes")


def test_a_recorded_path_that_moved_is_reported_with_its_record(assets, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace(str(assets["sentiment"]), "data/x.csv"))
    assert main(["eval", str(run)]) == 2
    assert f"data set 'data/x.csv' recorded in {run}/config.yaml: unknown data set" in capsys.readouterr().err
    (run / "config.yaml").write_text(config.replace(str(assets["bert"]), "models/gone"))
    assert main(["predict", str(run), "a fine film"]) == 2
    assert f"model 'models/gone' recorded in {run}/config.yaml: unknown model" in capsys.readouterr().err


def test_an_unchanged_resume_typed_with_relative_paths_continues(assets, finished, tmp_path, monkeypatch):
    # the same settings typed relative to the working directory: equal once made absolute
    run = _copy(finished, tmp_path)
    monkeypatch.chdir(tmp_path)
    relative = {"bert": os.path.relpath(assets["bert"]), "sentiment": os.path.relpath(assets["sentiment"])}
    result = train(rf.config(relative, "run", resume=True), log=rf.QUIET)
    assert result.steps == 4
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    original = load_file(finished / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(adapter[k], original[k]) for k in original)
    assert json.loads((run / "result.json").read_text())["steps"] == 4


def test_a_fresh_run_never_overwrites_a_trained_adapter(assets, finished, tmp_path):
    run = _copy(finished, tmp_path)
    for name in ("checkpoint", "checkpoint.previous"):  # only the trained adapter left
        shutil.rmtree(run / name)
    adapter = _files(run / "adapter")
    with pytest.raises(ConfigError, match=r"holds an earlier run .*pass --resume"):
        train(rf.config(assets, run), log=rf.QUIET)
    with pytest.raises(ConfigError, match="holds no checkpoint to continue from"):
        train(rf.config(assets, run, resume=True), log=rf.QUIET)
    assert _files(run / "adapter") == adapter


def test_a_recorded_setting_out_of_range_names_the_record(finished, tmp_path):
    run = _copy(finished, tmp_path)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("batch_size: 8", "batch_size: -8"))
    with pytest.raises(ConfigError, match=f"^{run}/config.yaml: .*batch_size"):
        RunFolder(run).read_config()
