"""ZeroMQ socket monitor events on the taps of a whole gateway when one program restarts."""

from __future__ import annotations

import pytest
import zmq

from tests.support.tap_listener import TapListener
from tests.support.waiting import wait_until
from tests.test_gateway import Stack, stack

pytestmark = pytest.mark.integration

__all__ = ["stack"]


def listen(context: zmq.Context[zmq.Socket[bytes]], stack: Stack, process: str) -> TapListener:
    """Subscribe to a process's events and wait for its counters, because PUB drops what
    precedes a subscription."""
    listener = TapListener(context, stack.base / "run", process, [process.encode()])
    wait_until(lambda: listener.of_kind("counters"), 20, f"the {process}'s tap counters")
    return listener


def test_gateway_restarts_show_on_taps(
    stack: Stack, context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    stack.wait_for_samples(20)
    reader = listen(context, stack, "plc_reader")
    buffer = listen(context, stack, "buffer")

    # A buffer restart: the reader's ingest DEALER loses its peer and finds it again.
    result = stack.gateway.supervisorctl("restart", "plcbridge:buffer")
    assert "started" in result.stdout, result.stdout + result.stderr
    wait_until(lambda: reader.socket_events("ingest")[:2] == ["disconnected", "connected"],
               30, "ingest disconnected, then connected, on the reader's tap")
    # The reader publishes an event before it logs it.
    for line in ("WARNING plcbridge.plc_reader socket_disconnected socket=ingest",
                 "INFO plcbridge.plc_reader socket_connected socket=ingest"):
        wait_until(lambda line=line: line in stack.gateway.log("plc_reader"), 10,
                   f"{line!r} in the reader's log")

    # An uplink restart: the restarted buffer's delivery ROUTER loses the uplink and finds it again.
    buffer.close()
    buffer = listen(context, stack, "buffer")
    result = stack.gateway.supervisorctl("restart", "plcbridge:uplink")
    assert "started" in result.stdout, result.stdout + result.stderr
    wait_until(lambda: buffer.socket_events("delivery")[:2] == ["disconnected", "connected"],
               30, "delivery disconnected, then connected, on the buffer's tap")
    assert "ingest" not in {m["socket"] for m in buffer.of_kind("socket_event")
                            if m["event"] == "disconnected"}
    stack.wait_for_samples(20)
    reader.close()
    buffer.close()
