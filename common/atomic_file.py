"""Atomic, durable replacement of small files: the reader's epoch, the credential record,
the last good configuration, the last good credential set and rotated credential files."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace path with data, so that a reader finds the old file or the new one, even
    after a power cut.

    The data goes to a temporary file in the same folder (see write_temporary), which is
    renamed over path, then the folder is fsynced. Raises OSError, with the temporary file
    removed.
    """
    temporary = write_temporary(path, data, mode)
    try:
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    sync_folder(path.parent)


def write_temporary(path: Path, data: bytes, mode: int,
                    owner: tuple[int, int] | None = None) -> Path:
    """Write data to a temporary file next to path, fsynced, and return its path.

    The name carries the process id so that processes writing the same file at once do not
    collide. owner, a (uid, gid) pair, is given to the file before any data is written.
    Raises OSError, with the temporary file removed.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        descriptor = os.open(
            temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, mode
        )
        try:
            # A temporary file left by a killed writer keeps its old mode through O_CREAT.
            os.fchmod(descriptor, mode)
            if owner is not None:
                os.fchown(descriptor, *owner)
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view):]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return temporary


def sync_folder(folder: Path) -> None:
    """fsync a folder, which makes a rename in it durable."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
