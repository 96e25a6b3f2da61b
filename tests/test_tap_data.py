"""The uplink's tap: data copies on request, socket monitor events, and a stalled subscriber."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from common import wire
from common.tap import data_topic
from tests import test_azure_credentials as azure_tests
from tests import test_uplink as uplink_tests
from tests.support.gateway import wait_until
from tests.support.tap_listener import TapListener
from tests.test_uplink import StandInBuffer, sample_page, write_connection_string

pytestmark = pytest.mark.integration

buffer = uplink_tests.buffer
uplinks = uplink_tests.uplinks
hubs = azure_tests.hubs

# Pages in flight at once: the uplink's max_inflight_pages in these tests, and well below
# the delivery socket's high-water mark, so the stand-in buffer never drops a page.
WINDOW = 20


class TapSubscriber(TapListener):
    """A listener on the uplink's tap with a ZeroMQ context of its own."""

    def __init__(self, runtime_dir: Path, topics: list[bytes], rcvhwm: int = 1000) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        super().__init__(self.context, runtime_dir, "uplink", topics, rcvhwm)

    def close(self) -> None:
        super().close()
        self.context.term()


@pytest.fixture
def tap_subscribers(base: Path) -> Iterator[list[TapSubscriber]]:
    (base / "run").mkdir(parents=True, exist_ok=True)
    started: list[TapSubscriber] = []
    try:
        yield started
    finally:
        for subscriber in started:
            subscriber.close()


def socket_events(subscriber: TapSubscriber, event: str) -> list[dict[str, Any]]:
    return [message for message in subscriber.pump()
            if message["kind"] == "socket_event" and message["event"] == event]


def send_pages(buffer: StandInBuffer, first: int, count: int, timeout_s: float) -> float:
    """Send count pages, WINDOW at a time as the buffer's credit allows; return the seconds
    until the last puback."""
    started = time.monotonic()
    for window_first in range(first, first + count, WINDOW):
        wanted = set(range(window_first, min(window_first + WINDOW, first + count)))
        for page_seq in sorted(wanted):
            buffer.send_page(page_seq, sample_page(page_seq))

        def all_acked(wanted: set[int] = wanted) -> bool:
            return wanted <= {puback["page_seq"] for puback in buffer.pubacks}

        buffer.wait_for(all_acked, timeout_s, f"pubacks for pages {sorted(wanted)[0]}-"
                                              f"{sorted(wanted)[-1]}")
    return time.monotonic() - started


def test_tap_data_copies_pages_on_request(
    base: Path, certs: Path, hubs: Any, buffer: StandInBuffer, uplinks: Any,
    tap_subscribers: list[TapSubscriber],
) -> None:
    stack = hubs(certs)
    write_connection_string(base)
    events = TapSubscriber(base / "run", [b"uplink"])
    copies = TapSubscriber(base / "run", [data_topic("uplink")])
    tap_subscribers += [events, copies]
    uplink = uplinks(base, azure_tests.hub_config(base, stack))
    buffer.wait_link("up", 20)
    uplink.wait_log(r"INFO .*socket_connected socket=delivery endpoint=ipc://", 20)

    # The monitor of the delivery DEALER reports a buffer that goes away and comes back.
    # PUB drops what precedes a subscription, so the tap's counters must arrive first.
    buffer.wait_for(lambda: events.pump(), 20, "the uplink's tap counters")
    buffer.router.close(linger=0)
    wait_until(lambda: socket_events(events, "disconnected"), 20, "a disconnect")
    buffer.router = wire.make_socket(buffer.context, zmq.ROUTER, wire.DATA_HWM, linger_ms=0)
    buffer.router.bind(wire.endpoint(base / "run", wire.DELIVERY))
    buffer.links.clear()
    wait_until(lambda: socket_events(events, "connected"), 20, "a reconnect")
    uplink.wait_log(r"WARNING .*socket_disconnected socket=delivery ", 20)
    buffer.wait_link("up", 20)

    # The subscription reaches the uplink within a counters tick; pages sent after that
    # are copied.
    deadline = time.monotonic() + 30
    page_seq = 0
    while not copies.pump():
        assert time.monotonic() < deadline, "no data copy within 30 s"
        send_pages(buffer, page_seq, 1, 20)
        page_seq += 1
    copy = copies.messages[0]
    assert copy["kind"] == "data"
    assert copy["process"] == "uplink"
    assert json.loads(copy["page"])["samples"][0]["name"] == "line1.speed"
    assert [m for m in events.pump() if m["kind"] == "data"] == []


def test_tap_stalled_subscriber_keeps_throughput(
    base: Path, certs: Path, hubs: Any, buffer: StandInBuffer, uplinks: Any,
    tap_subscribers: list[TapSubscriber],
) -> None:
    stack = hubs(certs)
    write_connection_string(base)
    uplinks(base, azure_tests.hub_config(base, stack, f"max_inflight_pages = {WINDOW}"))
    buffer.wait_link("up", 20)
    pages = 1000
    send_pages(buffer, 0, 50, 30)  # warm up the connection and the hub's session

    without_s = send_pages(buffer, 50, pages, 60)

    # A subscriber that subscribes to every data copy and never reads one.
    # NOTE: 1,000 copies stay below the tap's high-water mark of 10,000 messages, so this
    # measures copying for a stalled reader, not the drops at the mark.
    stalled = TapSubscriber(base / "run", [b"", data_topic("uplink")], rcvhwm=1)
    tap_subscribers.append(stalled)
    probe = TapSubscriber(base / "run", [data_topic("uplink")])
    tap_subscribers.append(probe)
    next_page = 50 + pages
    deadline = time.monotonic() + 30
    while not probe.pump():
        assert time.monotonic() < deadline, "the uplink never copied its data"
        send_pages(buffer, next_page, 1, 20)
        next_page += 1
    probe.close()
    tap_subscribers.remove(probe)

    with_s = send_pages(buffer, next_page, pages, 60)

    # Generous, because the suite shares two cores: it fails only when the copies more
    # than halve throughput.
    assert with_s < 2 * without_s + 1.0, f"{pages} pages: {without_s:.2f} s alone, " \
                                          f"{with_s:.2f} s with a stalled tap subscriber"
