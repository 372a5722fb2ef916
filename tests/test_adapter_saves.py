"""Saves: the folder holds the previous complete adapter or the new complete one, files get the umask's mode,
and equal adapters give equal bytes."""

import os
import pathlib

import pytest
import torch

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit import checkpoint as ckpt
from tests.tiny_models import TINY_MODELS, run

MLP = TINY_MODELS["mlp"]


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = LoraConfig(r=4, init="random", target_modules=["0", "2"], **overrides)
    return get_peft_model(MLP.build(), config)


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _fail_config_write(monkeypatch):
    real = pathlib.Path.write_text

    def write_text(self, *args, **kwargs):
        if ckpt.CONFIG_NAME in self.name:  # the final name or the temporary one beside it
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)


def _fail_swap(monkeypatch):
    def crash(new, old):
        raise KeyboardInterrupt  # killed just before the exchange

    monkeypatch.setattr(ckpt, "_exchange", crash)


@pytest.mark.parametrize("failure", [_fail_config_write, _fail_swap])
@pytest.mark.parametrize("user_file", [False, True])
def test_a_failed_resave_leaves_the_previous_complete_adapter(failure, user_file, tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    old = _model(seed=0)
    old.save_pretrained(folder)
    if user_file:  # a folder with the user's own files is written in place, never swapped whole
        (folder / "notes.txt").write_text("mine")
    before = _snapshot(folder)
    failure(monkeypatch)
    if failure is _fail_swap and user_file:
        pytest.skip("a folder with other files is never swapped")
    with pytest.raises((OSError, KeyboardInterrupt)):
        _model(seed=1, alpha=16).save_pretrained(folder)
    monkeypatch.undo()
    assert _snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "no staging folder is left"
    loaded = PeftModel.from_pretrained(MLP.build(), folder)
    assert torch.equal(run(loaded, MLP, MLP.batch()), run(old, MLP, MLP.batch()))


def test_a_resave_replaces_the_adapter_and_keeps_other_adapters_and_user_files(tmp_path):
    model = _model(seed=0)
    model.add_adapter("second", LoraConfig(r=2, init="random", target_modules=["0"]))
    model.save_pretrained(tmp_path)
    second = _snapshot(tmp_path / "second")
    new = _model(seed=1, alpha=16)
    new.save_pretrained(tmp_path)  # only `default`
    assert _snapshot(tmp_path / "second") == second, "the other adapter's subfolder survives the swap"
    loaded = PeftModel.from_pretrained(MLP.build(), tmp_path)
    assert torch.equal(run(loaded, MLP, MLP.batch()), run(new, MLP, MLP.batch()))
    (tmp_path / "notes.txt").write_text("mine")
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / ckpt.WEIGHTS_NAME).exists(), "the other format's file is removed"
    model.set_adapter("default")
    loaded = PeftModel.from_pretrained(MLP.build(), tmp_path)
    assert torch.equal(run(loaded, MLP, MLP.batch()), run(model, MLP, MLP.batch()))


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
@pytest.mark.parametrize("user_file", [False, True])
def test_files_get_the_umask_derived_mode(mask, user_file, tmp_path):
    folder = tmp_path / "adapter"
    if user_file:
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
    previous = os.umask(mask)
    try:
        _model().save_pretrained(folder)
    finally:
        os.umask(previous)
    for name in (ckpt.CONFIG_NAME, ckpt.WEIGHTS_NAME):
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    if not user_file:
        assert folder.stat().st_mode & 0o777 == 0o777 & ~mask


def test_two_saves_of_one_adapter_are_byte_identical(tmp_path):
    model = _model()
    for i in range(4):
        model.save_pretrained(tmp_path / str(i))
    snapshots = [_snapshot(tmp_path / str(i)) for i in range(4)]
    assert all(s == snapshots[0] for s in snapshots)


def test_a_save_into_a_linked_folder_writes_where_the_link_points(tmp_path):
    _model(seed=0).save_pretrained(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    new = _model(seed=1, alpha=16)
    new.save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    loaded = PeftModel.from_pretrained(MLP.build(), tmp_path / "real")
    assert torch.equal(run(loaded, MLP, MLP.batch()), run(new, MLP, MLP.batch()))
