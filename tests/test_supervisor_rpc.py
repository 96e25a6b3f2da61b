"""SupervisorClient's errors against unix sockets that are not a working supervisord.

The calls to a real supervisord (restart, faults, a missing socket) are in
test_credential_watcher.py. These stand-ins are test-side sockets that accept a connection
and then stay silent or send something that is not HTTP.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import supervisor_rpc
from common.supervisor_rpc import SupervisorClient, SupervisorUnavailableError
from tests.gateway_files import make_runtime_dir, removed_afterwards


@pytest.fixture
def socket_path() -> Iterator[Path]:
    runtime = make_runtime_dir()
    with removed_afterwards(runtime):
        yield runtime / "supervisord.sock"


def listen(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    return server


def test_supervisor_client_refused_socket(socket_path: Path) -> None:
    # A socket file without a listener, as a supervisord that crashed leaves it behind.
    listen(socket_path).close()

    with pytest.raises(SupervisorUnavailableError) as caught:
        SupervisorClient(socket_path).process_info("plcbridge:uplink")

    assert str(caught.value) == (
        f"supervisord socket {socket_path}: connection refused; "
        "supervisord is not listening there"
    )


def test_supervisor_client_silent_socket_times_out(
    socket_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor_rpc, "RPC_TIMEOUT_S", 0.3)
    server = listen(socket_path)
    try:
        # The kernel completes the connect from the backlog, and no response ever comes.
        with pytest.raises(SupervisorUnavailableError) as caught:
            SupervisorClient(socket_path).process_info("plcbridge:uplink")
    finally:
        server.close()

    assert str(caught.value) == (
        f"supervisord at unix://{socket_path}: getProcessInfo timed out after 0.3 s"
    )


def test_supervisor_client_non_http_reply(socket_path: Path) -> None:
    server = listen(socket_path)
    server.settimeout(10)

    def reply_garbage() -> None:
        connection, _address = server.accept()
        with connection:
            # Read the whole request first: closing with unread data would reset the
            # connection, and the client would retry instead of reading the reply.
            request = b""
            while b"</methodCall>" not in request:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                request += chunk
            connection.sendall(b"not http at all\r\n\r\n")

    thread = threading.Thread(target=reply_garbage, name="garbage-server")
    thread.start()
    try:
        with pytest.raises(SupervisorUnavailableError) as caught:
            SupervisorClient(socket_path).process_info("plcbridge:uplink")
    finally:
        thread.join(10)
        server.close()

    assert str(caught.value).startswith(
        f"supervisord at unix://{socket_path}: getProcessInfo failed: "
    )
