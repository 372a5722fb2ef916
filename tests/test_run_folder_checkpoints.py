"""A damaged checkpoint on --resume: the run falls back to the whole checkpoint before it (and says which
file was bad), ending with exactly the adapter an undamaged run ends with; with no whole checkpoint left it
is an error naming each bad file. Saving keeps the previous checkpoint whole until the new one is."""

import collections
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftkit.config import ConfigError
from peftkit.training.layout import RunFolder
from peftkit.training.loop import train
from tests import run_folder_helpers as rf

STATE, ADAPTER = "trainer_state.pt", "adapter/adapter_model.safetensors"


class NotATensor:  # a pickled object of this class is what `weights_only=True` refuses
    pass


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _without(key):
    def damage(path):
        state = torch.load(path, weights_only=True)
        del state[key]
        torch.save(state, path)

    return damage


def _nan_weights(path):
    tensors = load_file(path)
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, path)


DAMAGES = {
    "truncated state": (STATE, _truncate, "cannot be read"),
    "empty dict": (STATE, lambda p: torch.save({}, p), "lacks optimizer, scheduler, rng, progress"),
    "refused pickle": (STATE, lambda p: torch.save({"x": NotATensor()}, p), "cannot be read"),
    "missing rng": (STATE, _without("rng"), "lacks rng"),
    "a list": (STATE, lambda p: torch.save([1, 2], p), "holds a list"),
    "bad step": (
        STATE,
        lambda p: torch.save({**torch.load(p, weights_only=True), "progress": collections.OrderedDict()}, p),
        "`progress` must hold exactly",
    ),
    "random bytes": (STATE, lambda p: p.write_bytes(b"\x00garbage" * 50), "cannot be read"),
    "state missing": (STATE, lambda p: p.unlink(), "is missing"),
    "truncated adapter": (ADAPTER, _truncate, "adapter_model.safetensors"),
    "adapter config missing": (
        "adapter/adapter_config.json",
        lambda p: p.unlink(),
        "adapter_config.json",
    ),
    "NaN adapter weights": (ADAPTER, _nan_weights, "NaN or infinite"),
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return rf.make_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 (previous) and 4."""
    return rf.finished_run(tmp_path_factory, assets, dropout=0.1)


def test_a_run_keeps_its_last_two_checkpoints(finished):
    folder = RunFolder(finished)
    assert [c.name for c in folder.checkpoints()] == ["checkpoint", "checkpoint.previous"]
    steps = [folder.load_trainer_state(c)["progress"]["step"] for c in folder.checkpoints()]
    assert steps == [4, 2]
    assert not list(finished.glob(".checkpoint-*"))  # nothing half-built left


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(assets, finished, tmp_path, damage):
    name, spoil, reason = DAMAGES[damage]
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    spoil(run / "checkpoint" / name)
    said = []
    result = train(rf.config(assets, run, resume=True, dropout=0.1), log=said.append)
    fallback = [s for s in said if "the latest checkpoint is damaged" in s]
    assert len(fallback) == 1 and f"{run}/checkpoint" in fallback[0] and reason in fallback[0]
    assert f"resuming from the one before it, {run}/checkpoint.previous (step 2)" in fallback[0]
    assert result.steps == 4
    # steps 3 and 4 done again from the step-2 checkpoint: exactly the adapter of the undamaged run
    redone, original = load_file(run / ADAPTER), load_file(finished / ADAPTER)
    assert redone.keys() == original.keys() and all(torch.equal(redone[k], original[k]) for k in original)
    entries = RunFolder(run).entries()
    assert [e["step"] for e in entries if e["kind"] == "train"] == [1, 2, 3, 4]  # steps 3-4 logged once
    assert [e["checkpoint"] for e in entries if e["kind"] == "resume"] == ["checkpoint.previous"]


def test_no_whole_checkpoint_is_an_error_naming_each_bad_file(assets, finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    _truncate(run / "checkpoint" / STATE)
    torch.save({}, run / "checkpoint.previous" / STATE)
    config_before = (run / "config.yaml").read_bytes()
    with pytest.raises(ConfigError) as error:
        train(rf.config(assets, run, resume=True, dropout=0.1, max_steps=6), log=rf.QUIET)
    message = str(error.value)
    assert message.startswith(f"--resume: no whole checkpoint in {run}")
    assert f"{run}/checkpoint/{STATE} cannot be read" in message
    assert f"{run}/checkpoint.previous/{STATE} lacks optimizer" in message
    assert (run / "config.yaml").read_bytes() == config_before  # max_steps 6 not recorded


def test_a_kill_between_the_two_renames_leaves_the_previous_checkpoint_to_resume(assets, finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "checkpoint")  # renamed away to .previous; the new one not yet renamed in
    (run / ".checkpoint-x1y2").mkdir()  # ... and left half-built
    (run / ".checkpoint-x1y2" / "partial").write_bytes(b"")
    shutil.rmtree(run / "adapter")
    said = []
    result = train(rf.config(assets, run, resume=True, dropout=0.1), log=said.append)
    assert any(f"resuming from {run}/checkpoint.previous at step 2" in s for s in said)
    assert result.steps == 4 and not (run / ".checkpoint-x1y2").exists()
    redone, original = load_file(run / ADAPTER), load_file(finished / ADAPTER)
    assert all(torch.equal(redone[k], original[k]) for k in original)


def test_a_failed_checkpoint_save_keeps_both_earlier_checkpoints(finished, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = {p.relative_to(run): p.read_bytes() for p in run.glob("checkpoint*/**/*") if p.is_file()}

    class Model:
        def save_pretrained(self, directory):
            directory.mkdir()
            (directory / "adapter_model.safetensors").write_bytes(b"half")
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        RunFolder(run).save_checkpoint(Model(), {})
    after = {p.relative_to(run): p.read_bytes() for p in run.glob("checkpoint*/**/*") if p.is_file()}
    assert after == before and not list(run.glob(".checkpoint-*"))
