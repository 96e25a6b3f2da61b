"""The buffer's tap: socket monitor events, data copies on request, and a stalled subscriber.

A real buffer process runs on real LMDB files; test-side DEALERs play the reader and the
uplink, and test-side SUB sockets play `plcbridge tap`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import zmq

from common import payload, wire
from common.tap import data_topic
from tests.support.tap_listener import TapListener
from tests.support.waiting import wait_until
from tests.support.zmq_peers import ReaderPeer, UplinkPeer, make_samples
from tests.test_buffer import BufferRun, make_buffer

__all__ = ["make_buffer"]  # a fixture shared with the module it comes from

SAMPLES_PER_BATCH = 50


@pytest.fixture
def subscribers() -> Iterator[list[TapListener]]:
    started: list[TapListener] = []
    try:
        yield started
    finally:
        for subscriber in started:
            subscriber.close()


class Pipeline:
    """A stand-in reader and uplink that push batches through the buffer and ack its pages."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], run: BufferRun) -> None:
        self.reader = ReaderPeer(context, run.runtime_dir)
        self.uplink = UplinkPeer(context, run.runtime_dir)
        self.next_batch_seq = 0
        self.samples_acked = 0
        self.pages: list[int] = []

    def push(self, batches: int, timeout_s: float) -> float:
        """Send batches, ack every page the buffer hands out until all their samples have
        come back, and return the seconds that took."""
        started = time.monotonic()
        deadline = started + timeout_s
        wanted = self.samples_acked + batches * SAMPLES_PER_BATCH
        for _ in range(batches):
            seq = self.next_batch_seq
            self.reader.send_batch(1, seq, make_samples(1, seq * SAMPLES_PER_BATCH,
                                                        SAMPLES_PER_BATCH))
            self.next_batch_seq += 1
        next_link = 0.0
        while self.samples_acked < wanted:
            now = time.monotonic()
            assert now < deadline, (f"{self.samples_acked} of {wanted} samples came back "
                                    f"in {timeout_s} s")
            if now >= next_link:
                self.uplink.link("s", free=64)
                next_link = now + 0.2
            page = self.uplink.receive_page(0.05)
            if page is not None:
                page_seq, count, _body = page
                self.pages.append(page_seq)
                self.samples_acked += count
                self.uplink.puback("s", page_seq)
            while self.reader.receive_ack(0) is not None:
                pass
        return time.monotonic() - started


def test_buffer_tap_reports_peer_sockets(
    make_buffer: Callable[..., BufferRun], context: zmq.Context[zmq.Socket[bytes]],
    subscribers: list[TapListener],
) -> None:
    run = make_buffer()
    run.start()
    events = TapListener(context, run.runtime_dir, "buffer", [b"buffer"])
    subscribers.append(events)
    # PUB drops what precedes a subscription, so the tap's counters must arrive first.
    wait_until(lambda: events.of_kind("counters"), 10, "the buffer's tap counters")

    reader = ReaderPeer(context, run.runtime_dir)
    uplink = UplinkPeer(context, run.runtime_dir)
    wait_until(lambda: events.socket_events("ingest") == ["connected"], 10,
               "ingest connected on the buffer's tap")
    wait_until(lambda: events.socket_events("delivery") == ["connected"], 10,
               "delivery connected on the buffer's tap")

    uplink.close()
    wait_until(lambda: events.socket_events("delivery") == ["connected", "disconnected"], 10,
               "delivery disconnected on the buffer's tap")
    reader.close()
    wait_until(lambda: events.socket_events("ingest") == ["connected", "disconnected"], 10,
               "ingest disconnected on the buffer's tap")

    event = next(m for m in events.of_kind("socket_event") if m["socket"] == "ingest")
    assert event["endpoint"] == wire.endpoint(run.runtime_dir, wire.INGEST)
    # The buffer publishes an event before it logs it.
    for line in ("INFO plcbridge.buffer socket_connected socket=delivery",
                 "WARNING plcbridge.buffer socket_disconnected socket=ingest",
                 "consequence=\"the reader keeps its batches"):
        wait_until(lambda line=line: line in run.log(), 5, f"{line!r} in the buffer's log")


def test_buffer_tap_copies_pages_on_request(
    make_buffer: Callable[..., BufferRun], context: zmq.Context[zmq.Socket[bytes]],
    subscribers: list[TapListener],
) -> None:
    run = make_buffer(page_max_samples=SAMPLES_PER_BATCH, page_max_age_ms=50)
    run.start()
    events = TapListener(context, run.runtime_dir, "buffer", [b"buffer"])
    subscribers.append(events)
    pipeline = Pipeline(context, run)

    # Without a data subscriber, pages go out and nothing is copied.
    wait_until(lambda: events.of_kind("counters"), 10, "the buffer's tap counters")
    pipeline.push(5, 20)
    wait_until(lambda: len(events.of_kind("counters")) >= 3, 10, "two more counters ticks")

    # The subscription reaches the buffer within a counters tick; pages sent after that
    # are copied.
    copies = TapListener(context, run.runtime_dir, "buffer", [data_topic("buffer")])
    subscribers.append(copies)
    deadline = time.monotonic() + 20
    while not copies.pump():
        assert time.monotonic() < deadline, "no data copy within 20 s"
        pipeline.push(1, 20)

    copy = copies.messages[0]
    assert copy["kind"] == "data"
    assert copy["process"] == "buffer"
    assert copy["page_seq"] in pipeline.pages
    assert copy["gap"] is False
    page_seq, samples = payload.parse_page(copy["page"].encode())
    assert page_seq == copy["page_seq"]
    assert len(samples) == copy["count"] == SAMPLES_PER_BATCH
    assert copy["bytes"] == len(copy["page"].encode())
    assert events.of_kind("data") == []


def test_buffer_tap_stalled_subscriber_keeps_rate(
    make_buffer: Callable[..., BufferRun], context: zmq.Context[zmq.Socket[bytes]],
    subscribers: list[TapListener],
) -> None:
    run = make_buffer(page_max_samples=SAMPLES_PER_BATCH, page_max_age_ms=50)
    run.start()
    pipeline = Pipeline(context, run)
    batches = 1000
    pipeline.push(50, 30)  # warm up the store and the sockets

    without_s = pipeline.push(batches, 120)

    # A subscriber to every event and data copy that never reads one, and a probe that
    # shows when the buffer has seen the subscription.
    # NOTE: 1,000 copies stay below the tap's high-water mark of 10,000 messages, so this
    # measures copying for a stalled reader, not the drops at the mark.
    stalled = TapListener(context, run.runtime_dir, "buffer", [b"", data_topic("buffer")],
                                  rcvhwm=1)
    probe = TapListener(context, run.runtime_dir, "buffer", [data_topic("buffer")])
    subscribers += [stalled, probe]
    deadline = time.monotonic() + 20
    while not probe.pump():
        assert time.monotonic() < deadline, "the buffer never copied its data"
        pipeline.push(1, 20)
    probe.close()
    subscribers.remove(probe)

    with_s = pipeline.push(batches, 120)

    # Generous, because the suite shares two cores: it fails only when the copies more
    # than halve the rate.
    assert with_s < 2 * without_s + 1.0, (f"{batches} batches: {without_s:.2f} s alone, "
                                          f"{with_s:.2f} s with a stalled tap subscriber")
    run.assert_running()
