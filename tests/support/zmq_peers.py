"""Test stand-ins for the processes on the far side of the buffer's sockets.

ReaderPeer plays the PLC reader on the ingest socket and UplinkPeer plays the uplink on the
delivery socket. Both are plain DEALER sockets that speak common/wire.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import zmq

from common import payload, wire


def make_samples(epoch: int, first_seq: int, count: int, name: str = "line1.speed",
                 **extra: Any) -> list[dict[str, Any]]:
    """Return count good samples with consecutive seq numbers starting at first_seq."""
    return [
        {"name": name, "value": float(seq), "quality": "good", "ts_ms": 1_764_806_400_000 + seq,
         "epoch": epoch, "seq": seq, **extra}
        for seq in range(first_seq, first_seq + count)
    ]


class _Dealer:
    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], address: str) -> None:
        self.address = address
        self.socket = wire.make_socket(context, zmq.DEALER, wire.DATA_HWM, linger_ms=0)
        self.socket.connect(address)

    def receive(self, timeout_s: float) -> wire.Message | None:
        """Return the next message, or None when none arrives within timeout_s."""
        if not self.socket.poll(int(timeout_s * 1000), zmq.POLLIN):
            return None
        return wire.decode(self.socket.recv_multipart())

    def send_frames(self, frames: list[bytes]) -> None:
        self.socket.send_multipart(frames)

    def close(self) -> None:
        self.socket.close(linger=0)


class ReaderPeer(_Dealer):
    """Sends batches to the buffer's ingest ROUTER and reads its acks."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], runtime_dir: Path) -> None:
        super().__init__(context, wire.endpoint(runtime_dir, wire.INGEST))
        self.acked: dict[int, int] = {}  # the highest batch_seq acknowledged, per epoch

    def send_batch(self, epoch: int, batch_seq: int, samples: list[dict[str, Any]]) -> None:
        self.send_array(epoch, batch_seq, len(samples), payload.encode_samples(samples))

    def send_array(self, epoch: int, batch_seq: int, count: int, array: bytes) -> None:
        header = {"epoch": epoch, "batch_seq": batch_seq, "count": count}
        self.send_frames(wire.encode(wire.BATCH, header, array))

    def receive_ack(self, timeout_s: float) -> tuple[int, int] | None:
        """Return the next ack as (epoch, batch_seq), or None after timeout_s."""
        message = self.receive(timeout_s)
        if message is None:
            return None
        assert message.kind == wire.ACK, message
        epoch, batch_seq = message.header["epoch"], message.header["batch_seq"]
        self.acked[epoch] = max(batch_seq, self.acked.get(epoch, -1))
        return epoch, batch_seq

    def wait_for_ack(self, epoch: int, batch_seq: int, timeout_s: float = 5.0) -> None:
        """Read acks until batch_seq of epoch is acknowledged; fail after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.acked.get(epoch, -1) >= batch_seq:
                return
            self.receive_ack(deadline - time.monotonic())
        if self.acked.get(epoch, -1) >= batch_seq:
            return
        raise AssertionError(f"no ack for epoch {epoch} batch_seq {batch_seq} in {timeout_s} s")


class UplinkPeer(_Dealer):
    """Reports a link state to the buffer's delivery ROUTER, receives pages, sends pubacks."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], runtime_dir: Path) -> None:
        super().__init__(context, wire.endpoint(runtime_dir, wire.DELIVERY))

    def link(self, session: str, state: str = "up", free: int = 20) -> None:
        self.send_frames(wire.encode(wire.LINK, {"session": session, "state": state,
                                                 "free": free}))

    def puback(self, session: str, page_seq: int) -> None:
        self.send_frames(wire.encode(wire.PUBACK, {"session": session, "page_seq": page_seq}))

    def receive_page(self, timeout_s: float) -> tuple[int, int, bytes] | None:
        """Return the next page as (page_seq, count, JSON), or None after timeout_s."""
        message = self.receive(timeout_s)
        if message is None:
            return None
        assert message.kind == wire.PAGE, message
        assert message.payload is not None
        return message.header["page_seq"], message.header["count"], message.payload
