"""Restart one supervisord program through supervisord's XML-RPC interface on its unix socket.

Socket, HTTP and timeout errors become SupervisorUnavailableError, which the caller may retry.
A fault that supervisord returns, such as an unknown program name or a spawn error, becomes
RestartError, which a retry would only repeat.
"""

from __future__ import annotations

import http.client
import socket
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import PlcBridgeError

# stopProcess and startProcess with wait=True return only after stopwaitsecs (10 s in
# supervisord.conf) and startsecs (1 s), so a call may legitimately take that long.
RPC_TIMEOUT_S = 60.0

# Fault codes of supervisord's XML-RPC interface, from supervisor 4.3's supervisor.xmlrpc.Faults.
# The client speaks plain XML-RPC through xmlrpc.client, because importing supervisor.xmlrpc
# adds about 4 MiB of resident memory (ru_maxrss, Python 3.11, supervisor 4.3).
FAULT_BAD_NAME = 10
FAULT_ALREADY_STARTED = 60
FAULT_NOT_RUNNING = 70

# Action of a restart in each supervisord process state, keyed by the state's name.
_ACTION_BY_STATE = {
    "RUNNING": "restart",
    "STARTING": "restart",
    "BACKOFF": "restart",
    "EXITED": "start",
    "FATAL": "start",
    "UNKNOWN": "start",
    # An operator stopped the program, or supervisord is stopping it: leave it so.
    "STOPPED": "leave",
    "STOPPING": "leave",
}


class SupervisorUnavailableError(PlcBridgeError):
    """supervisord did not respond on its socket: it is not running, not listening or too slow."""


class RestartError(PlcBridgeError):
    """supervisord returned a fault, so the program is not running as requested."""


@dataclass(frozen=True)
class RestartResult:
    action: str  # restart, start or leave, from _ACTION_BY_STATE
    state_before: str
    pid_before: int
    state_after: str
    pid_after: int


class UnixSocketHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix stream socket, with a timeout on the connect and on every read."""

    def __init__(self, socket_path: Path, timeout_s: float) -> None:
        # The host name only fills the Host header, which supervisord does not check.
        super().__init__("localhost", timeout=timeout_s)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.socket_path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class UnixSocketTransport(xmlrpc.client.Transport):
    """XML-RPC transport that sends every request to one unix socket, whatever the URL."""

    def __init__(self, socket_path: Path, timeout_s: float) -> None:
        super().__init__()
        self.socket_path = socket_path
        self.timeout_s = timeout_s

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        # Storing the connection in _connection, as the xmlrpc.client documentation's
        # ProxiedTransport example does, lets Transport reuse it and close() close it.
        connection = UnixSocketHTTPConnection(self.socket_path, self.timeout_s)
        self._connection = host, connection
        return connection


class SupervisorClient:
    """XML-RPC client of one supervisord, reached through its unix socket."""

    def __init__(self, socket_path: Path, timeout_s: float | None = None) -> None:
        """timeout_s bounds each call; None means RPC_TIMEOUT_S, enough for a restart."""
        self.socket_path = socket_path
        self.url = f"unix://{socket_path}"
        self.timeout_s = RPC_TIMEOUT_S if timeout_s is None else timeout_s

    def process_info(self, name: str) -> dict[str, Any]:
        """Return supervisord's getProcessInfo record for group:program name."""
        info: dict[str, Any] = self._call("getProcessInfo", name)
        return info

    def all_process_info(self) -> list[dict[str, Any]]:
        """Return supervisord's getAllProcessInfo records, one per program."""
        infos: list[dict[str, Any]] = self._call("getAllProcessInfo")
        return infos

    def read_main_log_tail(self, length_bytes: int) -> str:
        """Return the last length_bytes of supervisord's main log, its logfile."""
        text: str = self._call("readLog", -length_bytes, 0)
        return text

    def restart(self, name: str) -> RestartResult:
        """Stop and start group:program name as its state calls for, and check it runs after."""
        before = self.process_info(name)
        action = _ACTION_BY_STATE.get(before["statename"], "start")
        if action == "leave":
            return RestartResult(action, before["statename"], before["pid"],
                                 before["statename"], before["pid"])

        if action == "restart":
            # NOT_RUNNING: the program exited between the two calls, which is fine here.
            self._call("stopProcess", name, True, tolerate=FAULT_NOT_RUNNING)
        self._call("startProcess", name, True, tolerate=FAULT_ALREADY_STARTED)

        after = self.process_info(name)
        if after["statename"] != "RUNNING":
            raise RestartError(
                f"supervisord at {self.url}: {name} is {after['statename']} after the restart: "
                f"{after.get('description', '')}"
            )
        if action == "restart" and after["pid"] == before["pid"]:
            raise RestartError(
                f"supervisord at {self.url}: {name} still runs as pid {after['pid']} after the "
                "restart, so it was not restarted"
            )
        return RestartResult(action, before["statename"], before["pid"],
                             after["statename"], after["pid"])

    def _call(self, method: str, *args: Any, tolerate: int | None = None) -> Any:
        transport = UnixSocketTransport(self.socket_path, self.timeout_s)
        # supervisord serves XML-RPC at /RPC2, the path that ServerProxy uses by default.
        proxy = xmlrpc.client.ServerProxy("http://localhost", transport=transport)
        try:
            return getattr(proxy.supervisor, method)(*args)
        except xmlrpc.client.Fault as exc:
            if exc.faultCode == tolerate:
                return None
            hint = ""
            if exc.faultCode == FAULT_BAD_NAME:
                hint = ("; check supervisor.group and supervisor.uplink_program against the "
                        "programs in supervisord.conf")
            raise RestartError(
                f"supervisord at {self.url}: {method}({args[0] if args else ''}) failed: "
                f"{exc.faultString}{hint}"
            ) from exc
        except FileNotFoundError as exc:
            raise SupervisorUnavailableError(
                f"supervisord socket {self.socket_path} not found; is supervisord running?"
            ) from exc
        except ConnectionRefusedError as exc:
            raise SupervisorUnavailableError(
                f"supervisord socket {self.socket_path}: connection refused; "
                "supervisord is not listening there"
            ) from exc
        except TimeoutError as exc:
            raise SupervisorUnavailableError(
                f"supervisord at {self.url}: {method} timed out after {self.timeout_s:g} s"
            ) from exc
        except (OSError, http.client.HTTPException, xmlrpc.client.ProtocolError) as exc:
            raise SupervisorUnavailableError(
                f"supervisord at {self.url}: {method} failed: {exc}"
            ) from exc
        finally:
            transport.close()
