"""A test-side relay on the delivery socket that counts the pages the uplink has not acknowledged.

The buffer and the uplink are given different runtime folders. The relay binds the delivery
ROUTER in the uplink's folder, as the buffer would, and connects a DEALER to the buffer's,
as the uplink would, and passes every message through unchanged. On the way it counts the
pages handed to the uplink in its current session and not yet acknowledged by a puback, so a
test measures the real window between the two processes, not a sample of it.

The count can only err high, because the relay receives a page before the uplink does and
its puback after the uplink sent it.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from common import wire

POLL_MS = 50


@dataclass
class WindowRecord:
    """What the relay saw: the outstanding pages and the sessions, updated by its thread."""

    outstanding: set[int] = field(default_factory=set)
    max_outstanding: int = 0
    pages_relayed: int = 0
    pubacks_relayed: int = 0
    sessions_up: list[str] = field(default_factory=list)


class DeliveryProxy(threading.Thread):
    """Relays the delivery socket between a buffer and an uplink in two runtime folders."""

    def __init__(self, buffer_runtime_dir: Path, uplink_runtime_dir: Path) -> None:
        super().__init__(name="delivery-proxy", daemon=True)
        self.buffer_endpoint = wire.endpoint(buffer_runtime_dir, wire.DELIVERY)
        self.uplink_endpoint = wire.endpoint(uplink_runtime_dir, wire.DELIVERY)
        uplink_runtime_dir.mkdir(parents=True, exist_ok=True)
        self.record = WindowRecord()
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self._stop_requested = threading.Event()
        self._bound = threading.Event()
        self._session: str | None = None

    def start_and_wait(self, timeout_s: float = 5.0) -> None:
        self.start()
        if not self._bound.wait(timeout_s):
            raise AssertionError(f"the delivery proxy did not bind {self.uplink_endpoint}")

    def stop(self) -> None:
        self._stop_requested.set()
        self.join(timeout=5)

    def snapshot(self) -> WindowRecord:
        with self.lock:
            record = self.record
            return WindowRecord(set(record.outstanding), record.max_outstanding,
                                record.pages_relayed, record.pubacks_relayed,
                                list(record.sessions_up))

    def run(self) -> None:
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            self._relay(context)
        except BaseException as exc:  # reported to the test through self.error
            self.error = exc
        finally:
            context.destroy(linger=0)

    def _relay(self, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        front = wire.make_socket(context, zmq.ROUTER, wire.DATA_HWM, linger_ms=0)
        front.bind(self.uplink_endpoint)
        back = wire.make_socket(context, zmq.DEALER, wire.DATA_HWM, linger_ms=0)
        back.connect(self.buffer_endpoint)
        self._bound.set()

        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(back, zmq.POLLIN)
        uplink_identity: bytes | None = None
        while not self._stop_requested.is_set():
            ready = dict(poller.poll(POLL_MS))
            if front in ready:
                uplink_identity, *frames = front.recv_multipart()
                self._note_from_uplink(frames)
                back.send_multipart(frames)
            if back in ready:
                frames = back.recv_multipart()
                if uplink_identity is None:
                    continue  # no uplink to pass it to; the buffer hands it out again
                self._note_from_buffer(frames)
                front.send_multipart([uplink_identity, *frames])

    def _note_from_uplink(self, frames: list[bytes]) -> None:
        header = json.loads(frames[1])
        with self.lock:
            record = self.record
            if frames[0] == wire.LINK:
                # The uplink clears its own count on every new session and link down.
                if header["state"] != "up":
                    self._session = None
                    record.outstanding.clear()
                elif header["session"] != self._session:
                    self._session = header["session"]
                    record.outstanding.clear()
                    record.sessions_up.append(header["session"])
            elif frames[0] == wire.PUBACK:
                record.pubacks_relayed += 1
                if header["session"] == self._session:
                    record.outstanding.discard(header["page_seq"])

    def _note_from_buffer(self, frames: list[bytes]) -> None:
        if frames[0] != wire.PAGE:
            return
        header = json.loads(frames[1])
        with self.lock:
            record = self.record
            record.pages_relayed += 1
            record.outstanding.add(header["page_seq"])
            record.max_outstanding = max(record.max_outstanding, len(record.outstanding))
