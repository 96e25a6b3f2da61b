"""One polling thread per device, so that a dead or slow PLC delays only its own tags.

Each DevicePoller owns one connection and the schedules of its device's tag groups. It reads
what is due, turns every response into Readings and puts them, with its tap events, on the
outbox queue. The reader's main thread owns the sample encoder, the sequence numbers, the
ingest socket and the tap, because ZeroMQ sockets must stay on one thread.

A group is due at next_due on the monotonic clock. A poll that ends after the next due time
skips the missed cycles instead of catching up in a burst, and counts them as overruns.
"""

from __future__ import annotations

import bisect
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from common.backoff import Backoff
from common.config import IdentitySettings, PlcDevice, PlcSettings, Tag
from common.logs import fields
from common.modbus_tags import ReadRequest, TagValue, decode_tag, invalid_value_reason
from common.ratelimit import RateLimit
from processes.plc_reader.client import PlcReadError
from processes.plc_reader.identity import (
    IdentityError,
    decode_identity,
    id_from_values,
    identity_requests,
)
from processes.plc_reader.report import ReportFilter
from processes.plc_reader.schedule import GroupSchedule
from processes.plc_reader.write_requests import (
    STATUS_FAILED,
    STATUS_OK,
    STATUS_REJECTED,
    WriteJob,
    expired,
)
from processes.plc_reader.writes import WriteRejected, prepare_write

RECONNECT_LOG_INTERVAL_S = 10.0

# Lateness of this many recent polls per device is kept for the tap's percentiles.
LATENESS_WINDOW = 2048

# Upper bounds, in milliseconds, of the lateness histogram's buckets; a last bucket takes
# the rest. The histogram counts every poll since the start, so two readings of it a minute
# apart give that minute's percentiles, which the window above cannot.
LATENESS_BOUNDS_MS = (0.5, 1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200, 300, 500,
                      700, 1000, 2000, 5000)
_LATENESS_BOUNDS_S = tuple(bound / 1000 for bound in LATENESS_BOUNDS_MS)


@dataclass(frozen=True, slots=True)
class Reading:
    """One tag's result from one poll: a value, or None and the reason it is bad."""

    tag: Tag
    value: TagValue | None
    reason: str
    ts_ms: int


# Outbox messages: ("readings", list[Reading]), ("event", kind, values) for the tap,
# ("identity", id), ("identity_unreachable", reason) and ("identity_invalid", error) from the
# identity device, ("written", route, result) with a write's result for the command socket,
# and ("crashed", device name, exception) when a polling thread fails.
Outbox = queue.SimpleQueue[tuple[Any, ...]]


class Connection(Protocol):
    endpoint: str
    unit_id: int

    @property
    def connected(self) -> bool: ...

    def connect(self) -> None: ...

    def close(self) -> None: ...

    def read(self, request: ReadRequest) -> list[int] | list[bool]: ...

    def write(self, tag: Tag, function_code: int, registers: list[int], coil: bool) -> None: ...


class DevicePoller:
    """Polls the tag groups of one device on a thread of its own."""

    def __init__(
        self,
        device: PlcDevice,
        settings: PlcSettings,
        schedules: list[GroupSchedule],
        connection: Connection,
        logger: logging.Logger,
        outbox: Outbox,
        identity: IdentitySettings | None = None,
    ) -> None:
        self.device = device
        self.schedules = schedules
        self._connection = connection
        self._logger = logger
        self._outbox = outbox
        self._pause_s = device.request_pause_ms / 1000
        self._last_request_end = 0.0
        self._backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        self._reconnect_log = RateLimit(RECONNECT_LOG_INTERVAL_S)
        self._report = ReportFilter()
        self._thread: threading.Thread | None = None

        # Writes from the cloud, run on this thread between polls. wake() ends the wait for
        # the next poll early, so a write does not wait for a slow group's next cycle.
        self._writes: queue.SimpleQueue[WriteJob] = queue.SimpleQueue()
        self._wake = threading.Event()

        # The serial-number identity is read on this device's own connection, because a
        # serial port can be opened only once. It is read before every poll until it
        # succeeds, then again after every reconnect, since a swapped PLC comes with one,
        # and every identity.recheck_interval_s for a swap that the link did not notice.
        self._identity = identity
        self._identity_due = identity is not None
        self._identity_next_check = math.inf
        self._identity_failed = False
        self._identity_error = ""
        self._connects = 0

        # Connection state: "starting" until the PLC first responds or fails, then
        # "connected" or "disconnected". Only a change of state is logged at WARNING or INFO.
        self.state = "starting"
        self._reconnect_at = 0.0
        self._down_since = 0.0
        self._down_reason = ""
        self._request_errors: dict[tuple[str, str, int, int | None], str] = {}
        self._invalid_tags: set[str] = set()

        # Counters, written only by this poller's thread and read by the main thread.
        self.polls = 0
        self.read_errors = 0
        self.overruns = 0
        self.lateness_s: deque[float] = deque(maxlen=LATENESS_WINDOW)
        self.lateness_counts = [0] * (len(LATENESS_BOUNDS_MS) + 1)
        # Wall-clock time of the last request that the PLC answered, in epoch milliseconds,
        # and the number of bad tags in the last poll of each group, for `plcbridge status`.
        self.last_good_ts_ms: int | None = None
        self.bad_tags_by_group: dict[str, int] = {}

    def start(self, stop: threading.Event) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(stop,), name=f"poll-{self.device.name}", daemon=True
        )
        self._thread.start()

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread to end after stop was set; return whether it ended."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def close(self) -> None:
        self._connection.close()

    def request_write(self, job: WriteJob) -> None:
        """Queue a write for this device's thread; called from the reader's main thread."""
        self._writes.put(job)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def _run(self, stop: threading.Event) -> None:
        # An unexpected error must stop the process, not leave one device silently unpolled.
        try:
            while not stop.is_set():
                # Cleared before the work, so a write queued during it ends the wait below.
                self._wake.clear()
                if self._identity_check_due():
                    self._read_identity()
                self.poll_due()
                self._run_writes()
                # A device with only the identity to read retries it once a second.
                next_due = min((schedule.next_due for schedule in self.schedules),
                               default=time.monotonic() + 1.0)
                self._wake.wait(max(next_due - time.monotonic(), 0.0))
        except Exception as exc:
            self._outbox.put(("crashed", self.device.name, exc))

    def _run_writes(self) -> None:
        while True:
            try:
                job = self._writes.get_nowait()
            except queue.Empty:
                return
            result = self._write(job)
            self._outbox.put(("written", job.route, result))

    def _write(self, job: WriteJob) -> dict[str, Any]:
        """Check, encode and send one write, and return its result for the uplink."""
        try:
            prepared = prepare_write(job.tag, job.value,
                                     self.device.multiple_write_functions_only)
        except WriteRejected as exc:
            return job.result(STATUS_REJECTED, exc.reason, str(exc))
        if not self._ensure_connected():
            return job.result(STATUS_FAILED, self._down_reason,
                              f"device {self.device.name} is unreachable, so nothing was "
                              "written")

        # Checked last, right before the request goes out: after its deadline the uplink has
        # reported a timeout, and a write sent later would surprise whoever sent it.
        self._pause_before_request()
        late = expired(job)
        if late is not None:
            return late
        try:
            self._connection.write(prepared.tag, prepared.function_code,
                                   list(prepared.registers), prepared.coil)
        except PlcReadError as exc:
            if exc.connection_lost:
                self._on_link_failure(exc)
            self._logger.warning("write_failed %s", fields(
                device=self.device.name, tag=job.tag.name, request_id=job.request_id,
                error=exc))
            message = str(exc)
            if exc.reason == "timeout":
                message += "; the PLC may or may not have taken the value"
            return job.result(STATUS_FAILED, exc.reason, message)
        finally:
            self._last_request_end = time.monotonic()
        self._logger.info("tag_written %s", fields(
            device=self.device.name, tag=job.tag.name, request_id=job.request_id,
            function_code=prepared.function_code))
        return job.result(STATUS_OK)

    def poll_due(self) -> None:
        """Poll every group that is due now."""
        now = time.monotonic()
        for schedule in self.schedules:
            if schedule.next_due > now:
                continue
            started = time.monotonic()
            lateness_s = started - schedule.next_due
            self.lateness_s.append(lateness_s)
            self.lateness_counts[bisect.bisect_left(_LATENESS_BOUNDS_S, lateness_s)] += 1
            self._poll_group(schedule)
            finished = time.monotonic()
            self.overruns += schedule.advance(finished)
            if self._logger.isEnabledFor(logging.DEBUG):
                self._logger.debug(
                    "poll %s",
                    fields(
                        device=self.device.name,
                        group=schedule.name,
                        duration_ms=round((finished - started) * 1000, 2),
                    ),
                )

    def _poll_group(self, schedule: GroupSchedule) -> None:
        self.polls += 1
        connects = self._connects
        readings: list[Reading] = []
        for request in schedule.requests:
            readings += self._read(request)
        self.bad_tags_by_group[schedule.name] = sum(
            reading.value is None for reading in readings)
        # After a reconnect in this poll, the id is read before the readings are posted, so
        # the reader learns of a swapped PLC before it gets the new PLC's samples.
        if self._identity_due and self._connects != connects:
            self._read_identity()
        if readings:
            self._outbox.put(("readings", readings))

    def _read(self, request: ReadRequest) -> list[Reading]:
        """Read one request and return its readings, bad ones when the read failed."""
        if not self._ensure_connected():
            self.read_errors += 1
            return self._bad_readings(request.tags, self._down_reason)

        self._pause_before_request()
        try:
            values = self._connection.read(request)
        except PlcReadError as exc:
            self.read_errors += 1
            if exc.connection_lost:
                self._on_link_failure(exc)
            else:
                self._on_link_up()
                self._on_request_error(request, exc)
            return self._bad_readings(request.tags, exc.reason)
        finally:
            self._last_request_end = time.monotonic()

        ts_ms = time.time_ns() // 1_000_000
        self.last_good_ts_ms = ts_ms
        self._on_link_up()
        self._on_request_ok(request)
        return self._good_readings(request, values, ts_ms)

    def _read_identity(self) -> None:
        """Read the serial-number id and post it; post the first failure, and each new error."""
        settings = self._identity
        assert settings is not None
        if not self._ensure_connected():
            self._post_identity_failure(self._down_reason)
            return
        try:
            values: dict[str, int] = {}
            for request in identity_requests(settings, self.device):
                self._pause_before_request()
                registers = self._connection.read(request)
                self._last_request_end = time.monotonic()
                values.update(decode_identity(settings, request, registers))
            plc_id = id_from_values(settings, values)
        except PlcReadError as exc:
            if exc.connection_lost:
                self._on_link_failure(exc)
            self._post_identity_failure(exc.reason)
            return
        except IdentityError as exc:
            if str(exc) != self._identity_error:
                self._identity_error = str(exc)
                self._outbox.put(("identity_invalid", str(exc)))
            return
        self._identity_due = False
        self._identity_error = ""
        if settings.recheck_interval_s > 0:
            self._identity_next_check = time.monotonic() + settings.recheck_interval_s
        self._outbox.put(("identity", plc_id))

    def _identity_check_due(self) -> bool:
        return self._identity_due or time.monotonic() >= self._identity_next_check

    def _post_identity_failure(self, reason: str) -> None:
        if not self._identity_failed:
            self._identity_failed = True
            self._outbox.put(("identity_unreachable", reason))

    def _pause_before_request(self) -> None:
        # Some PLCs and serial gateways drop a request that follows the last reply too soon.
        if self._pause_s:
            remaining = self._last_request_end + self._pause_s - time.monotonic()
            if remaining > 0:
                time.sleep(remaining)

    def _good_readings(
        self, request: ReadRequest, values: list[int] | list[bool], ts_ms: int
    ) -> list[Reading]:
        readings = []
        now_s = time.monotonic()
        for tag in request.tags:
            value = decode_tag(tag, values, request.address)
            reason = invalid_value_reason(value)
            if reason is not None:
                self._on_invalid_value(tag, reason)
                if self._report.should_report(tag, None, reason, now_s):
                    readings.append(Reading(tag, None, reason, ts_ms))
                continue
            if self._invalid_tags and tag.name in self._invalid_tags:
                self._invalid_tags.discard(tag.name)
                self._logger.info("value_recovered %s", fields(tag=tag.name))
            if self._report.should_report(tag, value, "", now_s):
                readings.append(Reading(tag, value, "", ts_ms))
        return readings

    def _bad_readings(self, tags: tuple[Tag, ...], reason: str) -> list[Reading]:
        ts_ms = time.time_ns() // 1_000_000
        now_s = time.monotonic()
        return [
            Reading(tag, None, reason, ts_ms)
            for tag in tags
            if self._report.should_report(tag, None, reason, now_s)
        ]

    def _on_invalid_value(self, tag: Tag, reason: str) -> None:
        if tag.name in self._invalid_tags:
            return
        self._invalid_tags.add(tag.name)
        self._logger.warning(
            "value_invalid %s",
            fields(
                tag=tag.name,
                table=tag.table,
                address=tag.address,
                reason=reason,
                consequence="the tag reads as bad until the PLC writes a finite value",
            ),
        )

    def _event(self, kind: str, **values: Any) -> None:
        self._outbox.put(("event", kind, values))

    def _ensure_connected(self) -> bool:
        """Connect when the backoff allows, and return whether a connection is open."""
        if self._connection.connected:
            return True
        if time.monotonic() < self._reconnect_at:
            return False

        try:
            self._connection.connect()
        except PlcReadError as exc:
            self._on_link_failure(exc)
            return False
        self._connects += 1
        if self._identity is not None:
            self._identity_due = True
        self._logger.debug(
            "plc_link_open %s", fields(device=self.device.name, endpoint=self._connection.endpoint)
        )
        return True

    def _on_link_up(self) -> None:
        """Mark the PLC reachable once it responds to a request, not when the link opens.

        A PLC that accepts connections but never responds would otherwise flap between
        connected and disconnected at every reconnect, and reset the backoff each time.
        """
        if self.state == "connected":
            return
        self._backoff.reset()
        endpoint = self._connection.endpoint
        where = fields(device=self.device.name, endpoint=endpoint, unit_id=self.device.unit_id)
        if self.state == "disconnected":
            down_s = round(time.monotonic() - self._down_since, 1)
            self._logger.info("plc_reconnected %s down_s=%s", where, down_s)
        else:
            self._logger.info("plc_connected %s", where)
        self.state = "connected"
        self._event("plc_connected", device=self.device.name, endpoint=endpoint)

    def _on_link_failure(self, exc: PlcReadError) -> None:
        """Schedule the next connect attempt and log the failure if it changes the state."""
        delay_s = self._backoff.next_delay_s()
        now = time.monotonic()
        self._reconnect_at = now + delay_s
        self._down_reason = exc.reason
        if self.state == "disconnected":
            self._log_reconnect_failed(exc, delay_s)
            return

        event = "plc_disconnected" if self.state == "connected" else "plc_unreachable"
        self._down_since = now
        self.state = "disconnected"
        self._request_errors.clear()
        self._logger.warning(
            "%s %s",
            event,
            fields(
                device=self.device.name,
                error=exc,
                retry_in_s=round(delay_s, 2),
                consequence="every tag of this device reads as bad until the PLC answers "
                "again",
            ),
        )
        self._event(
            "plc_disconnected",
            device=self.device.name,
            endpoint=self._connection.endpoint,
            reason=exc.reason,
        )
        self._event("error", message=str(exc))

    def _log_reconnect_failed(self, exc: PlcReadError, delay_s: float) -> None:
        # The backoff already spaces the attempts, and the rate limit keeps a short
        # plc.reconnect_max_s from filling the log during a long outage.
        suppressed = self._reconnect_log.allow()
        if suppressed is not None:
            self._logger.info(
                "plc_reconnect_failed %s",
                fields(
                    device=self.device.name,
                    attempt=self._backoff.attempts,
                    error=exc,
                    retry_in_s=round(delay_s, 2),
                    suppressed=suppressed,
                ),
            )

    def _on_request_error(self, request: ReadRequest, exc: PlcReadError) -> None:
        key = (request.group, request.table, request.address, request.unit_id)
        if self._request_errors.get(key) == exc.reason:
            return
        self._request_errors[key] = exc.reason
        names = ",".join(tag.name for tag in request.tags)
        self._logger.warning(
            "read_failed %s",
            fields(
                device=self.device.name, error=exc, tags=names,
                consequence="these tags read as bad",
            ),
        )
        self._event("error", message=str(exc), tags=names)

    def _on_request_ok(self, request: ReadRequest) -> None:
        key = (request.group, request.table, request.address, request.unit_id)
        if self._request_errors.pop(key, None) is not None:
            self._logger.info(
                "read_recovered %s",
                fields(
                    device=self.device.name,
                    group=request.group,
                    table=request.table,
                    address=request.address,
                ),
            )
