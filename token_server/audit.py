"""The token server's audit log: one JSON object a line for every issue and every refusal."""

from __future__ import annotations

import json
import os
import stat
import threading
from datetime import UTC, datetime
from pathlib import Path

from common.errors import ConfigError

ISSUED = "issued"
REFUSED = "refused"


class AuditLog:
    """Appends records to a file that only the server's user can read.

    A record holds time, client, serial, device_id, method, outcome and reason, and
    expiry_s for an issued token. It never holds a token, a key, a secret or a MAC.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.exists() and not path.is_file():
            raise ConfigError(f"{path}: audit_log_file is not a regular file; name a file in a "
                              "folder that only the server's user can write")
        # O_NONBLOCK stops a FIFO created after the check above from blocking the start until
        # a reader opens it. It does not change writes to a regular file.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            self._fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"{path}: cannot open audit_log_file for appending: {exc.strerror or exc}; "
                "check that its folder exists and is writable by the server's user"
            ) from exc
        if not stat.S_ISREG(os.fstat(self._fd).st_mode):
            os.close(self._fd)
            raise ConfigError(f"{path}: audit_log_file is not a regular file; name a file in a "
                              "folder that only the server's user can write")
        self._lock = threading.Lock()

    def record(self, client: str, outcome: str, reason: str, serial: str | None = None,
               device_id: str | None = None, method: str | None = None,
               expiry_s: int | None = None) -> None:
        entry: dict[str, object] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "client": client,
            "serial": serial,
            "device_id": device_id,
            "method": method,
            "outcome": outcome,
            "reason": reason,
        }
        if expiry_s is not None:
            entry["expiry_s"] = expiry_s
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        # One write() per line with O_APPEND, so lines from the request threads never mix.
        with self._lock:
            os.write(self._fd, line)

    def close(self) -> None:
        os.close(self._fd)

