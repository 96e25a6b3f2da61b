"""Write requests in the reader: run by the device's poller thread against the PLC simulator,
and received on the command socket from a real ZeroMQ DEALER."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from common import wire
from common.config import PlcDevice
from processes.plc_reader.client import PlcConnection
from processes.plc_reader.poller import DevicePoller, Outbox
from processes.plc_reader.schedule import GroupSchedule
from processes.plc_reader.write_requests import WriteJob, WriteServer
from tests.support.modbus_faults import FaultyModbusServer
from tests.support.plc import PlcSimulator
from tests.support.waiting import wait_until
from tests.test_plc_faults import LOGGER, make_device, make_settings, request_of, tag
from tests.test_plc_writes import SCRATCH, read_back, writable

# Fixtures: the simulator, and a Modbus connection of the test's own to read back writes.
from tests.test_plc_writes import connection as connection
from tests.test_plc_writes import plc as plc

ROUTE = b"uplink"


class RunningPoller:
    """A DevicePoller on its own thread, polling one tag every 50 ms."""

    def __init__(self, device: PlcDevice) -> None:
        self.outbox: Outbox = queue.SimpleQueue()
        schedule = GroupSchedule("fast", 0.05, 0.0, [request_of(tag("a", 0))])
        self.poller = DevicePoller(device, make_settings((device,)), [schedule],
                                   PlcConnection(device, logging.getLogger(LOGGER)),
                                   logging.getLogger(LOGGER), self.outbox)
        self.stop = threading.Event()
        self.poller.start(self.stop)

    def close(self) -> None:
        self.stop.set()
        self.poller.wake()
        self.poller.join(5.0)
        self.poller.close()

    def results(self, count: int, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """Return the next count write results, skipping readings and events."""
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while len(found) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"only {len(found)} of {count} write results in "
                                     f"{timeout_s:g} s")
            try:
                message = self.outbox.get(timeout=remaining)
            except queue.Empty:
                continue
            if message[0] == "written":
                assert message[1] == ROUTE
                found.append(message[2])
        return found


@pytest.fixture
def pollers() -> Iterator[list[RunningPoller]]:
    started: list[RunningPoller] = []
    try:
        yield started
    finally:
        for running in started:
            running.close()


def job(request_id: str, value: object, address: int = SCRATCH, deadline_s: float = 30.0,
        **extra: Any) -> WriteJob:
    return WriteJob(ROUTE, 1, request_id, writable("w", address, **extra), value,
                    time.monotonic() + deadline_s)


def test_poller_writes_between_polls(plc: PlcSimulator, connection: PlcConnection,
                                     pollers: list[RunningPoller]) -> None:
    running = RunningPoller(make_device(plc.port, timeout_s=1.0))
    pollers.append(running)

    running.poller.request_write(job("w1", 4321))
    result = running.results(1)[0]

    assert result == {"write_id": 1, "request_id": "w1", "tag": "w", "status": "ok",
                      "reason": None, "message": "", "value": 4321}
    assert read_back(connection, writable("w", SCRATCH)) == 4321
    polls = running.poller.polls
    wait_until(lambda: running.poller.polls > polls + 2, 10, "polls after the write")


def test_poller_write_rejected_and_failed(plc: PlcSimulator,
                                          pollers: list[RunningPoller]) -> None:
    running = RunningPoller(make_device(plc.port, timeout_s=1.0))
    pollers.append(running)

    running.poller.request_write(job("w2", 70000))
    running.poller.request_write(job("w3", 1, address=60000))
    out_of_range, exception = running.results(2)

    assert out_of_range["status"] == "rejected"
    assert out_of_range["reason"] == "out of range"
    assert exception["status"] == "failed"
    assert exception["reason"] == "modbus exception 2"
    assert "illegal data address" in exception["message"]


def test_poller_expired_write_not_sent(plc: PlcSimulator, connection: PlcConnection,
                                      pollers: list[RunningPoller]) -> None:
    running = RunningPoller(make_device(plc.port, timeout_s=1.0))
    pollers.append(running)
    before = read_back(connection, writable("w", SCRATCH + 1))

    running.poller.request_write(job("w4", 999 if before != 999 else 998,
                                     address=SCRATCH + 1, deadline_s=-1.0))
    result = running.results(1)[0]

    assert result["status"] == "failed"
    assert result["reason"] == "timeout"
    assert "nothing was sent to the PLC" in result["message"]
    assert read_back(connection, writable("w", SCRATCH + 1)) == before


def test_poller_hung_device_delays_only_itself(plc: PlcSimulator,
                                               pollers: list[RunningPoller]) -> None:
    silent = FaultyModbusServer("silent")
    try:
        hung = RunningPoller(make_device(silent.port, name="hung", timeout_s=5.0))
        healthy = RunningPoller(make_device(plc.port, name="healthy", timeout_s=1.0))
        pollers += [hung, healthy]

        hung.poller.request_write(job("slow", 1))
        healthy.poller.request_write(job("fast", 2, address=SCRATCH + 2))

        # The healthy device's write completes while the hung one's poll still waits for
        # its 5 s timeout, and the hung write runs after that poll.
        assert healthy.results(1)[0]["status"] == "ok"
        assert [message for message in _drain(hung.outbox) if message[0] == "written"] == []
        assert hung.results(1)[0]["status"] == "failed"
    finally:
        silent.close()


def _drain(outbox: Outbox) -> list[tuple[Any, ...]]:
    messages = []
    while not outbox.empty():
        messages.append(outbox.get_nowait())
    return messages


def test_write_server_rejects_unknown_tag(base: Path,
                                          context: zmq.Context[zmq.Socket[bytes]]) -> None:
    endpoint = wire.endpoint(base, wire.COMMAND)
    known = writable("w", SCRATCH)
    server = WriteServer(context, endpoint, {"w": known}, logging.getLogger(LOGGER))
    dealer = wire.make_socket(context, zmq.DEALER, wire.COMMAND_HWM, linger_ms=0)
    dealer.connect(endpoint)
    try:
        header = {"write_id": 7, "request_id": "r7", "tag": "nothing", "value": 1,
                  "deadline_ms": 10**12}
        dealer.send_multipart(wire.encode(wire.WRITE, header))
        dealer.send_multipart([b"write", b"not json"])
        dealer.send_multipart(wire.encode(wire.WRITE, {**header, "tag": "w", "write_id": 8}))

        def received() -> tuple[list[WriteJob], list[tuple[bytes, dict[str, Any]]]]:
            jobs: list[WriteJob] = []
            answers: list[tuple[bytes, dict[str, Any]]] = []
            deadline = time.monotonic() + 5.0
            while (len(jobs), len(answers)) != (1, 1) and time.monotonic() < deadline:
                new_jobs, new_answers = server.receive()
                jobs += new_jobs
                answers += new_answers
                time.sleep(0.01)
            return jobs, answers

        jobs, answers = received()
        assert [(found.write_id, found.tag.name) for found in jobs] == [(8, "w")]
        route, answer = answers[0]
        assert answer["status"] == "rejected"
        assert answer["reason"] == "unknown tag"
        assert answer["write_id"] == 7

        server.answer(route, answer)
        frames = dealer.recv_multipart()
        assert wire.decode(frames).kind == wire.WRITTEN
    finally:
        dealer.close()
        server.close()
