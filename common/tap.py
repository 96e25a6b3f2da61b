"""The monitoring tap: each process publishes its events and counters on a ZeroMQ XPUB socket.

`plcbridge tap` subscribes to them. XPUB, like PUB, drops messages for a subscriber that
falls behind, so a slow operator terminal never slows the gateway.

Events and counters go out under the topic "<process>". A copy of the data passing through
the process goes out under "data.<process>", and only while a subscriber subscribes to that
topic: XPUB passes each subscription to the process, so copying costs nothing otherwise.
The data topic must not start with the process name, because ZeroMQ matches topics by
prefix and a plain subscriber would then receive the copies too.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import zmq

from common import wire
from common.errors import PlcBridgeError
from common.logs import redact


def data_topic(process: str) -> bytes:
    return f"data.{process}".encode()


class Tap:
    """Publishes events, errors and once-a-second counters for one process."""

    def __init__(
        self, context: zmq.Context[zmq.Socket[bytes]], runtime_dir: Path, process: str
    ) -> None:
        self.process = process
        self.counters: dict[str, Any] = {}
        self._socket = wire.make_socket(context, zmq.XPUB, wire.TAP_HWM, linger_ms=0)
        self.data_topic = data_topic(process)
        self.data_wanted = False
        endpoint = wire.tap_endpoint(runtime_dir, process)
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            # An open socket makes context.term() wait forever, so close it before raising.
            self._socket.close(linger=0)
            reason = zmq.strerror(exc.errno) if exc.errno else str(exc)
            raise PlcBridgeError(
                f"cannot bind the {process} tap to {endpoint}: {reason}; check that "
                "gateway.runtime_dir exists and is writable by the gateway's user"
            ) from exc
        self._next_counters = time.monotonic()

    def publish(self, kind: str, **values: Any) -> None:
        message = {"ts_ms": int(time.time() * 1000), "process": self.process, "kind": kind}
        message.update(values)
        body = redact(json.dumps(message, default=str, separators=(",", ":")))
        # With no room for a slow subscriber the message is dropped: that is the tap's contract.
        with contextlib.suppress(zmq.Again):
            self._socket.send_multipart([self.process.encode(), body.encode()], zmq.NOBLOCK)

    def publish_data(self, **values: Any) -> None:
        """Publish a copy of data passing through, when a subscriber requested it.

        data_wanted follows the subscriptions once a second, in publish_counters_if_due, so
        a caller can check it before it builds a costly copy.
        """
        if not self.data_wanted:
            return
        message = {"ts_ms": int(time.time() * 1000), "process": self.process, "kind": "data"}
        message.update(values)
        body = redact(json.dumps(message, default=str, separators=(",", ":")))
        with contextlib.suppress(zmq.Again):
            self._socket.send_multipart([self.data_topic, body.encode()], zmq.NOBLOCK)

    def _read_subscriptions(self) -> None:
        # Without XPUB_VERBOSE, XPUB passes on the first subscription to a topic and the
        # last unsubscription from it, so the flag follows whether any subscriber wants data.
        while True:
            try:
                frame = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if frame[1:] == self.data_topic:
                self.data_wanted = frame[:1] == b"\x01"

    def publish_counters_if_due(self) -> None:
        """Publish the counters when a second has passed since the last time."""
        # A caller on its own 1 s timer can come a little early; without the tolerance its
        # every other tick would be skipped.
        if time.monotonic() >= self._next_counters - 0.05:
            self.publish_counters()

    def publish_counters(self) -> None:
        """Publish the counters now, for a caller that has just refreshed them, and start
        the next second from now."""
        self._next_counters = time.monotonic() + 1.0
        self._read_subscriptions()
        self.publish("counters", **self.counters)

    def close(self) -> None:
        # A short linger lets the last event, usually "stop", reach a connected subscriber.
        self._socket.close(linger=200)
