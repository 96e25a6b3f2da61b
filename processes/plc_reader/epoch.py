"""The reader's epoch: a counter in <state_dir>/reader-epoch that grows at every start.

Samples carry (epoch, seq), and the buffer keeps one batch sequence per epoch, so an epoch
must never be used twice. The file is replaced atomically, and an unreadable one stops the
reader rather than letting it guess a number that may already be taken.

On a full state disk the atomic replacement fails, because it needs a new file. The epoch
is then written over the old one in place, padded with spaces to the old length, so no new
block is needed. Without an old file the reader waits and retries, because it must not send
samples under an epoch that is not stored.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from pathlib import Path

from common.atomic_file import write_atomically
from common.backoff import Backoff
from common.credentials import read_regular_file
from common.errors import PlcBridgeError
from common.logs import fields

EPOCH_FILE = "reader-epoch"

# An epoch is a few digits, and the padding of in-place writes adds a few spaces.
MAX_EPOCH_FILE_BYTES = 4096

# errno values of a full disk or an exhausted quota.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

# Retry delays while no epoch can be stored.
RETRY_MIN_S = 1.0
RETRY_MAX_S = 60.0


def advance_epoch(
    state_dir: Path, stop: threading.Event | None = None, logger: logging.Logger | None = None
) -> int | None:
    """Increment the stored epoch, make it durable and return it. The first epoch is 1.

    When the disk is full and there is no epoch file to overwrite, retry with backoff, and
    return None if stop is set first. Without stop, raise PlcBridgeError instead.
    """
    path = state_dir / EPOCH_FILE
    backoff = Backoff(RETRY_MIN_S, RETRY_MAX_S)
    while True:
        try:
            return _advance_once(state_dir, path)
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS or stop is None:
                raise _unwritable(path, exc) from exc
            delay_s = backoff.next_delay_s()
            if logger is not None:
                logger.warning(
                    "epoch_not_saved %s",
                    fields(file=path, reason=exc.strerror, next_delay_s=f"{delay_s:.1f}",
                           consequence="the reader does not poll until the epoch is stored; "
                                       "free space in gateway.state_dir"),
                )
            if stop.wait(delay_s):
                return None


def _advance_once(state_dir: Path, path: Path) -> int:
    state_dir.mkdir(parents=True, exist_ok=True)
    old = _read_epoch_text(path)
    epoch = _parse_epoch(path, old) + 1
    try:
        write_atomically(path, f"{epoch}\n".encode())
    except OSError as exc:
        if exc.errno not in DISK_FULL_ERRNOS or old is None:
            raise
        _overwrite_in_place(path, epoch, len(old.encode("ascii")))
    return epoch


def _overwrite_in_place(path: Path, epoch: int, old_length: int) -> None:
    """Write epoch over the existing file without truncating it, then fsync it.

    NOTE: unlike the rename, this is not atomic against a power cut in the middle of the
    write. The number is a few bytes inside one sector, which most disks write whole, but
    not every SD card promises it.
    """
    text = f"{epoch}".ljust(old_length - 1) + "\n"
    descriptor = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        view = memoryview(text.encode("ascii"))
        offset = 0
        while offset < len(view):
            offset += os.pwrite(descriptor, view[offset:], offset)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _read_epoch_text(path: Path) -> str | None:
    try:
        return read_regular_file(path, MAX_EPOCH_FILE_BYTES).decode("ascii")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as exc:
        raise _corrupt(path, "non-ASCII bytes") from exc
    except ValueError as exc:
        # A FIFO or device there must not block the reader or fill its memory.
        raise PlcBridgeError(
            f"{path}: cannot read the reader epoch: the file is {exc}; replace it with a "
            "regular file that contains the last epoch"
        ) from exc


def _parse_epoch(path: Path, text: str | None) -> int:
    if text is None:
        return 0
    # An epoch written in place is padded with spaces.
    stripped = text.strip()
    if not stripped.isdigit():
        raise _corrupt(path, repr(stripped[:40]))
    return int(stripped)


def _unwritable(path: Path, exc: OSError) -> PlcBridgeError:
    return PlcBridgeError(
        f"{path}: cannot update the reader epoch: {exc}. Check that the folder "
        "gateway.state_dir is writable by this user and has free space"
    )


def _corrupt(path: Path, content: str) -> PlcBridgeError:
    return PlcBridgeError(
        f"{path}: invalid reader epoch {content}; expected a whole number. Write a number "
        "larger than any epoch this gateway has sent (see the last samples in the cloud) "
        "into the file, then restart the reader"
    )
