"""The socket monitor's own parse of ZeroMQ monitor messages, against a real monitor."""

from __future__ import annotations

import struct

import zmq

from common.socket_monitor import event_number
from tests.support.waiting import wait_until


def test_event_number_packed_frame() -> None:
    frame = struct.pack("=HI", int(zmq.EVENT_DISCONNECTED), 42)

    assert event_number(frame) == int(zmq.EVENT_DISCONNECTED)


def test_event_number_real_monitor(context: zmq.Context[zmq.Socket[bytes]]) -> None:
    server = context.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    monitor = server.get_monitor_socket(int(zmq.EVENT_ACCEPTED))
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client = context.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.connect(f"tcp://127.0.0.1:{port}")

    wait_until(lambda: monitor.poll(0), 5, "a monitor event")
    frames = monitor.recv_multipart()

    assert event_number(frames[0]) == int(zmq.EVENT_ACCEPTED)
    assert frames[1].decode() == f"tcp://127.0.0.1:{port}"
    server.disable_monitor()
