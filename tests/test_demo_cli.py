"""The `peftkit` command and its demo: the loss goes down, the metric beats the start, every check holds."""

import pytest

from peftkit.cli.main import main
from peftkit.demo import run_demo


def test_demo_learns_and_round_trips(tmp_path):
    result = run_demo(tmp_path, steps=200, seed=0, log=lambda *_: None)
    assert result.accuracy_after > result.accuracy_before + 0.05
    assert result.reload_max_diff == 0.0
    assert result.merge_max_diff < 1e-4
    assert result.mixed_batch_max_diff < 1e-5
    assert (tmp_path / "adapter_model.safetensors").stat().st_size == result.adapter_file_bytes


def test_cli_demo_runs(tmp_path, capsys):
    assert main(["demo", "--steps", "5", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "trainable params" in out and "done in" in out


def test_cli_rejects_bad_steps(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "0"])
    assert "must be a positive integer, got 0" in capsys.readouterr().err
