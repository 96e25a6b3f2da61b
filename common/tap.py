"""The monitoring tap: each process publishes its events and counters on a ZeroMQ PUB socket.

`plcbridge tap` subscribes to them. PUB drops messages for a subscriber that falls behind,
so a slow operator terminal never slows the gateway.
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


class Tap:
    """Publishes events, errors and once-a-second counters for one process."""

    def __init__(
        self, context: zmq.Context[zmq.Socket[bytes]], runtime_dir: Path, process: str
    ) -> None:
        self.process = process
        self.counters: dict[str, Any] = {}
        self._socket = wire.make_socket(context, zmq.PUB, wire.TAP_HWM, linger_ms=0)
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

    def publish_counters_if_due(self) -> None:
        """Publish the counters when a second has passed since the last time."""
        # A caller on its own 1 s timer can come a little early; without the tolerance its
        # every other tick would be skipped.
        now = time.monotonic()
        if now >= self._next_counters - 0.05:
            self._next_counters = now + 1.0
            self.publish("counters", **self.counters)

    def close(self) -> None:
        # A short linger lets the last event, usually "stop", reach a connected subscriber.
        self._socket.close(linger=200)
