"""The reader lock: an exclusive flock on <state_dir>/reader.lock, held while the reader runs.

A second reader with the same configuration would take a new epoch and bind the same tap
endpoint. The buffer then rejects the first reader's batches as a stale epoch, for as long
as it runs. The lock is taken before the epoch advances, so a second reader exits without
changing anything. The kernel drops a flock when its process dies, even by SIGKILL, so a
crashed reader never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from common.errors import PlcBridgeError

LOCK_FILE = "reader.lock"


class ReaderLock:
    """An exclusive flock on the reader lock file, whose content is the holder's pid."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, state_dir: Path) -> ReaderLock:
        """Lock the state folder for this process, or raise PlcBridgeError naming the holder."""
        path = state_dir / LOCK_FILE
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise PlcBridgeError(
                f"{path}: cannot open the reader lock file: {exc}. Check that the folder "
                "gateway.state_dir is writable by this user"
            ) from exc

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise PlcBridgeError(
                f"{path} is locked by another plc_reader ({holder}) that uses the same "
                "gateway.state_dir; this reader exits without taking an epoch. Stop the "
                "other reader first, or give a second gateway its own gateway.state_dir "
                "and gateway.runtime_dir"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise PlcBridgeError(f"{path}: cannot lock the reader lock file: {exc}") from exc

        lock = cls(path, fd)
        lock._record_pid()
        return lock

    def release(self) -> None:
        # The file stays. After an unlink, a reader that had opened the old file could lock
        # it while a third reader creates and locks a new file of the same name.
        os.close(self._fd)

    def _record_pid(self) -> None:
        # Only for the message of a reader that finds the lock taken. The flock, not the
        # content, is the lock, so a failed write is no reason to stop.
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"
