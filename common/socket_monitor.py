"""ZeroMQ socket monitor events of an internal socket, logged and published on the tap.

ZeroMQ reconnects ipc:// sockets silently. The monitor makes a peer that goes away or comes
back visible: for the uplink's DEALER, a buffer restart shows as disconnected, then
connected. The reader's ingest DEALER and the buffer's two ROUTERs are watched the same way.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

import zmq

from common.logs import fields

# Events worth an operator's attention, by name. CONNECT_RETRIED is left out: ZeroMQ retries
# every 100 ms by default (ZMQ_RECONNECT_IVL) while a peer is down, which would flood the log.
# A bound socket reports a peer's connection as ACCEPTED rather than CONNECTED, and both are
# named "connected", so an operator reads the same words on either side of a socket pair.
EVENT_NAMES: dict[int, str] = {
    int(zmq.EVENT_CONNECTED): "connected",
    int(zmq.EVENT_ACCEPTED): "connected",
    int(zmq.EVENT_DISCONNECTED): "disconnected",
    int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL): "handshake_failed",
    int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL): "handshake_failed",
    int(zmq.EVENT_HANDSHAKE_FAILED_AUTH): "handshake_failed",
}

# Callback that publishes an event on the process's tap: kind, then the event's values.
Publish = Callable[..., None]


def event_number(frame: bytes) -> int:
    """Return the event number from the first frame of a monitor message.

    ZeroMQ 4 sends a native-endian uint16 event and a uint32 value in that frame, and the
    endpoint in the second. pyzmq's parser in zmq.utils.monitor is not used because it
    imports zmq.asyncio and asyncio, which more than doubled the start time of the buffer.
    """
    number, _value = struct.unpack("=HI", frame[:6])
    return int(number)


class SocketMonitor:
    """Receives one socket's monitor events; the owner polls `socket` and calls drain()."""

    def __init__(self, watched: zmq.Socket[bytes], name: str, logger: logging.Logger,
                 publish: Publish, consequence: str) -> None:
        events = 0
        for event in EVENT_NAMES:
            events |= event
        self._watched = watched
        self.socket: zmq.Socket[bytes] = watched.get_monitor_socket(events)
        self.socket.setsockopt(zmq.LINGER, 0)
        self._name = name
        self._logger = logger
        self._publish = publish
        self._consequence = consequence

    def drain(self) -> None:
        """Log and publish every event that has arrived."""
        while self.socket.poll(0):
            frames = self.socket.recv_multipart()
            event = EVENT_NAMES.get(event_number(frames[0]))
            if event is None:
                continue
            endpoint = frames[1].decode(errors="replace")
            self._publish("socket_event", socket=self._name, event=event, endpoint=endpoint)
            if event == "connected":
                self._logger.info("socket_connected %s",
                                  fields(socket=self._name, endpoint=endpoint))
            else:
                self._logger.warning("socket_%s %s", event,
                                     fields(socket=self._name, endpoint=endpoint,
                                            consequence=self._consequence))

    def close(self) -> None:
        self._watched.disable_monitor()
        self.socket.close(linger=0)
