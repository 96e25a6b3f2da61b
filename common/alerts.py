"""Health alerts: each is raised once and cleared once, logged, tapped and kept in a file.

An alert is open from the moment its condition becomes true until it is false again.
Raising an open alert again, or clearing a closed one, does nothing, so a caller can
report the condition on every check. A raise is logged at ERROR and a clear at INFO, and
both are published on the process's tap as kind "alert".

The open alerts, and the raises and clears not yet sent to the cloud, are written to
<runtime_dir>/alerts-<process>.json, replacing the file atomically. `plcbridge status`
reads the file, and a restarted process loads it, so a restart neither raises an open
alert a second time nor loses one that the cloud has not received yet.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.atomic_file import write_atomically
from common.logs import fields, redact

# Names of the alerts and what each one means, for the log, status and docs.
NO_PUBLISH = "no_publish"
CREDENTIALS = "credentials"
CLOCK = "clock"
BUFFER_FULL = "buffer_full"
SAMPLES_DROPPED = "samples_dropped"
PLC_UNREACHABLE = "plc_unreachable"
RESTART_LOOP = "restart_loop"
PROVISIONING = "provisioning"
# The hub rejected credential files that differ from the last set that connected.
ROTATION_REJECTED = "rotation_rejected"

ALERT_NAMES = (NO_PUBLISH, CREDENTIALS, CLOCK, BUFFER_FULL, SAMPLES_DROPPED, PLC_UNREACHABLE,
               RESTART_LOOP, PROVISIONING, ROTATION_REJECTED)

# The cloud queue keeps at most this many raises and clears. A link that is down for days
# with a flapping condition would otherwise grow the file without bound; the oldest go.
MAX_UNSENT = 100

# Callback that publishes an event on the process's tap: kind, then the event's values.
Publish = Callable[..., None]


def alerts_path(runtime_dir: Path, process: str) -> Path:
    return runtime_dir / f"alerts-{process}.json"


@dataclass(frozen=True)
class Alert:
    """One open alert. key distinguishes alerts of one name, such as one per PLC device."""

    name: str
    key: str
    detail: str
    raised_ts_ms: int


@dataclass(frozen=True)
class AlertChange:
    """A raise or a clear, as sent to the cloud."""

    seq: int
    state: str  # "raised" or "cleared"
    name: str
    key: str
    detail: str
    ts_ms: int


class AlertBook:
    """The open alerts of one process, with the changes the cloud has not acknowledged."""

    def __init__(self, process: str, runtime_dir: Path, logger: logging.Logger,
                 publish: Publish) -> None:
        self.process = process
        self.path = alerts_path(runtime_dir, process)
        self._logger = logger
        self._publish = publish
        self.open: dict[tuple[str, str], Alert] = {}
        self.unsent: list[AlertChange] = []
        self._next_seq = 1
        self._load()

    def set(self, name: str, active: bool, detail: str = "", key: str = "") -> None:
        """Raise the alert when active and not open, clear it when open and not active."""
        if active:
            self.raise_alert(name, detail, key)
        else:
            self.clear(name, key)

    def raise_alert(self, name: str, detail: str, key: str = "") -> None:
        if (name, key) in self.open:
            return
        now_ms = int(time.time() * 1000)
        detail = redact(detail)
        self.open[(name, key)] = Alert(name, key, detail, now_ms)
        self._logger.error("alert_raised %s", fields(alert=name, key=key or "-", detail=detail))
        self._change("raised", name, key, detail, now_ms)

    def clear(self, name: str, key: str = "") -> None:
        alert = self.open.pop((name, key), None)
        if alert is None:
            return
        now_ms = int(time.time() * 1000)
        open_s = (now_ms - alert.raised_ts_ms) / 1000
        self._logger.info("alert_cleared %s",
                          fields(alert=name, key=key or "-", open_s=f"{open_s:.1f}"))
        self._change("cleared", name, key, alert.detail, now_ms)

    def is_open(self, name: str, key: str = "") -> bool:
        return (name, key) in self.open

    def mark_sent(self, seq: int) -> None:
        """Forget a change once the cloud acknowledged it."""
        before = len(self.unsent)
        self.unsent = [change for change in self.unsent if change.seq != seq]
        if len(self.unsent) != before:
            self._save()

    def open_alerts(self) -> list[dict[str, Any]]:
        return [asdict(alert) for alert in self.open.values()]

    def _change(self, state: str, name: str, key: str, detail: str, ts_ms: int) -> None:
        change = AlertChange(self._next_seq, state, name, key, detail, ts_ms)
        self._next_seq += 1
        self.unsent = [*self.unsent, change][-MAX_UNSENT:]
        self._publish("alert", state=state, alert=name, key=key, detail=detail)
        self._save()

    def _save(self) -> None:
        document = {
            "process": self.process,
            "ts_ms": int(time.time() * 1000),
            "next_seq": self._next_seq,
            "open": self.open_alerts(),
            "unsent": [asdict(change) for change in self.unsent],
        }
        try:
            write_atomically(self.path, (json.dumps(document) + "\n").encode(), mode=0o644)
        except OSError as exc:
            self._logger.warning(
                "alerts_not_saved %s",
                fields(path=self.path, error=exc.strerror or exc,
                       consequence="plcbridge status shows stale alerts, and a restart may "
                       "raise an open alert again"),
            )

    def _load(self) -> None:
        """Take over the alerts that an earlier run of this process left open or unsent."""
        document = read_alerts_file(self.path)
        if document is None:
            return
        try:
            for item in document.get("open", []):
                alert = Alert(**item)
                self.open[(alert.name, alert.key)] = alert
            self.unsent = [AlertChange(**item) for item in document.get("unsent", [])]
            self._next_seq = int(document.get("next_seq", 1))
        except (TypeError, ValueError) as exc:
            # A file from another version: starting afresh only repeats a raise.
            self._logger.warning("alerts_file_ignored %s",
                                 fields(path=self.path, error=exc,
                                        consequence="open alerts are raised again"))
            self.open.clear()
            self.unsent = []


def read_alerts_file(path: Path) -> dict[str, Any] | None:
    """Return the alerts document at path, or None when it is missing or unreadable."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def buffer_summary(buffer: dict[str, Any] | None) -> dict[str, Any] | None:
    """Return the buffer figures that status shows, from the buffer's status document."""
    if buffer is None:
        return None
    drops = buffer.get("dropped_by_reason") or {}
    oldest = buffer.get("oldest_ts_ms")
    return {
        "pages": buffer.get("pages", 0),
        "bytes": buffer.get("bytes", 0),
        "max_bytes": buffer.get("max_bytes"),
        "oldest_sample_age_s": None if not oldest else round(time.time() - oldest / 1000, 1),
        "dropped_samples": sum(int(counts.get("samples", 0)) for counts in drops.values()),
        "dropped_by_reason": drops,
    }
