"""The uplink's health monitor: gathers the gateway's figures, raises alerts, writes status.

The uplink hosts the monitor because it alone can tell the cloud. Once a second, on the
uplink's main thread, the monitor:

- reads the reader's counters from the reader's tap, through a SUB socket;
- reads the buffer's figures from <runtime_dir>/buffer-status.json;
- reads every program's state and pid from supervisord, and counts its restarts from the
  spawns in supervisord's main log, every SUPERVISOR_POLL_S;
- takes the link figures and the credential and clock events from the uplink itself;
- raises and clears the alerts of common/alerts.py against the [alerts] thresholds;
- writes everything to <runtime_dir>/health-status.json for `plcbridge status`.

Alert changes and the periodic health message go to the cloud as telemetry messages whose
topic carries the property plcbridge-kind=alert or plcbridge-kind=health.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import zmq

from common import alerts, wire
from common.alerts import AlertBook
from common.config import Config
from common.logs import fields
from common.supervisor_rpc import RestartError, SupervisorClient, SupervisorUnavailableError
from processes.uplink_restarts import LOG_TAIL_BYTES, restart_times_ms

HEALTH_FILE = "health-status.json"
BUFFER_STATUS_FILE = "buffer-status.json"  # the name that processes/buffer.py writes

# The buffer and the reader report once a second; older figures mean the process is gone.
STALE_AFTER_S = 5.0

# supervisord is asked this often, with this timeout, so a hung supervisord delays the
# uplink's main loop by at most SUPERVISOR_TIMEOUT_S every SUPERVISOR_POLL_S.
SUPERVISOR_POLL_S = 5.0
SUPERVISOR_TIMEOUT_S = 2.0

# supervisord states of a program that does not stay up.
FAILING_STATES = ("BACKOFF", "FATAL", "EXITED")

# Page numbers of the messages that are not pages: an alert change is sent as -seq, so its
# PUBACK names the change, and a health message as HEALTH_PAGE_SEQ.
HEALTH_PAGE_SEQ = -(2**62)


@dataclass(frozen=True)
class LinkFigures:
    """The uplink's own figures at one tick."""

    connected: bool
    since_ts_ms: int
    publish_rate: float
    pages_published: int
    pubacks: int
    reconnects: int
    outstanding: int
    token_expiry_s: int | None


@dataclass
class ProgramRecord:
    """Last state, pid and recent restarts of one supervisord program."""

    state: str = "UNKNOWN"
    pid: int = 0
    start_s: int = 0
    restart_ts_ms: list[int] = field(default_factory=list)


class HealthMonitor:
    def __init__(self, config: Config, logger: logging.Logger, book: AlertBook,
                 context: zmq.Context[zmq.Socket[bytes]], credentials: str) -> None:
        self._config = config
        self._settings = config.alerts
        self._logger = logger
        self.book = book
        self._credentials_scheme = credentials
        self._runtime_dir = config.gateway.runtime_dir
        self._path = self._runtime_dir / HEALTH_FILE

        self._reader_tap = wire.make_socket(context, zmq.SUB, wire.TAP_HWM, linger_ms=0)
        self._reader_tap.setsockopt(zmq.SUBSCRIBE, b"")
        self._reader_tap.connect(wire.tap_endpoint(self._runtime_dir, "plc_reader"))
        self._reader: dict[str, Any] = {}
        self._reader_at = 0.0

        self._supervisor = SupervisorClient(config.supervisor_socket, SUPERVISOR_TIMEOUT_S)
        self._supervisor_reachable = False
        self._spawns_readable = True
        self._next_supervisor_poll = 0.0
        self._programs: dict[str, ProgramRecord] = self._load_programs()

        self._credential_states: dict[str, dict[str, str]] = {}
        # "unknown" until the credential guard reports or a connect succeeds, so that a
        # restarted uplink neither clears nor raises the clock alert before the clock is judged.
        self._clock: dict[str, Any] = {"state": "unknown", "offset_s": 0.0}
        # Which credential set the uplink connects with, and what the hub rejected.
        self._credential_set: dict[str, Any] = {"active": "current", "rejected_files": [],
                                                "last_good_saved_ms": None}
        self._last_puback_ms: int | None = None
        self._last_puback_at: float | None = None
        self._waiting_since: float | None = None
        self._drops_total: int | None = None
        self._last_drop_at = 0.0
        self._plc_down_since: dict[str, float] = {}
        self._sent_on: dict[int, int] = {}  # alert change seq -> connection it was sent on
        self._next_health_at = time.monotonic() + self._settings.health_interval_s
        # Replaced whole at each tick, so the metrics thread can read it without a lock.
        self.last_snapshot: dict[str, Any] | None = None

    # -- events from the uplink -------------------------------------------------------------

    def on_tap_event(self, kind: str, values: dict[str, Any]) -> None:
        """Take the credential and clock states from the credential guard's events."""
        if kind == "credential_check":
            self._credential_states[str(values.get("credential"))] = {
                "state": str(values.get("state")), "message": str(values.get("message"))}
        elif kind == "clock_behind":
            self._clock["state"] = "behind"
        elif kind == "clock_ok":
            self._clock["state"] = "ok"
        elif kind == "clock_offset":
            self._clock["offset_s"] = values.get("offset_s", 0.0)
        elif kind == "rotation_rejected":
            self._credential_set["rejected_files"] = list(values.get("files", []))
            self._credential_set["last_good_saved_ms"] = values.get("saved_ms")
            self.book.raise_alert(alerts.ROTATION_REJECTED, str(values.get("detail")))

    def on_connected(self, last_good: bool = False) -> None:
        """Judge the clock right after a successful connect, unless the guard judged it wrong.

        A connect with the current credential files ends a rejected rotation.
        """
        if self._clock["state"] == "unknown":
            self._clock["state"] = "ok"
        if not last_good:
            self._credential_set.update(active="current", rejected_files=[],
                                        last_good_saved_ms=None)
            self.book.clear(alerts.ROTATION_REJECTED)

    def on_credential_set(self, last_good: bool) -> None:
        self._credential_set["active"] = "last_good" if last_good else "current"

    def on_puback(self) -> None:
        self._last_puback_ms = int(time.time() * 1000)
        self._last_puback_at = time.monotonic()

    def on_cloud_ack(self, page_seq: int) -> None:
        """Forget an alert change, or a health message, once the broker acknowledged it."""
        if page_seq == HEALTH_PAGE_SEQ:
            return
        self._sent_on.pop(-page_seq, None)
        self.book.mark_sent(-page_seq)

    # -- once a second ----------------------------------------------------------------------

    def tick(self, link: LinkFigures) -> None:
        self._drain_reader_tap()
        self._poll_supervisor_if_due()
        buffer = self._read_buffer_status()

        self._check_no_publish(link, buffer)
        self._check_credentials()
        self._check_clock()
        self._check_buffer_fill(buffer)
        self._check_drops(buffer)
        self._check_plc()
        self._check_restarts()

        self.last_snapshot = self.snapshot(link, buffer)
        self._write_status(self.last_snapshot)

    def cloud_messages(self, connection: int) -> list[tuple[int, bytes]]:
        """Return the alert changes not yet sent on this connection, as (page_seq, payload)."""
        messages = []
        for change in self.book.unsent:
            if self._sent_on.get(change.seq) == connection:
                continue
            self._sent_on[change.seq] = connection
            body = {"kind": "alert", "process": self.book.process, **asdict(change)}
            messages.append((-change.seq, json.dumps(body, separators=(",", ":")).encode()))
        return messages

    def health_message(self, link: LinkFigures) -> bytes | None:
        """Return the periodic health message when it is due, or None."""
        interval_s = self._settings.health_interval_s
        now = time.monotonic()
        if interval_s <= 0 or now < self._next_health_at:
            return None
        self._next_health_at = now + interval_s
        snapshot = self.snapshot(link, self._read_buffer_status())
        snapshot["kind"] = "health"
        return json.dumps(snapshot, separators=(",", ":"), default=str).encode()

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            document = json.loads(self._path.read_text())
            document["running"] = False
            self._write_status(document)
        self._reader_tap.close(linger=0)

    # -- inputs -----------------------------------------------------------------------------

    def _drain_reader_tap(self) -> None:
        while True:
            try:
                frames = self._reader_tap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = json.loads(frames[-1])
            except ValueError:
                continue
            if isinstance(message, dict) and message.get("kind") == "counters":
                self._reader = message
                self._reader_at = time.monotonic()

    def _reader_counters(self) -> dict[str, Any] | None:
        if not self._reader or time.monotonic() - self._reader_at > STALE_AFTER_S:
            return None
        return self._reader

    def _read_buffer_status(self) -> dict[str, Any] | None:
        """Return the buffer's figures, or None when the file is missing or stale."""
        try:
            status = json.loads((self._runtime_dir / BUFFER_STATUS_FILE).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(status, dict) or not status.get("running"):
            return None
        if time.time() - status.get("ts_ms", 0) / 1000 > STALE_AFTER_S:
            return None
        return status

    def _poll_supervisor_if_due(self) -> None:
        now = time.monotonic()
        if now < self._next_supervisor_poll:
            return
        self._next_supervisor_poll = now + SUPERVISOR_POLL_S
        try:
            infos = self._supervisor.all_process_info()
        except SupervisorUnavailableError as exc:
            # A gateway run without supervisord, as in development, has no program states.
            if self._supervisor_reachable:
                self._logger.warning(
                    "supervisord_unreachable %s",
                    fields(error=exc, consequence="program states and restart loops are "
                           "not watched until it answers"))
            self._supervisor_reachable = False
            return
        self._supervisor_reachable = True
        group = {str(info.get("name")): info for info in infos
                 if info.get("group") == self._config.supervisor.group}
        restarts = self._read_restarts(set(group))
        for name, info in group.items():
            self._note_program(name, info, None if restarts is None else restarts[name])

    def _read_restarts(self, programs: set[str]) -> dict[str, list[int]] | None:
        """Return each program's restart times from supervisord's main log, or None when
        the log cannot be read."""
        try:
            log_tail = self._supervisor.read_main_log_tail(LOG_TAIL_BYTES)
        except (SupervisorUnavailableError, RestartError) as exc:
            # The client reports every fault of supervisord, such as a missing logfile, as
            # RestartError.
            if self._spawns_readable:
                self._logger.warning(
                    "supervisord_log_unreadable %s",
                    fields(error=exc, consequence="restarts are counted from changes of pid "
                           "and can be undercounted when a program restarts quickly"))
            self._spawns_readable = False
            return None
        if not self._spawns_readable:
            self._logger.info("supervisord_log_readable")
        self._spawns_readable = True
        return restart_times_ms(log_tail, programs)

    def _note_program(self, name: str, info: dict[str, Any],
                      restarts: list[int] | None) -> None:
        record = self._programs.setdefault(name, ProgramRecord())
        pid = int(info.get("pid") or 0)
        state = str(info.get("statename"))
        if restarts is not None:
            record.restart_ts_ms = restarts
        else:
            # Without the log, a new pid, or a failure state entered, is one restart. Two
            # restarts between two polls show as one.
            restarted = pid and record.pid and pid != record.pid
            failed = state in FAILING_STATES and record.state not in FAILING_STATES
            # The provisioning program exits 0 when its work is done, which is no failure.
            finished = state == "EXITED" and info.get("exitstatus") == 0
            if restarted or (failed and not finished):
                record.restart_ts_ms.append(int(time.time() * 1000))
        if pid:
            record.pid = pid
        record.state = state
        record.start_s = int(info.get("start") or 0)

    def _load_programs(self) -> dict[str, ProgramRecord]:
        """Take over the restart history of the last run, so an uplink restart counts too."""
        try:
            document = json.loads(self._path.read_text())
            return {name: ProgramRecord(**record)
                    for name, record in document.get("programs", {}).items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}

    # -- alerts -----------------------------------------------------------------------------

    def _check_no_publish(self, link: LinkFigures, buffer: dict[str, Any] | None) -> None:
        """Raise when samples wait and nothing reached the broker for no_publish_s."""
        waiting = link.outstanding > 0
        if buffer is not None:
            waiting = waiting or buffer.get("pages", 0) > 0 or buffer.get("open_samples", 0) > 0
        now = time.monotonic()
        if not waiting:
            self._waiting_since = None
            self.book.clear(alerts.NO_PUBLISH)
            return

        if self._waiting_since is None:
            self._waiting_since = now
        since = max(self._waiting_since, self._last_puback_at or 0.0)
        silent_s = now - since
        pages = buffer.get("pages", 0) if buffer is not None else link.outstanding
        detail = (f"no page acknowledged for {silent_s:.0f} s while {pages} pages wait; "
                  f"the link is {'up' if link.connected else 'down'}")
        self.book.set(alerts.NO_PUBLISH, silent_s > self._settings.no_publish_s, detail)

    def _check_credentials(self) -> None:
        for credential, state in self._credential_states.items():
            self.book.set(alerts.CREDENTIALS, state["state"] != "valid", state["message"],
                          key=credential)

    def _check_clock(self) -> None:
        if self._clock["state"] == "unknown":
            return
        wrong = self._clock["state"] != "ok" or bool(self._clock.get("offset_s"))
        detail = (f"the wall clock is {self._clock['state']}, offset from the hub "
                  f"{self._clock.get('offset_s', 0)} s")
        self.book.set(alerts.CLOCK, wrong, detail)

    def _check_buffer_fill(self, buffer: dict[str, Any] | None) -> None:
        if buffer is None or not buffer.get("max_bytes"):
            return
        percent = 100.0 * buffer.get("bytes", 0) / buffer["max_bytes"]
        detail = f"the buffer is {percent:.1f} % full, {buffer.get('bytes', 0)} bytes"
        self.book.set(alerts.BUFFER_FULL, percent >= self._settings.buffer_fill_percent, detail)

    def _check_drops(self, buffer: dict[str, Any] | None) -> None:
        """Raise when the drop totals grow; clear after drops_clear_s without a new drop."""
        total = 0
        if buffer is not None:
            drops = buffer.get("dropped_by_reason") or {}
            total += sum(int(counts.get("samples", 0)) for counts in drops.values())
        reader = self._reader_counters()
        if reader is not None:
            total += int(reader.get("dropped_samples", 0))
        if buffer is None and reader is None:
            return

        now = time.monotonic()
        if self._drops_total is not None and total > self._drops_total:
            self._last_drop_at = now
            self.book.raise_alert(alerts.SAMPLES_DROPPED,
                                  f"{total - self._drops_total} samples dropped, "
                                  f"{total} since the processes started")
        elif now - self._last_drop_at > self._settings.drops_clear_s:
            self.book.clear(alerts.SAMPLES_DROPPED)
        # A restarted process starts its totals again from its store or from zero.
        self._drops_total = total

    def _check_plc(self) -> None:
        reader = self._reader_counters()
        if reader is None:
            return
        now = time.monotonic()
        for device, figures in (reader.get("devices") or {}).items():
            if figures.get("state") == "connected":
                self._plc_down_since.pop(device, None)
                self.book.clear(alerts.PLC_UNREACHABLE, device)
                continue
            down_since = self._plc_down_since.setdefault(device, now)
            down_s = now - down_since
            self.book.set(alerts.PLC_UNREACHABLE, down_s > self._settings.plc_unreachable_s,
                          f"PLC {device} has not answered for {down_s:.0f} s", key=device)

    def _check_restarts(self) -> None:
        window_ms = self._settings.restart_loop_window_s * 1000
        now_ms = int(time.time() * 1000)
        for name, record in self._programs.items():
            record.restart_ts_ms = [ts for ts in record.restart_ts_ms if now_ms - ts <= window_ms]
            looping = (len(record.restart_ts_ms) >= self._settings.restart_loop_count
                       or record.state == "FATAL")
            detail = (f"{name} restarted {len(record.restart_ts_ms)} times in "
                      f"{self._settings.restart_loop_window_s:g} s, now {record.state}")
            self.book.set(alerts.RESTART_LOOP, looping, detail, key=name)

    # -- the status file --------------------------------------------------------------------

    def snapshot(self, link: LinkFigures, buffer: dict[str, Any] | None) -> dict[str, Any]:
        now_s = time.time()
        expiry_s = link.token_expiry_s
        return {
            "ts_ms": int(now_s * 1000),
            "pid": os.getpid(),
            "running": True,
            "uplink": {
                "connected": link.connected,
                "since_ts_ms": link.since_ts_ms,
                "last_puback_ts_ms": self._last_puback_ms,
                "publish_rate": link.publish_rate,
                "pages_published": link.pages_published,
                "pubacks": link.pubacks,
                "reconnects": link.reconnects,
                "inflight": link.outstanding,
            },
            "credentials": {
                "scheme": self._credentials_scheme,
                "expiry_s": expiry_s,
                "time_left_s": None if expiry_s is None else int(expiry_s - now_s),
                "checks": self._credential_states,
                "clock": dict(self._clock),
                "set": dict(self._credential_set),
            },
            "plc": self._plc_snapshot(),
            "buffer": alerts.buffer_summary(buffer),
            "supervisord": "reachable" if self._supervisor_reachable else "unreachable",
            "programs": {name: asdict(record) for name, record in self._programs.items()},
            "alerts": self.book.open_alerts(),
        }

    def _plc_snapshot(self) -> dict[str, Any] | None:
        reader = self._reader_counters()
        if reader is None:
            return None
        keys = ("plc_connected", "devices_connected", "devices", "polls", "read_errors",
                "samples", "dropped_samples", "ts_ms")
        return {key: reader.get(key) for key in keys}

    def _write_status(self, document: dict[str, Any]) -> None:
        # Rewritten every second, so no fsync: after a power cut the file is stale anyway.
        temporary = self._path.with_name(f".{self._path.name}.tmp")
        try:
            temporary.write_text(json.dumps(document, default=str) + "\n")
            os.replace(temporary, self._path)
        except OSError as exc:
            self._logger.debug("health_status_not_written %s",
                               fields(path=self._path, error=exc.strerror or exc))

