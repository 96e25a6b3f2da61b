"""The uplink's connection state, which the credential watcher follows on the uplink's tap.

The watcher subscribes to ipc://<runtime_dir>/tap-uplink.sock, the socket that
`plcbridge tap uplink` reads, and follows the uplink's link events:

| event | state |
|---|---|
| start, connecting, stop | connecting: no CONNACK yet |
| connected, or counters with connected=1 | connected |
| connect_failed, disconnected | down: waiting to reconnect |

The tap is a PUB socket, so a subscriber misses what is published before it has joined.
A restarted uplink binds a new socket, and the subscriber joins it again within
RECONNECT_IVL_MS and a few milliseconds more, by which time the new uplink has often
published its start and connecting events already. So after a stop event, and after the
watcher's own restart, the uplink counts as connecting until an event or the counters,
which the uplink publishes every second, say otherwise. Until the first event after the
watcher's start the state is unknown, and the uplink counts as not connecting.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import zmq

from common import wire
from common.logs import fields

UPLINK_PROCESS = "uplink"

# The uplink's events that change the link state, and the state each one leads to.
STATE_AFTER_EVENT = {
    "start": "connecting",
    "connecting": "connecting",
    "connected": "connected",
    "connect_failed": "down",
    "disconnected": "down",
    # supervisord starts a successor, whose first events may be lost (see above).
    "stop": "connecting",
}

# ZeroMQ retries the ipc connect every 100 ms by default. A restarted uplink publishes its
# first events within a second of its start, so the subscriber tries more often.
RECONNECT_IVL_MS = 20

# The tap sends a few messages a second. Past this many unread ones the oldest are dropped.
RECEIVE_HWM = 1000


class UplinkLinkState:
    """The uplink's link state, updated from its tap events at each poll()."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], runtime_dir: Path,
                 logger: logging.Logger) -> None:
        self.logger = logger
        self.state = "unknown"
        self.since_s = time.monotonic()
        self.endpoint = wire.tap_endpoint(runtime_dir, UPLINK_PROCESS)
        self._socket = wire.make_socket(context, zmq.SUB, RECEIVE_HWM, linger_ms=0)
        self._socket.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        # The data copies go out under "data.uplink", which this prefix does not match.
        self._socket.setsockopt(zmq.SUBSCRIBE, UPLINK_PROCESS.encode())
        self._socket.connect(self.endpoint)

    def poll(self) -> None:
        """Apply every event that has arrived since the last poll, in order."""
        while True:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                continue
            try:
                message = json.loads(frames[1])
                kind = message.get("kind")
                connected = kind == "counters" and message.get("connected") == 1
            except (ValueError, AttributeError):
                continue  # a message that is not from a tap of this version is ignored
            new_state = "connected" if connected else STATE_AFTER_EVENT.get(kind)
            if new_state is not None:
                self._enter(new_state, kind)

    def expect_new_uplink(self) -> None:
        """Count the uplink as connecting: the watcher has just started a new one."""
        self._enter("connecting", "restart by the watcher")

    def _enter(self, state: str, cause: str) -> None:
        if state != self.state:
            self.state = state
            self.since_s = time.monotonic()
            self.logger.debug("uplink_link_state %s", fields(state=state, cause=cause))

    def connecting_for_s(self) -> float | None:
        """Return how long the uplink has been connecting, or None when it is not."""
        if self.state != "connecting":
            return None
        return time.monotonic() - self.since_s

    def close(self) -> None:
        self._socket.close(linger=0)
