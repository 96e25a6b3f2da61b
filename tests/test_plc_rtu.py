"""Modbus RTU on a pseudo-terminal pair from socat, with a noisy line, and RTU over TCP.

The PLC is the simulator speaking RTU frames over TCP. A relay thread in the test joins
that TCP connection to one end of the pty pair, and the reader's client opens the other end
as its serial port. The relay can hold back a reply and inject garbage bytes toward the
client, as a noisy RS-485 line does.
"""

from __future__ import annotations

import logging
import os
import random
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import PlcDevice, Tag
from common.modbus_tags import ReadRequest
from processes.plc_reader.client import PlcConnection, PlcReadError
from tests.support.plc import ROOT, accepts_connections, free_port
from tests.support.waiting import wait_until
from tests.test_plc_faults import LOGGER, connections, make_device

__all__ = ["connections"]  # a fixture shared with the module it comes from

SERIAL_NUMBER = 22091017
SERIAL_WORDS = [SERIAL_NUMBER >> 16, SERIAL_NUMBER & 0xFFFF]


class RtuSimulator:
    """devstack.plc_simulator with --framer rtu, on a free loopback port."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.log = folder / "rtu-simulator.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "devstack.plc_simulator", "--port", str(self.port),
                 "--framer", "rtu", "--bench-registers", "10"],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            )
        wait_until(lambda: accepts_connections(self.port) or self.process.poll() is not None,
                 10, "the RTU simulator to listen")
        assert self.process.poll() is None, self.log.read_text()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


class SerialRelay:
    """socat's pty pair, with the far end relayed to the RTU simulator by a thread."""

    def __init__(self, folder: Path, plc_port: int) -> None:
        self.client_path = str(folder / "ttyPLC")
        relay_path = folder / "ttyRelay"
        self.socat = subprocess.Popen(
            ["socat", f"pty,raw,echo=0,link={self.client_path}",
             f"pty,raw,echo=0,link={relay_path}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: os.path.exists(self.client_path) and relay_path.exists(), 5,
                 "socat's pty pair")
        self._tty = os.open(relay_path, os.O_RDWR | os.O_NOCTTY)
        self._plc = socket.create_connection(("127.0.0.1", plc_port), timeout=5)
        self.hold_next_reply_s = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serial-relay", daemon=True)
        self._thread.start()

    def inject(self, garbage: bytes) -> None:
        """Write garbage toward the client, as line noise would deliver it."""
        with self._lock:
            os.write(self._tty, garbage)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        os.close(self._tty)
        self._plc.close()
        self.socat.terminate()
        self.socat.wait(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._tty, self._plc.fileno()], [], [], 0.05)
            if self._tty in ready:
                self._plc.sendall(os.read(self._tty, 4096))
            if self._plc.fileno() in ready:
                reply = self._plc.recv(4096)
                if not reply:
                    return
                if self.hold_next_reply_s:
                    self._stop.wait(self.hold_next_reply_s)
                    self.hold_next_reply_s = 0.0
                with self._lock:
                    os.write(self._tty, reply)


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pb-rtu-", dir="/tmp"))
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


@pytest.fixture(scope="module")
def rtu_plc(folder: Path) -> Iterator[RtuSimulator]:
    simulator = RtuSimulator(folder)
    try:
        yield simulator
    finally:
        simulator.stop()


@pytest.fixture
def relay(folder: Path, rtu_plc: RtuSimulator) -> Iterator[SerialRelay]:
    line = SerialRelay(folder, rtu_plc.port)
    try:
        yield line
    finally:
        line.close()


def serial_device(relay: SerialRelay, timeout_s: float = 0.3) -> PlcDevice:
    return make_device(0, transport="rtu", serial_port=relay.client_path, baudrate=115200,
                       parity="N", timeout_s=timeout_s)


def input_request(address: int, count: int = 2) -> ReadRequest:
    tag = Tag("t", "fast", "input_register", address, "uint32", "big", 1.0, 0.0)
    return ReadRequest("fast", "input_register", address, count, (tag,))


def open_connection(device: PlcDevice, connections: list[PlcConnection]) -> PlcConnection:
    connection = PlcConnection(device, logging.getLogger(LOGGER))
    connections.append(connection)
    connection.connect()
    return connection


def test_rtu_serial_reads_serial_number(
    relay: SerialRelay, connections: list[PlcConnection]
) -> None:
    connection = open_connection(serial_device(relay), connections)

    assert connection.endpoint == relay.client_path
    assert connection.read(input_request(10)) == SERIAL_WORDS


def test_rtu_late_reply_flushed_not_misassigned(
    relay: SerialRelay, connections: list[PlcConnection]
) -> None:
    # RTU frames carry no transaction id: only the flush after a timeout keeps the late
    # serial-number reply from being taken as the reply to the read of address 0.
    connection = open_connection(serial_device(relay, timeout_s=0.2), connections)
    relay.hold_next_reply_s = 0.25

    with pytest.raises(PlcReadError) as caught:
        connection.read(input_request(10))
    assert caught.value.reason == "timeout"

    connection.connect()
    values = [connection.read(input_request(0)) for _ in range(5)]

    assert all(value != SERIAL_WORDS for value in values)
    assert all(value[1] == 0 for value in values)


def test_rtu_noisy_line_never_wrong_value(
    relay: SerialRelay, connections: list[PlcConnection]
) -> None:
    connection = open_connection(serial_device(relay, timeout_s=0.2), connections)
    rng = random.Random(6)
    good = bad = 0
    reasons: set[str] = set()

    for attempt in range(60):
        if attempt % 3 == 0:
            relay.inject(rng.randbytes(rng.randint(1, 12)))
        try:
            if not connection.connected:
                connection.connect()
            value = connection.read(input_request(10))
        except PlcReadError as exc:
            bad += 1
            reasons.add(exc.reason)
            continue
        assert value == SERIAL_WORDS
        good += 1

    # Once the noise stops, every read succeeds again.
    recovered = []
    for _ in range(10):
        if not connection.connected:
            connection.connect()
        recovered.append(connection.read(input_request(10)))

    print(f"noisy line: good={good} bad={bad} reasons={sorted(reasons)}")
    assert good >= 30
    assert reasons <= {"timeout", "protocol error", "connection failed"}
    assert recovered == [SERIAL_WORDS] * 10


def test_rtu_missing_port_names_it(folder: Path) -> None:
    device = make_device(0, transport="rtu", serial_port=str(folder / "ttyNone"))
    connection = PlcConnection(device, logging.getLogger(LOGGER))

    with pytest.raises(PlcReadError) as caught:
        connection.connect()

    assert caught.value.reason == "connection failed"
    assert f"open serial port {folder / 'ttyNone'} failed" in str(caught.value)


def test_rtu_over_tcp_reads_serial_number(
    rtu_plc: RtuSimulator, connections: list[PlcConnection]
) -> None:
    device = make_device(rtu_plc.port, transport="rtu_over_tcp")

    connection = open_connection(device, connections)

    assert connection.read(input_request(10)) == SERIAL_WORDS
    assert connection.read(input_request(0, count=1))[0] > 0
    started = time.monotonic()
    assert connection.read(input_request(10)) == SERIAL_WORDS
    assert time.monotonic() - started < 0.3
