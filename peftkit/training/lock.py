"""One writer per run folder: an advisory lock on a file in the folder, held for as long as a run writes.

The lock is the operating system's (``fcntl.flock``), not the file's existence: it dies with the process
that holds it, so a run killed by SIGKILL, an out-of-memory kill or a power cut leaves no lock behind, and
the file left in the folder blocks nobody. The holder writes its pid, host and start time into the file so
that a refused run can name it. ``flock`` is what ``git``-like tools and ``filelock`` use on POSIX systems;
``filelock`` itself is not used because it truncates the file on every attempt, erasing the holder's name.
On a system without ``fcntl`` (Windows), or a file system that refuses locks, the lock does nothing.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

from peftkit.config import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks of this kind; runs are not guarded there
    fcntl = None

WAIT_SECONDS = 1.0  # how long a run waits for the lock before refusing (a reader's probe holds it for µs)


class FolderBusy(ConfigError):
    """Another live process holds the run folder's lock."""


class FolderLock:
    """The lock of one folder, through the file ``path`` (created when first taken, never removed)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, what: str) -> None:
        """Take the lock, or raise :class:`FolderBusy` naming the holder (pid, host, since when); ``what`` is
        the folder's name in that message. Waits up to :data:`WAIT_SECONDS` for a reader's probe to pass."""
        if fcntl is None or self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's name stays readable
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise FolderBusy(
                        f"{what} is being written by another peftkit run ({holder}): wait for it to end, "
                        "or choose another --output-dir"
                    ) from None
                time.sleep(0.05)
            except OSError:  # a file system without locks (some network or FUSE mounts): not guarded there
                os.close(fd)
                return
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_me()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let the lock go (closing the file releases it); the file stays, holding no lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def holder(self) -> str | None:
        """Who holds the lock now ("pid 12 on host h since ..."), or None when no live process does. Only
        reads: the file is not created, and the probe (a shared lock taken and dropped at once) is covered by
        :meth:`acquire`'s wait."""
        if fcntl is None or self._fd is not None or not self.path.is_file():
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return _read_holder(fd)
        except OSError:  # no locks on this file system
            return None
        finally:
            os.close(fd)  # also drops the shared lock when it was taken


def _me() -> dict[str, object]:
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": started}


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {holder['pid']} on host {holder['host']} since {holder['since']}"
    except (ValueError, KeyError, TypeError):  # the holder is between taking the lock and writing its name
        return "a process that has just started"
