"""The reader's epoch: a counter in <state_dir>/reader-epoch that grows at every start.

Samples carry (epoch, seq), and the buffer keeps one batch sequence per epoch, so an epoch
must never be used twice. The file is replaced atomically, and an unreadable one stops the
reader rather than letting it guess a number that may already be taken.
"""

from __future__ import annotations

from pathlib import Path

from common.atomic_file import write_atomically
from common.errors import PlcBridgeError

EPOCH_FILE = "reader-epoch"


def advance_epoch(state_dir: Path) -> int:
    """Increment the stored epoch, make it durable and return it. The first epoch is 1."""
    path = state_dir / EPOCH_FILE
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        epoch = _read_epoch(path) + 1
        write_atomically(path, f"{epoch}\n".encode())
    except OSError as exc:
        raise PlcBridgeError(
            f"{path}: cannot update the reader epoch: {exc}. Check that the folder "
            "gateway.state_dir is writable by this user"
        ) from exc
    return epoch


def _read_epoch(path: Path) -> int:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return 0
    except UnicodeDecodeError as exc:
        raise _corrupt(path, "non-ASCII bytes") from exc
    if not text.isdigit():
        raise _corrupt(path, repr(text[:40]))
    return int(text)


def _corrupt(path: Path, content: str) -> PlcBridgeError:
    return PlcBridgeError(
        f"{path}: invalid reader epoch {content}; expected a whole number. Write a number "
        "larger than any epoch this gateway has sent (see the last samples in the cloud) "
        "into the file, then restart the reader"
    )


