"""The uplink's connection state as the credential watcher sees it, from the uplink's tap.

The watcher subscribes to ipc://<runtime_dir>/tap-uplink.sock, the socket that
`plcbridge tap uplink` reads, and follows the uplink's link events:

| event | state |
|---|---|
| start, connecting | connecting: no CONNACK yet |
| connected | connected |
| connect_failed, disconnected | down: waiting to reconnect |
| stop | stopped |

The tap is a PUB socket, so a subscriber that joins late has missed the events before it
joined. Until the first link event arrives the state is unknown, and the watcher then
treats the uplink as not connecting. A restarted uplink binds the socket again, and the
subscriber reconnects on its own within RECONNECT_IVL_MS.
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
    "stop": "stopped",
}

# ZeroMQ retries the ipc connect every 100 ms by default. A restarted uplink publishes its
# first events within a second of its start, so the subscriber tries more often.
RECONNECT_IVL_MS = 20

# The tap sends a few messages a second. Past this many unread ones the oldest are dropped.
RECEIVE_HWM = 1000


class UplinkLinkState:
    """Follows the uplink's link events on its tap; poll() reads what has arrived."""

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
                kind = json.loads(frames[1]).get("kind")
            except (ValueError, AttributeError):
                continue  # not a tap message of this gateway's version: ignore it
            new_state = STATE_AFTER_EVENT.get(kind)
            if new_state is not None and new_state != self.state:
                self.state = new_state
                self.since_s = time.monotonic()
                self.logger.debug("uplink_link_state %s", fields(state=new_state, event=kind))

    def connecting_for_s(self) -> float | None:
        """Return how long the uplink has been connecting, or None when it is not."""
        if self.state != "connecting":
            return None
        return time.monotonic() - self.since_s

    def close(self) -> None:
        self._socket.close(linger=0)
