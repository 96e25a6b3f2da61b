"""Read faults against scripted Modbus servers: each gives its documented quality, and no
value ever lands on the wrong tag."""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Iterator

import pytest
from pymodbus.exceptions import ModbusIOException

from common.config import PlcDevice, PlcSettings, Tag
from common.modbus_tags import ReadRequest
from processes.plc_reader.client import PlcConnection, PlcReadError
from processes.plc_reader.poller import DevicePoller, Outbox, Reading
from processes.plc_reader.schedule import GroupSchedule
from tests.support.modbus_faults import FaultyModbusServer

LOGGER = "plcbridge.test_plc_faults"


def make_device(port: int, name: str = "plc", timeout_s: float = 0.2, **extra: object) -> PlcDevice:
    values: dict[str, object] = {
        "name": name, "transport": "tcp", "host": "127.0.0.1", "port": port, "unit_id": 1,
        "serial_port": "", "baudrate": 19200, "parity": "E", "stop_bits": 1, "byte_size": 8,
        "timeout_s": timeout_s, "max_registers_per_read": 125, "max_gap_registers": 8,
        "request_pause_ms": 0, "one_request_per_tag": False, "address_base": 0,
    }
    values.update(extra)
    return PlcDevice(**values)  # type: ignore[arg-type]


def make_settings(devices: tuple[PlcDevice, ...] = ()) -> PlcSettings:
    return PlcSettings(
        host="127.0.0.1", port=502, unit_id=1, timeout_s=0.2, reconnect_min_s=0.05,
        reconnect_max_s=0.2, max_registers_per_read=125, max_gap_registers=8,
        batch_max_samples=2000, queue_max_samples=10_000, max_unacked_batches=16,
        ack_timeout_s=2.0, tag_groups=(), tags=(), devices=devices,
    )


def tag(name: str, address: int, device: str = "plc", **extra: object) -> Tag:
    return Tag(name, "fast", "holding_register", address, "uint16", "big", 1.0, 0.0,
               device=device, **extra)  # type: ignore[arg-type]


def request_of(*tags: Tag) -> ReadRequest:
    start = min(t.address for t in tags)
    end = max(t.address + t.register_count for t in tags)
    return ReadRequest("fast", "holding_register", start, end - start, tags, tags[0].device)


@pytest.fixture
def servers() -> Iterator[list[FaultyModbusServer]]:
    started: list[FaultyModbusServer] = []
    try:
        yield started
    finally:
        for server in started:
            server.close()


@pytest.fixture
def connections() -> Iterator[list[PlcConnection]]:
    opened: list[PlcConnection] = []
    try:
        yield opened
    finally:
        for connection in opened:
            connection.close()


def serve(servers: list[FaultyModbusServer], behaviour: str) -> FaultyModbusServer:
    server = FaultyModbusServer(behaviour)
    servers.append(server)
    return server


def connect(
    connections: list[PlcConnection], server: FaultyModbusServer, timeout_s: float = 0.2
) -> PlcConnection:
    connection = PlcConnection(make_device(server.port, timeout_s=timeout_s),
                               logging.getLogger(LOGGER))
    connections.append(connection)
    connection.connect()
    return connection


def read_error(connection: PlcConnection, request: ReadRequest) -> PlcReadError:
    with pytest.raises(PlcReadError) as caught:
        connection.read(request)
    return caught.value


def test_faults_normal_server_values_by_address(
    servers: list[FaultyModbusServer], connections: list[PlcConnection]
) -> None:
    connection = connect(connections, serve(servers, "normal"))

    assert connection.read(request_of(tag("a", 40), tag("b", 42))) == [40, 41, 42]


@pytest.mark.parametrize("code", [1, 2, 3, 4, 6, 11])
def test_faults_exception_code_is_reason(
    servers: list[FaultyModbusServer], connections: list[PlcConnection], code: int
) -> None:
    connection = connect(connections, serve(servers, f"exception:{code}"))

    error = read_error(connection, request_of(tag("a", 0)))

    assert error.reason == f"modbus exception {code}"
    assert error.connection_lost is False
    assert connection.connected


def test_faults_silent_server_times_out(
    servers: list[FaultyModbusServer], connections: list[PlcConnection]
) -> None:
    connection = connect(connections, serve(servers, "silent"))

    started = time.monotonic()
    error = read_error(connection, request_of(tag("a", 0)))

    assert error.reason == "timeout"
    assert time.monotonic() - started < 1.0
    assert not connection.connected


def test_faults_wrong_transaction_id_rejected(
    servers: list[FaultyModbusServer], connections: list[PlcConnection]
) -> None:
    # pymodbus 3.16's framer skips a reply with another nonzero transaction id, so the
    # request ends as a timeout and the reply's values are never used.
    connection = connect(connections, serve(servers, "wrong_tid"))

    error = read_error(connection, request_of(tag("a", 7)))

    assert error.reason == "timeout"
    assert not connection.connected


def test_faults_transaction_id_zero_rejected(
    servers: list[FaultyModbusServer], connections: list[PlcConnection]
) -> None:
    connection = connect(connections, serve(servers, "tid_zero"))

    error = read_error(connection, request_of(tag("a", 7)))

    assert error.reason == "transaction id mismatch"
    assert "transaction id" in str(error)
    assert not connection.connected


def test_faults_late_reply_never_reaches_next_request(
    servers: list[FaultyModbusServer], connections: list[PlcConnection]
) -> None:
    server = serve(servers, "late_first")
    server.late_s = 0.4
    connection = connect(connections, server)

    error = read_error(connection, request_of(tag("first", 0)))
    assert error.reason == "timeout"

    # The late reply to address 0 arrives while the next request waits; it must be dropped.
    connection.connect()
    values = [connection.read(request_of(tag("second", 100))) for _ in range(5)]

    assert values == [[100]] * 5


def test_faults_late_reply_on_same_socket_skipped_by_tid(
    servers: list[FaultyModbusServer], connections: list[PlcConnection]
) -> None:
    # Keep the socket open after the timeout, as a client that did not reconnect would,
    # and check that pymodbus's transaction id check alone keeps the stale reply out.
    server = serve(servers, "late_first")
    server.late_s = 0.3
    connection = connect(connections, server, timeout_s=0.2)
    client = connection._client
    with pytest.raises(ModbusIOException, match="No response received"):
        client.read_holding_registers(0, count=1, device_id=1)

    second = client.read_holding_registers(100, count=1, device_id=1)

    assert not second.isError()
    assert list(second.registers) == [100]


def poll_readings(poller: DevicePoller, outbox: Outbox, polls: int) -> list[list[Reading]]:
    results = []
    for _ in range(polls):
        for schedule in poller.schedules:
            schedule.next_due = 0.0
        poller.poll_due()
        batch: list[Reading] = []
        while not outbox.empty():
            message = outbox.get_nowait()
            if message[0] == "readings":
                batch += message[1]
        results.append(batch)
    return results


def test_faults_exception_marks_block_bad_logged_once(
    servers: list[FaultyModbusServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = serve(servers, "exception:2")
    device = make_device(server.port)
    tags = (tag("a", 0), tag("b", 1), tag("c", 2))
    schedule = GroupSchedule("fast", 1.0, 0.0, [request_of(*tags)])
    outbox: Outbox = queue.SimpleQueue()
    poller = DevicePoller(device, make_settings((device,)), [schedule],
                          PlcConnection(device, logging.getLogger(LOGGER)),
                          logging.getLogger(LOGGER), outbox)
    caplog.set_level(logging.INFO, LOGGER)

    try:
        results = poll_readings(poller, outbox, 5)
    finally:
        poller.close()

    for readings in results:
        assert [(r.tag.name, r.value, r.reason) for r in readings] == [
            (name, None, "modbus exception 2") for name in ("a", "b", "c")
        ]
    failures = [r for r in caplog.records if r.getMessage().startswith("read_failed")]
    assert len(failures) == 1
    assert "modbus exception 2 (illegal data address)" in failures[0].getMessage()
