"""The PLC reader process: polls Modbus TCP tags on a schedule and sends samples to the buffer.

    python -m processes.plc_reader --config FILE

Each tag group is polled every poll_interval_ms on the monotonic clock. A poll that ends
after the next due time skips the missed cycles instead of catching up in a burst, and
counts them as overruns. Every tag of every due poll yields one sample: good with its
value, or bad with a reason when the read failed or the PLC is unreachable. Samples go to
the buffer through processes.plc_reader.sender, whose sends never block the polls.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq

from common import wire
from common.backoff import Backoff
from common.config import Config, Tag
from common.errors import ConfigError, PlcBridgeError
from common.lifecycle import run_process
from common.logs import fields
from common.modbus_tags import ReadRequest, decode_tag, invalid_value_reason, plan_requests
from common.ratelimit import RateLimit
from common.tap import Tap
from processes.plc_reader.client import PlcConnection, PlcReadError
from processes.plc_reader.epoch import advance_epoch
from processes.plc_reader.lock import ReaderLock
from processes.plc_reader.samples import SampleEncoder
from processes.plc_reader.sender import IngestSender, Sample

PROCESS = "plc_reader"

# Maximum time the loop waits for acks before it checks the stop event again.
MAX_WAIT_S = 0.1

# On SIGTERM the reader waits this long for the buffer to acknowledge what it holds.
FLUSH_TIMEOUT_S = 2.0

RECONNECT_LOG_INTERVAL_S = 10.0


@dataclass
class GroupSchedule:
    """The requests of one tag group and the monotonic time of its next poll."""

    name: str
    interval_s: float
    next_due: float
    requests: list[ReadRequest]

    def advance(self, now: float) -> int:
        """Move next_due one interval on, past any cycles already missed, and count those."""
        self.next_due += self.interval_s
        if self.next_due > now:
            return 0
        missed = int((now - self.next_due) // self.interval_s) + 1
        self.next_due += missed * self.interval_s
        return missed


def build_schedules(config: Config, start: float) -> list[GroupSchedule]:
    """Plan the read requests of every tag group, or raise ConfigError for an unreadable tag."""
    plc = config.plc
    try:
        requests = plan_requests(plc.tags, plc.max_registers_per_read, plc.max_gap_registers)
    except ValueError as exc:
        raise ConfigError(f"{config.path}: {exc}") from exc

    schedules = []
    for group in plc.tag_groups:
        members = [request for request in requests if request.group == group.name]
        if members:
            schedules.append(
                GroupSchedule(group.name, group.poll_interval_ms / 1000, start, members)
            )
    return schedules


class PlcReader:
    """Polls the PLC, turns every read into samples and hands them to the sender."""

    def __init__(
        self,
        config: Config,
        logger: logging.Logger,
        connection: PlcConnection,
        sender: IngestSender,
        tap: Tap,
        epoch: int,
    ) -> None:
        self._logger = logger
        self._connection = connection
        self._sender = sender
        self._tap = tap
        self._epoch = epoch
        self._encoder = SampleEncoder(epoch)
        self._next_seq = 0
        self._backoff = Backoff(config.plc.reconnect_min_s, config.plc.reconnect_max_s)
        self._reconnect_log = RateLimit(RECONNECT_LOG_INTERVAL_S)

        # Connection state: "starting" until the PLC first responds or fails, then
        # "connected" or "disconnected". Only a change of state is logged at WARNING or INFO.
        self._state = "starting"
        self._reconnect_at = 0.0
        self._down_since = 0.0
        self._down_reason = ""
        self._request_errors: dict[tuple[str, str, int], str] = {}
        self._invalid_tags: set[str] = set()

        self.polls = 0
        self.read_errors = 0
        self.samples = 0
        self.overruns = 0

    def run(self, schedules: list[GroupSchedule], stop: threading.Event) -> None:
        """Poll due groups and wait for acks in between, until stop is set."""
        while not stop.is_set():
            self._poll_due(schedules)
            self._sender.pump()
            self._publish_counters()

            next_due = min(schedule.next_due for schedule in schedules)
            wait_s = min(max(next_due - time.monotonic(), 0.0), MAX_WAIT_S)
            self._sender.wait_for_acks(wait_s)

    def counters(self) -> dict[str, Any]:
        """Return the tap counters.

        read_errors counts every request that gave bad samples, including the requests not
        sent while the PLC is unreachable.
        """
        return {
            "polls": self.polls,
            "read_errors": self.read_errors,
            "samples": self.samples,
            "dropped_samples": self._sender.dropped_samples,
            "overruns": self.overruns,
            "pending_samples": self._sender.pending_samples,
            "unacked_batches": self._sender.unacked_batches,
            "epoch": self._epoch,
            "plc_connected": self._state == "connected",
        }

    def _publish_counters(self) -> None:
        self._tap.counters = self.counters()
        self._tap.publish_counters_if_due()

    def _poll_due(self, schedules: list[GroupSchedule]) -> None:
        now = time.monotonic()
        for schedule in schedules:
            if schedule.next_due > now:
                continue
            started = time.monotonic()
            self._poll_group(schedule)
            finished = time.monotonic()
            self.overruns += schedule.advance(finished)
            if self._logger.isEnabledFor(logging.DEBUG):
                duration_ms = round((finished - started) * 1000, 2)
                self._logger.debug(
                    "poll %s", fields(group=schedule.name, duration_ms=duration_ms)
                )

    def _poll_group(self, schedule: GroupSchedule) -> None:
        self.polls += 1
        samples: list[Sample] = []
        for request in schedule.requests:
            samples += self._read(request)
        self.samples += len(samples)
        self._sender.enqueue(samples)

    def _read(self, request: ReadRequest) -> list[Sample]:
        """Read one request and return its samples, bad ones when the read failed."""
        if not self._ensure_connected():
            self.read_errors += 1
            return self._bad_samples(request.tags, self._down_reason)

        try:
            values = self._connection.read(request)
        except PlcReadError as exc:
            self.read_errors += 1
            if exc.connection_lost:
                self._on_link_failure(exc)
            else:
                self._on_link_up()
                self._on_request_error(request, exc)
            return self._bad_samples(request.tags, exc.reason)

        ts_ms = time.time_ns() // 1_000_000
        self._on_link_up()
        self._on_request_ok(request)
        return self._good_samples(request, values, ts_ms)

    def _good_samples(
        self, request: ReadRequest, values: list[int] | list[bool], ts_ms: int
    ) -> list[Sample]:
        samples = []
        for tag in request.tags:
            value = decode_tag(tag, values, request.address)
            reason = invalid_value_reason(value)
            if reason is not None:
                self._on_invalid_value(tag, reason)
                samples.append(self._bad_sample(tag, reason, ts_ms))
                continue
            if self._invalid_tags and tag.name in self._invalid_tags:
                self._invalid_tags.discard(tag.name)
                self._logger.info("value_recovered %s", fields(tag=tag.name))
            samples.append(self._encoder.good(tag.name, value, ts_ms, self._next_seq, tag.unit))
            self._next_seq += 1
        return samples

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

    def _bad_samples(self, tags: tuple[Tag, ...], reason: str) -> list[Sample]:
        ts_ms = time.time_ns() // 1_000_000
        return [self._bad_sample(tag, reason, ts_ms) for tag in tags]

    def _bad_sample(self, tag: Tag, reason: str, ts_ms: int) -> Sample:
        sample = self._encoder.bad(tag.name, reason, ts_ms, self._next_seq)
        self._next_seq += 1
        return sample

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
        self._logger.debug("tcp_connected %s", fields(endpoint=self._connection.endpoint))
        return True

    def _on_link_up(self) -> None:
        """Mark the PLC reachable once it responds to a request, not when TCP connects.

        A PLC that accepts connections but never responds would otherwise flap between
        connected and disconnected at every reconnect, and reset the backoff each time.
        """
        if self._state == "connected":
            return
        self._backoff.reset()
        endpoint = self._connection.endpoint
        if self._state == "disconnected":
            down_s = round(time.monotonic() - self._down_since, 1)
            self._logger.info(
                "plc_reconnected %s",
                fields(endpoint=endpoint, unit_id=self._connection.unit_id, down_s=down_s),
            )
        else:
            self._logger.info(
                "plc_connected %s", fields(endpoint=endpoint, unit_id=self._connection.unit_id)
            )
        self._state = "connected"
        self._tap.publish("plc_connected", endpoint=endpoint)

    def _on_link_failure(self, exc: PlcReadError) -> None:
        """Schedule the next connect attempt and log the failure if it changes the state."""
        delay_s = self._backoff.next_delay_s()
        now = time.monotonic()
        self._reconnect_at = now + delay_s
        self._down_reason = exc.reason
        if self._state == "disconnected":
            self._log_reconnect_failed(exc, delay_s)
            return

        event = "plc_disconnected" if self._state == "connected" else "plc_unreachable"
        self._down_since = now
        self._state = "disconnected"
        self._request_errors.clear()
        self._logger.warning(
            "%s %s",
            event,
            fields(
                error=exc,
                retry_in_s=round(delay_s, 2),
                consequence="every tag reads as bad until the PLC answers again",
            ),
        )
        self._tap.publish("plc_disconnected", endpoint=self._connection.endpoint, reason=exc.reason)
        self._tap.publish("error", message=str(exc))

    def _log_reconnect_failed(self, exc: PlcReadError, delay_s: float) -> None:
        # The backoff already spaces the attempts, and the rate limit keeps a short
        # plc.reconnect_max_s from filling the log during a long outage.
        suppressed = self._reconnect_log.allow()
        if suppressed is not None:
            self._logger.info(
                "plc_reconnect_failed %s",
                fields(
                    attempt=self._backoff.attempts,
                    error=exc,
                    retry_in_s=round(delay_s, 2),
                    suppressed=suppressed,
                ),
            )

    def _on_request_error(self, request: ReadRequest, exc: PlcReadError) -> None:
        key = (request.group, request.table, request.address)
        if self._request_errors.get(key) == exc.reason:
            return
        self._request_errors[key] = exc.reason
        names = ",".join(tag.name for tag in request.tags)
        self._logger.warning(
            "read_failed %s",
            fields(error=exc, tags=names, consequence="these tags read as bad"),
        )
        self._tap.publish("error", message=str(exc), tags=names)

    def _on_request_ok(self, request: ReadRequest) -> None:
        key = (request.group, request.table, request.address)
        if self._request_errors.pop(key, None) is not None:
            self._logger.info(
                "read_recovered %s",
                fields(group=request.group, table=request.table, address=request.address),
            )


def run_reader(config: Config, logger: logging.Logger, stop: threading.Event) -> None:
    """Poll the PLC and send samples to the buffer until stop is set."""
    schedules = build_schedules(config, time.monotonic())

    # The lock comes before the epoch, so a second reader started by hand fails without
    # taking an epoch, which would make the buffer reject this reader's batches.
    lock = ReaderLock.acquire(config.gateway.state_dir)
    try:
        epoch = advance_epoch(config.gateway.state_dir)
        run_epoch(config, logger, stop, schedules, epoch)
    finally:
        lock.release()


def run_epoch(
    config: Config,
    logger: logging.Logger,
    stop: threading.Event,
    schedules: list[GroupSchedule],
    epoch: int,
) -> None:
    """Open the tap, the PLC connection and the ingest socket, and poll until stop is set."""
    try:
        config.gateway.runtime_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PlcBridgeError(
            f"cannot create gateway.runtime_dir {config.gateway.runtime_dir}: {exc}"
        ) from exc

    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    tap = Tap(context, config.gateway.runtime_dir, PROCESS)
    endpoint = wire.endpoint(config.gateway.runtime_dir, wire.INGEST)
    connection = PlcConnection(config.plc, logger)
    sender: IngestSender | None = None
    try:
        sender = IngestSender(context, endpoint, config.plc, epoch, logger, tap)
        reader = PlcReader(config, logger, connection, sender, tap, epoch)
        request_count = sum(len(schedule.requests) for schedule in schedules)
        logger.info(
            "reader_start %s",
            fields(
                epoch=epoch,
                plc=connection.endpoint,
                unit_id=config.plc.unit_id,
                tags=len(config.plc.tags),
                requests=request_count,
                ingest=endpoint,
            ),
        )
        tap.publish("start", epoch=epoch, plc=connection.endpoint, requests=request_count)

        reader.run(schedules, stop)

        logger.info(
            "reader_stopping %s",
            fields(
                pending_samples=sender.pending_samples,
                unacked_batches=sender.unacked_batches,
                flush_timeout_s=FLUSH_TIMEOUT_S,
            ),
        )
        sender.flush(FLUSH_TIMEOUT_S)

        # The totals let an operator, or a test, tell whether the epoch's tail reached the buffer.
        counters = reader.counters()
        logger.info(
            "reader_stopped %s",
            fields(
                epoch=epoch,
                samples=counters["samples"],
                dropped_samples=counters["dropped_samples"],
                unsent_samples=counters["pending_samples"],
                unacked_batches=counters["unacked_batches"],
            ),
        )
        tap.publish("stop", **counters)
    finally:
        connection.close()
        if sender is not None:
            sender.close()
        tap.close()
        context.term()


def main() -> int:
    return run_process(PROCESS, run_reader)

