"""The reader's side of the ingest socket: a bounded sample queue, batches, acks and resends.

Samples wait in memory until a batch can go. A batch gets its batch_seq only when it is
sent, so the numbers have no gaps. At most plc.max_unacked_batches batches are out at once.
Acks are cumulative, and when none makes progress for plc.ack_timeout_s every unacknowledged
batch is sent again, in order. Every send is non-blocking: when ZeroMQ has no room, the data
stays in this process's queue and the PLC polls go on.

While samples wait and no ack makes progress for max(2 * plc.ack_timeout_s, 5 s), for example
because no buffer is connected, a buffer_unreachable WARNING is logged and published on the
tap, and repeated every minute. A buffer_reachable INFO follows the first ack that makes
progress again.

A buffer whose overflow policy is reject-new acknowledges the batches it could not store and
reports them in the ack's rejected_samples total (common/wire.py). They are counted in
dropped_samples, like the samples that the full queue drops, and in rejected_samples, and a
rate-limited buffer_rejected WARNING says so.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass

import zmq

from common import wire
from common.config import PlcSettings
from common.errors import PlcBridgeError
from common.logs import fields
from common.ratelimit import RateLimit
from common.socket_monitor import SocketMonitor
from common.tap import Tap
from processes.plc_reader.samples import encode_batch

# One sample encoded as a JSON object by processes.plc_reader.samples.
Sample = bytes

WARNING_INTERVAL_S = 10.0

# A buffer that commits slowly may leave the reader without an ack for a few seconds.
UNREACHABLE_MIN_S = 5.0
UNREACHABLE_REPEAT_S = 60.0


@dataclass
class _Batch:
    batch_seq: int
    count: int
    frames: list[bytes]


class IngestSender:
    """Queues samples and delivers them in batches to the buffer's ingest ROUTER."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        settings: PlcSettings,
        epoch: int,
        logger: logging.Logger,
        tap: Tap,
    ) -> None:
        self.endpoint = endpoint
        self.epoch = epoch
        self.dropped_samples = 0
        # Samples and batches that the buffer rejected in this epoch, summed from the
        # increases of its acks' totals, and the totals of the last ack.
        self.rejected_samples = 0
        self.rejected_batches = 0
        self._buffer_rejected = (0, 0)
        self._settings = settings
        self._logger = logger
        self._tap = tap
        self._pending: deque[Sample] = deque(maxlen=settings.queue_max_samples)
        self._unacked: deque[_Batch] = deque()
        self._next_batch_seq = 0
        self._last_progress = time.monotonic()
        self._drop_warning = RateLimit(WARNING_INTERVAL_S)
        self._resend_warning = RateLimit(WARNING_INTERVAL_S)
        self._bad_ack_warning = RateLimit(WARNING_INTERVAL_S)
        self._rejected_warning = RateLimit(WARNING_INTERVAL_S)

        # Reachability: the time of the last ack that made progress, or of the last moment
        # with nothing to deliver, and whether buffer_unreachable was logged since then.
        self._unreachable_after_s = max(2 * settings.ack_timeout_s, UNREACHABLE_MIN_S)
        self._waiting_since = time.monotonic()
        self._unreachable = False
        self._next_unreachable_warning = 0.0

        # IMMEDIATE: with no buffer connected, a send fails at once instead of queueing in
        # a pipe that is discarded when the buffer comes up. The samples stay in _pending.
        try:
            self._socket = wire.make_socket(context, zmq.DEALER, wire.DATA_HWM, linger_ms=0)
            self._socket.setsockopt(zmq.IMMEDIATE, 1)
            # The monitor goes on before the connect, so it reports the first connection too.
            self._monitor = SocketMonitor(
                self._socket, "ingest", logger, tap.publish,
                "samples stay in the reader's queue until the buffer connects again")
            self._socket.connect(endpoint)
        except zmq.ZMQError as exc:
            raise PlcBridgeError(f"cannot connect to ingest endpoint {endpoint}: {exc}") from exc
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._poller.register(self._monitor.socket, zmq.POLLIN)

    @property
    def pending_samples(self) -> int:
        return len(self._pending)

    @property
    def unacked_batches(self) -> int:
        return len(self._unacked)

    @property
    def idle(self) -> bool:
        """True when every sample has been sent and acknowledged."""
        return not self._pending and not self._unacked

    def enqueue(self, samples: list[Sample]) -> None:
        """Queue samples, and when the queue is full drop the oldest queued ones and count them."""
        overflow = len(self._pending) + len(samples) - self._settings.queue_max_samples
        self._pending.extend(samples)
        if overflow > 0:
            self.dropped_samples += overflow
            self._warn_dropped()

    def pump(self) -> None:
        """Resend after an ack timeout and send new batches while the window allows.

        Then log buffer_unreachable if the buffer has acknowledged nothing for a while.
        """
        self._resend_if_due()
        while self._pending and len(self._unacked) < self._settings.max_unacked_batches:
            if not self._send_next_batch():
                break
        self._check_reachable()

    def wait_for_acks(self, timeout_s: float) -> None:
        """Wait up to timeout_s for a message from the buffer, then handle all that arrived."""
        # Round up, so that a wait shorter than a millisecond does not spin.
        ready = dict(self._poller.poll(max(0, math.ceil(timeout_s * 1000))))
        if self._monitor.socket in ready:
            self._monitor.drain()
        if self._socket not in ready:
            return
        while True:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle_message(frames)

    def flush(self, timeout_s: float) -> None:
        """Send what can be sent and wait up to timeout_s until the buffer acknowledged it."""
        deadline = time.monotonic() + timeout_s
        while not self.idle:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.pump()
            self.wait_for_acks(min(remaining, 0.05))

        if not self.idle:
            self._logger.warning(
                "ingest_flush_incomplete %s",
                fields(
                    pending_samples=len(self._pending),
                    unacked_batches=len(self._unacked),
                    timeout_s=timeout_s,
                    consequence="samples still pending are lost, and unacknowledged "
                    "batches may be",
                ),
            )

    def close(self) -> None:
        self._monitor.close()
        self._socket.close(linger=0)

    def _send_next_batch(self) -> bool:
        # Skip building the payload while ZeroMQ has no room for it.
        if not self._socket.poll(0, zmq.POLLOUT):
            return False

        count = min(len(self._pending), self._settings.batch_max_samples)
        payload = encode_batch(itertools.islice(self._pending, count))
        header = {"epoch": self.epoch, "batch_seq": self._next_batch_seq, "count": count}
        batch = _Batch(self._next_batch_seq, count, wire.encode(wire.BATCH, header, payload))
        if not self._send(batch):
            return False

        for _ in range(count):
            self._pending.popleft()
        if not self._unacked:
            self._last_progress = time.monotonic()
        self._unacked.append(batch)
        self._next_batch_seq += 1
        return True

    def _send(self, batch: _Batch) -> bool:
        try:
            self._socket.send_multipart(batch.frames, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def _resend_if_due(self) -> None:
        now = time.monotonic()
        if not self._unacked or now - self._last_progress < self._settings.ack_timeout_s:
            return

        # Restart the timer even when ZeroMQ took only some batches. The next timeout sends
        # them all again, in order from the first unacknowledged one.
        self._last_progress = now
        sent = 0
        for batch in self._unacked:
            if not self._send(batch):
                break
            sent += 1

        suppressed = self._resend_warning.allow()
        if suppressed is not None:
            self._logger.warning(
                "ingest_resend %s",
                fields(
                    endpoint=self.endpoint,
                    first_batch_seq=self._unacked[0].batch_seq,
                    batches=len(self._unacked),
                    resent=sent,
                    ack_timeout_s=self._settings.ack_timeout_s,
                    suppressed=suppressed,
                    consequence="no ack from the buffer; samples wait in memory and the "
                    "oldest drop when the queue is full",
                ),
            )

    def _handle_message(self, frames: list[bytes]) -> None:
        try:
            message = wire.decode(frames)
            if message.kind != wire.ACK:
                raise ValueError(f"unexpected message kind {message.kind[:20]!r}")
            epoch = int(message.header["epoch"])
            batch_seq = int(message.header["batch_seq"])
            rejected = (int(message.header.get("rejected_samples", 0)),
                        int(message.header.get("rejected_batches", 0)))
        # int() of an infinite JSON number raises OverflowError, and json.loads raises
        # RecursionError on a deeply nested header.
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            self._warn_bad_ack(str(exc))
            return

        if epoch != self.epoch:
            return  # an ack for an earlier run of the reader
        if batch_seq >= self._next_batch_seq:
            self._warn_bad_ack(f"ack for batch_seq {batch_seq}, which was never sent")
            return
        self._count_rejected(*rejected)
        self._acknowledge(batch_seq)

    def _count_rejected(self, samples_total: int, batches_total: int) -> None:
        """Count the increase of the buffer's rejected totals for this epoch as dropped.

        A total below the last one comes from a buffer that started a new store and lost
        its count, so it becomes the new base.
        """
        seen_samples, seen_batches = self._buffer_rejected
        self._buffer_rejected = (samples_total, batches_total)
        if samples_total < seen_samples:
            return
        new_samples = samples_total - seen_samples
        self.rejected_batches += max(0, batches_total - seen_batches)
        if new_samples == 0:
            return
        self.rejected_samples += new_samples
        self.dropped_samples += new_samples

        suppressed = self._rejected_warning.allow()
        if suppressed is None:
            return
        self._logger.warning(
            "buffer_rejected %s",
            fields(
                endpoint=self.endpoint,
                samples=new_samples,
                rejected_samples_total=self.rejected_samples,
                rejected_batches_total=self.rejected_batches,
                dropped_samples_total=self.dropped_samples,
                epoch=self.epoch,
                suppressed=suppressed,
                consequence="the buffer's store is full and its overflow policy is "
                "reject-new, so these samples are lost and seq shows the gap",
            ),
        )
        self._tap.publish("buffer_rejected", samples=new_samples,
                          rejected_samples_total=self.rejected_samples,
                          dropped_samples_total=self.dropped_samples)

    def _acknowledge(self, batch_seq: int) -> None:
        progressed = False
        while self._unacked and self._unacked[0].batch_seq <= batch_seq:
            self._unacked.popleft()
            progressed = True
        if progressed:
            self._last_progress = time.monotonic()
            self._on_progress(self._last_progress)

    def _check_reachable(self) -> None:
        now = time.monotonic()
        if self.idle:
            self._waiting_since = now
            return
        waited_s = now - self._waiting_since
        if waited_s < self._unreachable_after_s or now < self._next_unreachable_warning:
            return

        self._unreachable = True
        self._next_unreachable_warning = now + UNREACHABLE_REPEAT_S
        no_ack_s = round(waited_s, 1)
        self._logger.warning(
            "buffer_unreachable %s",
            fields(
                endpoint=self.endpoint,
                pending_samples=len(self._pending),
                unacked_batches=len(self._unacked),
                no_ack_s=no_ack_s,
                consequence="samples wait in memory, and the oldest drop once "
                f"plc.queue_max_samples={self._settings.queue_max_samples} is reached",
            ),
        )
        self._tap.publish(
            "buffer_unreachable",
            endpoint=self.endpoint,
            pending_samples=len(self._pending),
            unacked_batches=len(self._unacked),
            no_ack_s=no_ack_s,
        )

    def _on_progress(self, now: float) -> None:
        waited_s = round(now - self._waiting_since, 1)
        self._waiting_since = now
        if not self._unreachable:
            return
        self._unreachable = False
        self._next_unreachable_warning = 0.0
        self._logger.info(
            "buffer_reachable %s",
            fields(
                endpoint=self.endpoint,
                no_ack_s=waited_s,
                pending_samples=len(self._pending),
                dropped_samples_total=self.dropped_samples,
            ),
        )
        self._tap.publish(
            "buffer_reachable",
            endpoint=self.endpoint,
            no_ack_s=waited_s,
            pending_samples=len(self._pending),
        )

    def _warn_dropped(self) -> None:
        suppressed = self._drop_warning.allow()
        if suppressed is None:
            return
        self._logger.warning(
            "queue_full_dropped_oldest %s",
            fields(
                dropped_samples_total=self.dropped_samples,
                queue_max_samples=self._settings.queue_max_samples,
                unacked_batches=len(self._unacked),
                epoch=self.epoch,
                suppressed=suppressed,
                consequence="the oldest queued samples are lost and seq shows the gap",
            ),
        )

    def _warn_bad_ack(self, error: str) -> None:
        suppressed = self._bad_ack_warning.allow()
        if suppressed is not None:
            self._logger.warning(
                "ingest_bad_message %s",
                fields(endpoint=self.endpoint, error=error, suppressed=suppressed),
            )
