"""A run whose loss or trainable parameters stop being finite stops at once, naming the step and suggesting
a lower learning rate, and saves nothing of that step: the earlier checkpoint and adapter survive. The
parameter check (``check_finite``, on by default, ``--no-check-finite`` to skip) catches an update that
turned weights NaN with a finite loss one step before the loss would show it."""

import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from peftkit.cli import train as train_cli
from peftkit.cli.main import build_parser, main
from peftkit.training.divergence import TrainingDiverged
from peftkit.training.layout import RunFolder
from peftkit.training.loop import train
from peftkit.training.run import TrainingRun
from tests import run_folder_helpers as rf


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return rf.make_assets(tmp_path_factory.mktemp("assets"))


def _spoil_at(monkeypatch, step, how):
    """Make optimizer step ``step`` (1-based) go wrong: a NaN loss, or an infinite gradient (finite loss)."""
    original = TrainingRun.loss

    def loss(self, batch):
        value = original(self, batch)
        if self.progress.step + 1 != step:
            return value
        if how == "loss":
            return value * float("nan")
        first = next(p for p in self.model.parameters() if p.requires_grad)
        first.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        return value

    monkeypatch.setattr(TrainingRun, "loss", loss)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(assets, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _spoil_at(monkeypatch, 4, "loss")
    assert main(["train", *rf.cli_flags(assets, out, max_steps=6)]) == 2
    error = capsys.readouterr().err
    assert "training diverged at step 4: the training loss is nan (learning rate" in error
    assert "lower --learning-rate" in error and f"the last checkpoint ({out}/checkpoint, step 2)" in error
    folder = RunFolder(out)
    assert not folder.adapter_dir.exists() and folder.read_result() is None
    assert folder.load_trainer_state(folder.find_checkpoint())["progress"]["step"] == 2
    entries = folder.entries()
    assert [e["step"] for e in entries if e["kind"] == "train"] == [1, 2, 3]
    assert entries[-1]["kind"] == "diverged" and entries[-1]["step"] == 4
    assert folder.writer() is None  # the lock went with the run


def test_non_finite_weights_after_a_step_stop_the_run_before_its_checkpoint(assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _spoil_at(monkeypatch, 3, "gradient")
    with pytest.raises(
        TrainingDiverged, match=r"at step 3: the trainable parameter .* holds NaN or infinite"
    ):
        train(rf.config(assets, out, max_steps=6), log=rf.QUIET)
    folder = RunFolder(out)
    checkpoint = folder.find_checkpoint()
    assert folder.load_trainer_state(checkpoint)["progress"]["step"] == 2  # no NaN checkpoint at step 4
    saved = load_file(RunFolder.checkpoint_adapter(checkpoint) / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_without_the_finite_check_only_a_later_nan_loss_stops_the_run(assets, tmp_path, monkeypatch):
    # what --no-check-finite gives up: the NaN weights of step 3 went on training, unseen until a loss
    _spoil_at(monkeypatch, 3, "gradient")
    with pytest.raises(TrainingDiverged, match=r"at step (\d+): the training loss is nan") as error:
        train(rf.config(assets, tmp_path / "run", max_steps=8, check_finite=False), log=rf.QUIET)
    assert int(re.search(r"at step (\d+)", str(error.value)).group(1)) > 3


def test_a_resumed_run_that_diverges_keeps_the_adapter_it_finished_with(assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(rf.config(assets, out), log=rf.QUIET)
    adapter = {p.name: p.read_bytes() for p in (out / "adapter").iterdir()}
    checkpoint = {p.name: p.read_bytes() for p in (out / "checkpoint" / "adapter").iterdir()}
    shutil.copy(out / "config.yaml", tmp_path / "config.before")
    _spoil_at(monkeypatch, 5, "loss")
    with pytest.raises(TrainingDiverged, match="at step 5"):
        train(rf.config(assets, out, resume=True, max_steps=6), log=rf.QUIET)
    assert {p.name: p.read_bytes() for p in (out / "adapter").iterdir()} == adapter
    assert {p.name: p.read_bytes() for p in (out / "checkpoint" / "adapter").iterdir()} == checkpoint


def test_the_finite_check_is_on_by_default_and_can_be_switched_off():
    parser = build_parser()
    assert train_cli.config_from_args(parser.parse_args(["train"])).check_finite is True
    args = parser.parse_args(["train", "--no-check-finite"])
    assert train_cli.config_from_args(args).check_finite is False


@pytest.mark.parametrize(
    ("value", "finite"),
    [(float("nan"), False), (float("inf"), False), (-float("inf"), False), (1e30, True), (-3.0e38, True)],
)
def test_the_parameter_check_names_the_tensor_and_never_mistakes_a_large_value(value, finite):
    from peftkit.training.divergence import FiniteParameters

    model = torch.nn.Module()
    model.a = torch.nn.Parameter(torch.ones(3, 4))
    model.empty = torch.nn.Parameter(torch.ones(0))  # an empty shard under FSDP
    model.b = torch.nn.Parameter(torch.ones(5, dtype=torch.bfloat16))
    model.frozen = torch.nn.Parameter(torch.full((2,), float("nan")), requires_grad=False)  # not checked
    check = FiniteParameters(model)
    assert check.problem() is None
    with torch.no_grad():
        model.b[2] = value
    assert (check.problem() is None) == finite  # 3e38 squared would overflow a 2-norm: max |x| does not
    if not finite:
        assert check.problem() == "the trainable parameter b holds NaN or infinite values after the update"
