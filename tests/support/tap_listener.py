"""A test-side `plcbridge tap`: a SUB socket on one process's tap, with chosen topics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import zmq

from common import wire


class TapListener:
    """Collects the messages of one process's tap; pump() reads what has arrived."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], runtime_dir: Path,
                 process: str, topics: list[bytes], rcvhwm: int = 1000) -> None:
        self.socket = context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
        # A small kernel buffer, so that a subscriber that never reads stalls early.
        self.socket.setsockopt(zmq.RCVBUF, 4096)
        for topic in topics:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic)
        self.socket.connect(wire.tap_endpoint(runtime_dir, process))
        self.messages: list[dict[str, Any]] = []

    def pump(self) -> list[dict[str, Any]]:
        while self.socket.poll(0):
            _topic, body = self.socket.recv_multipart()
            self.messages.append(json.loads(body))
        return self.messages

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [message for message in self.pump() if message["kind"] == kind]

    def socket_events(self, socket: str) -> list[str]:
        """Return the monitor events of one of the process's sockets, oldest first."""
        return [message["event"] for message in self.of_kind("socket_event")
                if message["socket"] == socket]

    def close(self) -> None:
        self.socket.close(linger=0)
