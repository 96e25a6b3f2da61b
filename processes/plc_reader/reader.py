"""The PLC reader process: polls Modbus tags on a schedule and sends samples to the buffer.

    python -m processes.plc_reader --config FILE

Each device is polled by its own thread (processes.plc_reader.poller), so a dead PLC never
delays another's schedule. Every tag of every due poll yields one reading: good with its
value, or bad with a reason when the read failed or the PLC is unreachable. A tag with a
deadband is reported only on a change (processes.plc_reader.report). This module's main
thread turns readings into samples with gapless sequence numbers and sends them to the
buffer through processes.plc_reader.sender, whose sends never block the polls.
"""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time
from typing import Any

import zmq

from common import wire
from common.config import Config
from common.errors import PlcBridgeError
from common.lifecycle import run_process
from common.logs import fields
from common.tap import Tap
from processes.plc_reader.client import PlcConnection
from processes.plc_reader.epoch import advance_epoch
from processes.plc_reader.identity import IdentityGate, IdentityStore
from processes.plc_reader.lock import ReaderLock
from processes.plc_reader.poller import LATENESS_BOUNDS_MS, DevicePoller, Outbox, Reading
from processes.plc_reader.samples import SampleEncoder
from processes.plc_reader.schedule import GroupSchedule, build_schedules
from processes.plc_reader.sender import IngestSender, Sample
from processes.plc_reader.write_requests import REASON_NO_POLLER, STATUS_FAILED, WriteServer

__all__ = ["GroupSchedule", "PlcReader", "build_schedules", "main", "run_reader"]

PROCESS = "plc_reader"

# Maximum time the main thread waits for acks before it takes new readings from the pollers.
# The pollers keep their own schedules, so this only delays the hand-over to the buffer.
MAX_WAIT_S = 0.01

# The lateness percentiles on the tap are recomputed at most this often.
LATENESS_INTERVAL_S = 0.5

# On SIGTERM the reader waits this long for the buffer to acknowledge what it holds.
FLUSH_TIMEOUT_S = 2.0


class ReaderCrashed(PlcBridgeError):
    """A polling thread failed unexpectedly; the process exits so supervisord restarts it."""


class PlcReader:
    """Runs the device pollers, turns their readings into samples and hands them to the sender."""

    def __init__(
        self,
        pollers: list[DevicePoller],
        outbox: Outbox,
        sender: IngestSender,
        tap: Tap,
        epoch: int,
        identity: IdentityGate | None = None,
        writes: WriteServer | None = None,
    ) -> None:
        self._pollers = pollers
        self._pollers_by_device = {poller.device.name: poller for poller in pollers}
        self._writes = writes
        self._identity = identity
        self._outbox = outbox
        self._sender = sender
        self._tap = tap
        self._epoch = epoch
        self._encoder = SampleEncoder(epoch)
        self._next_seq = 0
        self._next_lateness = 0.0
        self._lateness: dict[str, float | None] = {}
        self.samples = 0

    def run(self, stop: threading.Event) -> None:
        """Start the pollers, and send their samples until stop is set and they have ended."""
        for poller in self._pollers:
            poller.start(stop)
        try:
            while not stop.is_set():
                self._take_readings()
                self._take_write_requests()
                if self._identity is not None:
                    self._identity.check_confirmation()
                self._sender.pump()
                self._sender.wait_for_acks(MAX_WAIT_S)
                self._publish_counters()
        finally:
            # Also after a crashed poller, so that the other pollers end before the exit.
            stop.set()
            for poller in self._pollers:
                poller.wake()
            self._join_pollers()
        self._take_readings()

    def _join_pollers(self) -> None:
        # A poller in the middle of a read ends within its device's timeout.
        deadline = time.monotonic() + max(p.device.timeout_s for p in self._pollers) + 1.0
        for poller in self._pollers:
            poller.join(max(deadline - time.monotonic(), 0.0))

    def counters(self) -> dict[str, Any]:
        """Return the tap counters.

        read_errors counts every request that gave bad samples, including the requests not
        sent while a PLC is unreachable. lateness_ms_p50 and p99 are over the last polls of
        every device: how long after its due time each poll started. lateness_ms_buckets
        counts every poll since the start by that lateness, keyed by each bucket's upper
        bound in milliseconds, "inf" for the last.
        """
        identity = self._identity.counters() if self._identity is not None else {}
        return {
            **identity,
            "polls": sum(poller.polls for poller in self._pollers),
            "read_errors": sum(poller.read_errors for poller in self._pollers),
            "samples": self.samples,
            "dropped_samples": self._sender.dropped_samples,
            # The part of dropped_samples that the buffer rejected under reject-new.
            "rejected_samples": self._sender.rejected_samples,
            "overruns": sum(poller.overruns for poller in self._pollers),
            "pending_samples": self._sender.pending_samples,
            "unacked_batches": self._sender.unacked_batches,
            "epoch": self._epoch,
            "plc_connected": all(poller.state == "connected" for poller in self._pollers),
            "devices_connected": sum(poller.state == "connected" for poller in self._pollers),
            "devices": {
                poller.device.name: {
                    "state": poller.state,
                    "last_good_ts_ms": poller.last_good_ts_ms,
                    "bad_tags": sum(poller.bad_tags_by_group.values()),
                }
                for poller in self._pollers
            },
            **self._lateness_ms(),
            "lateness_ms_buckets": self._lateness_buckets(),
        }

    def _lateness_buckets(self) -> dict[str, int]:
        counts = [sum(column) for column in zip(
            *(poller.lateness_counts for poller in self._pollers), strict=True)]
        names = [f"{bound:g}" for bound in LATENESS_BOUNDS_MS] + ["inf"]
        return dict(zip(names, counts or [0] * len(names), strict=True))

    def _lateness_ms(self) -> dict[str, float | None]:
        # Sorting thousands of values at every loop pass would cost more than the rest of it.
        now = time.monotonic()
        if now >= self._next_lateness:
            self._next_lateness = now + LATENESS_INTERVAL_S
            # The polling threads append to their deques meanwhile. Iterating a deque that
            # grows raises RuntimeError, which stopped the reader; deque.copy() runs in C
            # under the interpreter lock, so no append comes in between.
            lateness = sorted(value for poller in self._pollers
                              for value in poller.lateness_s.copy())
            self._lateness = {
                "lateness_ms_p50": _percentile_ms(lateness, 0.50),
                "lateness_ms_p99": _percentile_ms(lateness, 0.99),
            }
        return self._lateness

    def _publish_counters(self) -> None:
        self._tap.counters = self.counters()
        self._tap.publish_counters_if_due()

    def _take_readings(self) -> None:
        """Encode every reading that the pollers queued and hand the samples to the sender."""
        while not self._outbox.empty():
            message = self._outbox.get_nowait()
            kind = message[0]
            if kind == "readings":
                self._enqueue(message[1])
            elif kind == "event":
                self._tap.publish(message[1], **message[2])
            elif kind == "written":
                self._on_written(message[1], message[2])
            elif kind.startswith("identity"):
                self._on_identity(kind, message[1])
            else:
                raise ReaderCrashed(
                    f"the polling thread of device {message[1]!r} failed: {message[2]!r}"
                ) from message[2]

    def _take_write_requests(self) -> None:
        """Hand each write request to the poller of its tag's device."""
        if self._writes is None:
            return
        jobs, answers = self._writes.receive()
        for route, result in answers:
            self._on_written(route, result)
        for job in jobs:
            poller = self._pollers_by_device.get(job.tag.device)
            if poller is None:
                self._on_written(job.route, job.result(
                    STATUS_FAILED, REASON_NO_POLLER,
                    f"device {job.tag.device} has no poller, so nothing was written"))
                continue
            poller.request_write(job)

    def _on_written(self, route: bytes, result: dict[str, Any]) -> None:
        assert self._writes is not None
        self._writes.answer(route, result)
        self._tap.publish("write", **{key: value for key, value in result.items()
                                      if key != "value"})

    def _on_identity(self, kind: str, detail: str) -> None:
        gate = self._identity
        if gate is None:
            return
        before = (gate.state, gate.plc_id)
        if kind == "identity":
            gate.on_read(detail)
        elif kind == "identity_unreachable":
            gate.on_unreachable(detail)
        else:
            gate.on_invalid(detail)
        if (gate.state, gate.plc_id) != before:
            self._tap.publish("identity", state=gate.state, plc_id=gate.plc_id,
                              stored_id=gate.stored_id)

    def _enqueue(self, readings: list[Reading]) -> None:
        # Samples read while the PLC's identity is unknown or changed are never sent, so
        # that no sample of a swapped PLC goes out under the old PLC's id.
        if self._identity is not None and not self._identity.open_for_samples:
            self._identity.withhold(len(readings))
            return
        samples: list[Sample] = []
        encoder = self._encoder
        seq = self._next_seq
        for reading in readings:
            if reading.value is None:
                samples.append(encoder.bad(reading.tag.name, reading.reason, reading.ts_ms, seq))
            else:
                samples.append(
                    encoder.good(
                        reading.tag.name, reading.value, reading.ts_ms, seq, reading.tag.unit
                    )
                )
            seq += 1
        self._next_seq = seq
        self.samples += len(samples)
        if self._tap.data_wanted:
            self._tap.publish_data(samples=json.loads(b"[" + b",".join(samples) + b"]"))
        self._sender.enqueue(samples)


def _percentile_ms(ordered: list[float], fraction: float) -> float | None:
    if not ordered:
        return None
    if len(ordered) == 1:
        return round(ordered[0] * 1000, 3)
    cut = statistics.quantiles(ordered, n=100, method="inclusive")
    return round(cut[round(fraction * 100) - 1] * 1000, 3)


def run_reader(config: Config, logger: logging.Logger, stop: threading.Event) -> None:
    """Poll the PLCs and send samples to the buffer until stop is set."""
    schedules = build_schedules(config, time.monotonic())

    # The lock comes before the epoch, so a second reader started by hand fails without
    # taking an epoch, which would make the buffer reject this reader's batches.
    lock = ReaderLock.acquire(config.gateway.state_dir)
    try:
        epoch = advance_epoch(config.gateway.state_dir, stop, logger)
        if epoch is not None:
            run_epoch(config, logger, stop, schedules, epoch)
    finally:
        lock.release()


def run_epoch(
    config: Config,
    logger: logging.Logger,
    stop: threading.Event,
    schedules: dict[str, list[GroupSchedule]],
    epoch: int,
) -> None:
    """Open the tap, the PLC connections and the ingest socket, and poll until stop is set."""
    try:
        config.gateway.runtime_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PlcBridgeError(
            f"cannot create gateway.runtime_dir {config.gateway.runtime_dir}: {exc}"
        ) from exc

    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    tap = Tap(context, config.gateway.runtime_dir, PROCESS)
    endpoint = wire.endpoint(config.gateway.runtime_dir, wire.INGEST)
    outbox: Outbox = Outbox()
    pollers = build_pollers(config, logger, schedules, outbox)
    sender: IngestSender | None = None
    writes: WriteServer | None = None
    try:
        identity = None
        if config.plc.identity is not None:
            identity = IdentityGate.open(IdentityStore(config.gateway.state_dir), logger)
        sender = IngestSender(context, endpoint, config.plc, epoch, logger, tap)
        writes = WriteServer(context, wire.endpoint(config.gateway.runtime_dir, wire.COMMAND),
                             {tag.name: tag for tag in config.plc.tags}, logger)
        reader = PlcReader(pollers, outbox, sender, tap, epoch, identity, writes)
        request_count = sum(len(s.requests) for group in schedules.values() for s in group)
        plc = ",".join(poller.device.endpoint for poller in pollers)
        logger.info(
            "reader_start %s",
            fields(
                epoch=epoch,
                plc=plc,
                unit_id=config.plc.unit_id,
                devices=len(pollers),
                tags=len(config.plc.tags),
                requests=request_count,
                ingest=endpoint,
                command=writes.endpoint,
            ),
        )
        tap.publish("start", epoch=epoch, plc=plc, requests=request_count)

        reader.run(stop)

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
        for poller in pollers:
            poller.close()
        if sender is not None:
            sender.close()
        if writes is not None:
            writes.close()
        tap.close()
        context.term()


def build_pollers(
    config: Config,
    logger: logging.Logger,
    schedules: dict[str, list[GroupSchedule]],
    outbox: Outbox,
) -> list[DevicePoller]:
    """Create one poller, with its own connection, for every device with tags or the identity."""
    identity = config.plc.identity
    pollers = []
    for device in config.plc.devices:
        reads_identity = identity is not None and identity.device == device.name
        if device.name in schedules or reads_identity:
            connection = PlcConnection(device, logger)
            pollers.append(
                DevicePoller(device, config.plc, schedules.get(device.name, []), connection,
                             logger, outbox, identity if reads_identity else None)
            )
    return pollers


def main() -> int:
    return run_process(PROCESS, run_reader)

