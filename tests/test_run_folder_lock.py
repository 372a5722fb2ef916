"""One writer per run folder: a second `peftkit train` into a folder being written refuses, naming the folder
and the holder; a lock left by a killed process blocks nobody; eval/predict read a finished run being
resumed (with a note) and refuse an unfinished one being trained, naming the trainer."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from peftkit.cli.main import main
from peftkit.training.layout import RunFolder
from peftkit.training.lock import FolderBusy, FolderLock
from peftkit.training.loop import train
from tests import run_folder_helpers as rf

ROOT = Path(__file__).resolve().parent.parent
HOLD = textwrap.dedent(
    """
    import sys, time
    from peftkit.training.lock import FolderLock
    FolderLock(sys.argv[1]).acquire("x")
    print("held", flush=True)
    time.sleep(120)
    """
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return rf.make_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture
def holder(tmp_path):
    """Start a process holding the lock of a folder; yields (folder, process), killed at the end."""
    processes = []

    def start(folder):
        folder.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(RunFolder(folder).lock().path)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        processes.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield start
    for process in processes:
        process.kill()
        process.wait()


def test_a_second_lock_on_the_folder_names_the_holder_until_released(tmp_path):
    first, second = FolderLock(tmp_path / "train.lock"), FolderLock(tmp_path / "train.lock")
    assert first.holder() is None and not (tmp_path / "train.lock").exists()  # a probe creates nothing
    first.acquire("run")
    with pytest.raises(
        FolderBusy, match=rf"run is being written .*pid {os.getpid()} on host {socket.gethostname()}"
    ):
        second.acquire("run")
    assert f"pid {os.getpid()}" in second.holder()
    first.release()
    assert second.holder() is None
    second.acquire("run")  # the file left behind holds no lock
    second.release()


def test_a_lock_held_by_a_killed_process_blocks_nobody(tmp_path, holder):
    process = holder(tmp_path)
    lock = FolderLock(RunFolder(tmp_path).lock().path)
    with pytest.raises(FolderBusy, match=f"pid {process.pid}"):
        lock.acquire(str(tmp_path))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert lock.holder() is None
    lock.acquire(str(tmp_path))  # at once: no stale-lock timeout, no file to delete by hand
    lock.release()


def test_train_refuses_a_folder_being_written_and_writes_nothing(assets, tmp_path, holder, capsys):
    out = tmp_path / "run"
    process = holder(out)
    assert main(["train", *rf.cli_flags(assets, out)]) == 2
    error = capsys.readouterr().err
    assert str(out) in error and f"pid {process.pid} on host {socket.gethostname()}" in error
    assert sorted(p.name for p in out.iterdir()) == ["train.lock"]  # no config, labels, log or adapter
    process.kill()
    process.wait()
    train(rf.config(assets, out, max_steps=2), log=rf.QUIET)  # the dead holder's file is no obstacle
    assert RunFolder(out).is_finished() and RunFolder(out).writer() is None


@pytest.mark.slow  # two process start-ups: ~30-60 s on a shared 2-core machine
def test_two_real_train_processes_into_one_folder_one_refuses(assets, tmp_path):
    out = tmp_path / "run"
    endless = dict(max_steps=10**6, save_every=10**6, eval_every=10**6)
    first = subprocess.Popen(
        [*rf.PEFTKIT, "train", *rf.cli_flags(assets, out, **endless)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        rf.wait_for(lambda: RunFolder(out).writer() is not None, process=first)
        second = subprocess.run(
            [*rf.PEFTKIT, "train", *rf.cli_flags(assets, out, max_steps=2)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"{out} is being written by another peftkit run (pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None, "the first run goes on"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert RunFolder(out).writer() is None
    config = RunFolder(out).read_config()
    assert config.max_steps == 10**6  # config.yaml is the first run's, untouched by the refused one


def test_eval_reads_a_finished_run_being_resumed_and_refuses_an_unfinished_one(
    assets, tmp_path, holder, capsys
):
    finished = tmp_path / "finished"
    train(rf.config(assets, finished, max_steps=2), log=rf.QUIET)
    process = holder(finished)
    capsys.readouterr()
    assert main(["eval", str(finished)]) == 0
    captured = capsys.readouterr()
    assert "accuracy" in captured.out
    assert f"is being trained further now (pid {process.pid}" in captured.err

    unfinished = tmp_path / "unfinished"
    process = holder(unfinished)
    for command in (["eval", str(unfinished)], ["predict", str(unfinished), "a good film"]):
        assert main(command) == 2
        error = capsys.readouterr().err
        assert "is not a finished training run" in error and f"being trained now (pid {process.pid}" in error
