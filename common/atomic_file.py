"""Atomic, durable replacement of small state files: the reader's epoch, the credential
record, the last good configuration and the last good credential set."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace path with data, so that a reader finds the old file or the new one, even
    after a power cut.

    The data goes to a temporary file in the same folder, named by the process id so that
    processes writing the same file at once do not collide. It is fsynced and renamed over
    path, then the folder is fsynced. Raises OSError, with the temporary file removed.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            # A temporary file left by a killed writer keeps its old mode through O_CREAT.
            os.fchmod(descriptor, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view):]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise

    # The rename is durable only once the folder's entry is on disk.
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
