"""The monitoring tap's socket: a failed bind raises a clear error and leaves nothing open."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import zmq

from common.config import MAX_UNIX_SOCKET_PATH_BYTES
from common.errors import PlcBridgeError
from common.tap import Tap
from tests.gateway_files import make_runtime_dir, removed_afterwards

LONGEST_SOCKET = "tap-credential_watcher.sock"


def padded_folder(parent: Path, total_bytes: int) -> Path:
    """Return a folder path under parent whose length is exactly total_bytes."""
    name_bytes = total_bytes - len(os.fsencode(parent)) - 1
    assert name_bytes > 0
    return parent / ("r" * name_bytes)


def term_finishes(ctx: zmq.Context[zmq.Socket[bytes]], timeout_s: float = 5.0) -> bool:
    """Return whether context.term() returns within timeout_s, as it does with no open socket."""
    thread = threading.Thread(target=ctx.term, name="zmq-term", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return not thread.is_alive()


def test_tap_binds_in_runtime_dir_of_max_length(
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    # The configuration allows 79 bytes: the longest socket path is then 107 bytes.
    base = make_runtime_dir()
    folder = padded_folder(base, MAX_UNIX_SOCKET_PATH_BYTES - len("/" + LONGEST_SOCKET))
    with removed_afterwards(base):
        folder.mkdir()
        tap = Tap(context, folder, "credential_watcher")
        tap.close()

        assert len(os.fsencode(folder)) == 79
        assert (folder / LONGEST_SOCKET).exists()


def test_tap_bind_failure_closes_socket(context: zmq.Context[zmq.Socket[bytes]]) -> None:
    base = make_runtime_dir()
    folder = padded_folder(base, MAX_UNIX_SOCKET_PATH_BYTES - len("/" + LONGEST_SOCKET) + 1)
    with removed_afterwards(base):
        folder.mkdir()
        with pytest.raises(PlcBridgeError) as caught:
            Tap(context, folder, "credential_watcher")

        assert str(caught.value).startswith(
            f"cannot bind the credential_watcher tap to ipc://{folder}/{LONGEST_SOCKET}: "
        )
        assert "check that gateway.runtime_dir exists" in str(caught.value)
        assert term_finishes(context)


def test_tap_missing_folder_raises(context: zmq.Context[zmq.Socket[bytes]]) -> None:
    folder = Path("/tmp/pb-absent-runtime-folder")

    with pytest.raises(PlcBridgeError) as caught:
        Tap(context, folder, "buffer")

    assert str(caught.value) == (
        f"cannot bind the buffer tap to ipc://{folder}/tap-buffer.sock: No such file or "
        "directory; check that gateway.runtime_dir exists and is writable by the gateway's user"
    )
    assert term_finishes(context)
