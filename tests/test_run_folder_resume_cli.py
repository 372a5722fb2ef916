"""`peftkit train --resume` continues the recorded run: a setting not given on the command line is the run's
own (not the default), only the settings given are compared; the run's number of processes may not change;
and a run that fails before training leaves its folder as it was (a folder it created: none)."""

import shutil

import pytest
import torch

from peftkit.cli.main import main
from peftkit.config import ConfigError
from peftkit.training.layout import RunFolder
from peftkit.training.loop import train
from tests import run_folder_helpers as rf


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return rf.make_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """A finished 4-step run (r=8, batch 8, limit 100, evaluation and checkpoint every 2 steps on 16)."""
    return rf.finished_run(tmp_path_factory, assets, r=8, limit=100)


def _copy(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def test_a_resume_given_only_more_steps_keeps_every_recorded_setting(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    recorded = RunFolder(run).read_config().to_dict()
    assert main(["train", "--output-dir", str(run), "--resume", "--max-steps", "6"]) == 0
    said = capsys.readouterr()
    assert "warning: --max-length" not in said.out + said.err  # the recorded length is not the user's
    assert "max length 16 tokens (recorded by the resumed run)" in said.out + said.err
    now = RunFolder(run).read_config().to_dict()
    changed = {k: v for k, v in now.items() if recorded[k] != v and k != "output_dir"}  # (a copy)
    assert changed == {"max_steps": 6, "resume": True}
    assert (now["batch_size"], now["limit"], now["eval_every"], now["eval_limit"]) == (8, 100, 2, 16)
    entries = RunFolder(run).entries()
    assert [e["changed"] for e in entries if e["kind"] == "resume"] == [{"max_steps": [4, 6]}]
    assert [e["step"] for e in entries if e["kind"] == "eval"] == [2, 4, 6]  # still every 2 steps


def test_a_resume_given_a_setting_that_changes_the_run_lists_only_that_one(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    before = (run / "config.yaml").read_text()
    assert main(["train", "--output-dir", str(run), "--resume", "--max-steps", "6", "--r", "4"]) == 2
    error = capsys.readouterr().err
    assert "r: 8 -> 4" in error
    listed = error.split("recorded in")[1].split("A resumed run")[0].splitlines()[1:]
    assert [line.strip() for line in listed] == ["r: 8 -> 4"]  # not the defaults of settings left out
    assert (run / "config.yaml").read_text() == before


def test_a_resume_given_another_method_is_refused_naming_it(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    assert main(["train", "--output-dir", str(run), "--resume", "--method", "bitfit"]) == 2
    assert "method: 'lora' -> 'bitfit'" in capsys.readouterr().err


def test_a_resume_with_another_number_of_processes_is_refused_naming_both(assets, finished, tmp_path):
    run = _copy(finished, tmp_path)
    state_path = run / "checkpoint" / "trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    assert state["world_size"] == 1  # each checkpoint records the processes that wrote it
    state["world_size"] = 2
    torch.save(state, state_path)
    with pytest.raises(ConfigError, match=r"2 process\(es\), and this one has 1.*global batch"):
        train(rf.config(assets, run, r=8, limit=100, resume=True, max_steps=6), log=rf.QUIET)


@pytest.mark.parametrize(
    "bad",
    [
        {"model": "/nonexistent/model"},
        {"dataset": "/nonexistent.csv"},
        {"target_modules": "nonexistent_mod"},
    ],
)
def test_a_run_that_fails_before_training_leaves_no_folder(assets, tmp_path, capsys, bad):
    out = tmp_path / "new" / "run"
    assert main(["train", *rf.cli_flags(assets, out, **bad)]) == 2
    assert "error" in capsys.readouterr().err.lower()
    assert not (tmp_path / "new").exists()  # nor the parent it created


def test_a_failed_run_leaves_a_folder_that_existed_as_it_was(assets, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="nonexistent_mod"):
        train(rf.config(assets, out, target_modules="nonexistent_mod"), log=rf.QUIET)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
