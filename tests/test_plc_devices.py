"""Several devices: one polling thread each, a dead device among them, deadbands."""

from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from common.config import load_config
from common.modbus_tags import ReadRequest
from devstack.gateway_toml import gateway_dirs, gateway_toml
from processes.plc_reader.client import PlcConnection
from processes.plc_reader.poller import DevicePoller, Outbox, Reading
from processes.plc_reader.report import ReportFilter
from processes.plc_reader.schedule import GroupSchedule
from tests.support.modbus_faults import FaultyModbusServer
from tests.support.plc import PlcSimulator
from tests.support.waiting import wait_until
from tests.test_plc_faults import LOGGER, make_device, make_settings, servers, tag
from tests.test_plc_reader import by_name, cleanup, start_buffer, start_reader

__all__ = ["cleanup", "servers"]  # fixtures shared with the modules they come from

INTERVAL_S = 0.02


def poller_for(server: FaultyModbusServer, name: str, outbox: Outbox) -> DevicePoller:
    device = make_device(server.port, name=name, timeout_s=0.3)
    tags = tuple(tag(f"{name}.{i}", i, device=name) for i in range(10))
    request = ReadRequest("fast", "holding_register", 0, 10, tags, name)
    schedule = GroupSchedule("fast", INTERVAL_S, time.monotonic(), [request])
    connection = PlcConnection(device, logging.getLogger(LOGGER))
    return DevicePoller(device, make_settings((device,)), [schedule], connection,
                        logging.getLogger(LOGGER), outbox)


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def test_devices_dead_one_keeps_others_on_cadence(servers: list[FaultyModbusServer]) -> None:
    healthy = [FaultyModbusServer("normal"), FaultyModbusServer("normal")]
    dead = FaultyModbusServer("silent")
    servers.extend([*healthy, dead])
    outbox: Outbox = queue.SimpleQueue()
    pollers = [poller_for(healthy[0], "north", outbox), poller_for(dead, "dead", outbox),
               poller_for(healthy[1], "south", outbox)]
    stop = threading.Event()
    readings: list[Reading] = []

    for poller in pollers:
        poller.start(stop)
    try:
        # 2 s at 20 ms is 100 polls per healthy device; the dead one times out every 0.3 s.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                message = outbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if message[0] == "readings":
                readings += message[1]
    finally:
        stop.set()
        for poller in pollers:
            poller.join(2.0)
            poller.close()

    north, dead_poller, south = pollers
    for poller in (north, south):
        lateness = list(poller.lateness_s)
        print(f"{poller.device.name}: polls={poller.polls} "
              f"p50={statistics.median(lateness) * 1000:.2f} ms p99={p99(lateness) * 1000:.2f} ms")
        assert poller.polls >= 80, poller.device.name
        assert poller.overruns <= 2, poller.device.name
        # Generous: a 20 ms cadence on a shared 2-core machine; a blocked thread would be late
        # by the dead device's 0.3 s timeout.
        assert p99(lateness) < 0.1, poller.device.name
        assert poller.state == "connected"
    assert dead_poller.state == "disconnected"

    good = [r for r in readings if r.tag.device != "dead"]
    bad = [r for r in readings if r.tag.device == "dead"]
    assert good
    assert all(r.value == r.tag.address for r in good)
    assert bad
    assert {r.reason for r in bad} <= {"timeout", "connection failed"}
    assert "timeout" in {r.reason for r in bad}
    assert all(r.ts_ms > 0 for r in readings)


def test_devices_deadband_absolute_and_silence() -> None:
    report = ReportFilter()
    band = tag("t", 0, deadband=0.5, max_silence_s=10.0)

    sent = [report.should_report(band, value, "", now) for value, now in [
        (10.0, 0.0), (10.4, 1.0), (9.6, 2.0), (10.6, 3.0), (10.7, 4.0), (10.7, 14.0)]]

    assert sent == [True, False, False, True, False, True]


def test_devices_deadband_percent_and_quality() -> None:
    report = ReportFilter()
    band = tag("t", 0, deadband_percent=10.0, max_silence_s=60.0)

    sent = [report.should_report(band, value, reason, now) for value, reason, now in [
        (100, "", 0.0), (109, "", 1.0), (None, "timeout", 2.0), (None, "timeout", 3.0),
        (100, "", 4.0), (111, "", 5.0)]]

    assert sent == [True, False, True, False, True, True]


def test_devices_no_deadband_reports_every_poll() -> None:
    report = ReportFilter()
    plain = tag("t", 0)

    assert all(report.should_report(plain, 5, "", float(now)) for now in range(5))


def test_devices_reader_process_two_units_and_deadband(
    base: Path, cleanup: list[Callable[[], None]]
) -> None:
    (base / "run").mkdir()
    with PlcSimulator(base, bench_registers=10) as plc:
        config = write_devices_config(base, plc.port)
        load_config(config)
        buffer = start_buffer(base, cleanup)
        start_reader(config, cleanup)

        wait_until(lambda: len(by_name(buffer.snapshot(), "b.counter")) >= 20, 10,
                 "20 samples from device b")
        samples = buffer.snapshot()

    a_counter = by_name(samples, "a.counter")
    b_serial = by_name(samples, "b.serial")
    steady = by_name(samples, "a.zero")
    assert a_counter
    assert all(s["quality"] == "good" and s["unit"] == "ticks" for s in a_counter)
    assert b_serial[0]["value"] == 22091017
    assert "unit" not in b_serial[0]
    # Holding register 5 is always 0, so its deadband tag is sent once at start only.
    assert len(steady) == 1
    assert [s["seq"] for s in samples] == list(range(len(samples)))


def write_devices_config(base: Path, port: int) -> Path:
    path = base / "plcbridge.toml"
    path.write_text(gateway_toml(
        gateway=gateway_dirs(base),
        plc={"timeout_s": 0.3, "reconnect_min_s": 0.1, "reconnect_max_s": 0.4},
        devices=[
            {"name": "a", "host": "127.0.0.1", "port": port, "unit_id": 1},
            {"name": "b", "host": "127.0.0.1", "port": port, "unit_id": 2,
             "max_registers_per_read": 16},
        ],
        tag_groups=[{"name": "fast", "poll_interval_ms": 20}],
        tags=[
            {"name": "a.counter", "device": "a", "group": "fast", "table": "holding_register",
             "address": 0, "type": "uint32", "unit": "ticks"},
            {"name": "a.zero", "device": "a", "group": "fast", "table": "holding_register",
             "address": 5, "deadband": 0.5, "max_silence_s": 600},
            {"name": "b.counter", "device": "b", "group": "fast", "table": "holding_register",
             "address": 0, "type": "uint32"},
            {"name": "b.serial", "device": "b", "group": "fast", "table": "input_register",
             "address": 10, "type": "uint32"},
        ],
        uplink={"mode": "mqtt"},
        broker={"host": "127.0.0.1", "client_id": "plc-devices-test"},
        credentials={"ca_file": f"{base}/ca.pem"},
    ))
    return path


@pytest.mark.parametrize(
    ("devices", "tag_keys", "expected"),
    [
        ('[[plc.devices]]\nname = "a"\nhost = "h"\n[[plc.devices]]\nname = "b"\nhost = "h"\n',
         "", "missing key plc.tags[0].device; expected one of the device names a, b"),
        ('[[plc.devices]]\nname = "a"\nhost = "h"\n', 'device = "x"',
         "plc.tags[0].device: 'x'; expected one of the device names a"),
        ('[[plc.devices]]\nname = "a"\n', "", "missing key plc.devices[0].host"),
        ('[[plc.devices]]\nname = "a"\ntransport = "rtu"\n', "",
         "missing key plc.devices[0].serial_port"),
        ('[[plc.devices]]\nname = "a"\nhost = "h"\n[[plc.devices]]\nname = "a"\nhost = "h"\n',
         'device = "a"', "duplicate name 'a' in plc.devices"),
        ('[[plc.devices]]\nname = "a"\nhost = "h"\nbaud = 9600\n', "",
         "unknown key plc.devices[0].baud"),
    ],
)
def test_devices_config_errors(
    tmp_path: Path, devices: str, tag_keys: str, expected: str
) -> None:
    from tests.test_plc_tags import base_config, config_error, tag_toml

    text = base_config(plc_keys="", tags=devices + tag_toml(tag_keys))
    text = text.replace('host = "127.0.0.1"\n', "", 1)
    path = tmp_path / "plcbridge.toml"
    path.write_text(text)

    assert expected in config_error(path)
