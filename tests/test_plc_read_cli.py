"""`plcbridge read` against the PLC simulator: configured tags and one ad-hoc tag."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.plc import ROOT, PlcSimulator
from tests.test_plc_devices import write_devices_config

SERIAL_NUMBER = 22091017


@pytest.fixture(scope="module")
def plc() -> Iterator[PlcSimulator]:
    folder = Path(tempfile.mkdtemp(prefix="pb-", dir="/tmp"))
    simulator = PlcSimulator(folder, bench_registers=10)
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()


def plcbridge_read(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "read", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )


def test_read_cli_ad_hoc_serial_number(plc: PlcSimulator) -> None:
    result = plcbridge_read("--host", "127.0.0.1", "--port", str(plc.port), "--unit", "1",
                            "--table", "input_register", "--address", "10",
                            "--type", "uint32", "--order", "ABCD")

    assert result.returncode == 0, result.stderr
    assert "requests: 1" in result.stdout
    assert "input_register address 10 count 2: ok" in result.stdout
    assert f"raw [0x0151 0x1509] value {SERIAL_NUMBER} good" in result.stdout


def test_read_cli_ad_hoc_one_based_address(plc: PlcSimulator) -> None:
    result = plcbridge_read("--host", "127.0.0.1", "--port", str(plc.port), "--json",
                            "--table", "input_register", "--address", "11",
                            "--address-base", "1", "--type", "uint32")

    request, tag = (json.loads(line) for line in result.stdout.splitlines())
    assert result.returncode == 0, result.stderr
    assert (request["address"], request["count"]) == (10, 2)
    assert tag["value"] == SERIAL_NUMBER
    assert tag["raw"] == [SERIAL_NUMBER >> 16, SERIAL_NUMBER & 0xFFFF]


def test_read_cli_config_tags_and_requests(plc: PlcSimulator, base: Path) -> None:
    config = write_devices_config(base, plc.port)

    result = plcbridge_read("--config", str(config), "--json")

    lines = [json.loads(line) for line in result.stdout.splitlines()]
    requests = [line for line in lines if line["kind"] == "request"]
    tags = {line["name"]: line for line in lines if line["kind"] == "tag"}
    assert result.returncode == 0, result.stderr
    assert sorted((r["device"], r["unit_id"], r["table"], r["address"], r["count"])
                  for r in requests) == [("a", 1, "holding_register", 0, 6),
                                         ("b", 2, "holding_register", 0, 2),
                                         ("b", 2, "input_register", 10, 2)]
    assert list(tags) == ["a.counter", "a.zero", "b.counter", "b.serial"]
    assert tags["b.serial"]["value"] == SERIAL_NUMBER
    assert all(tag["quality"] == "good" for tag in tags.values())


def test_read_cli_one_tag_by_name(plc: PlcSimulator, base: Path) -> None:
    config = write_devices_config(base, plc.port)

    result = plcbridge_read("--config", str(config), "--tag", "b.serial")

    assert result.returncode == 0, result.stderr
    assert "requests: 1" in result.stdout
    assert f"b.serial: input_register address 10 uint32 raw [0x0151 0x1509] value " \
           f"{SERIAL_NUMBER} good" in result.stdout


def test_read_cli_exception_exits_one(plc: PlcSimulator) -> None:
    result = plcbridge_read("--host", "127.0.0.1", "--port", str(plc.port), "--address", "5000")

    assert result.returncode == 1
    assert "modbus exception 2 (illegal data address)" in result.stdout
    assert "value null bad (modbus exception 2)" in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--host", "127.0.0.1", "--address", "0", "--order", "XYZ", "--type", "float32"],
         "command line: invalid value for plc.tags[0].order: 'XYZ'"),
        (["--host", "127.0.0.1"], "missing --address"),
        (["--address", "0"], "command line: missing key plc.host"),
        (["--config", "x.toml", "--address", "3"], "--address describes an ad-hoc tag"),
        (["--tag", "a"], "--tag needs --config"),
    ],
)
def test_read_cli_usage_errors_exit_two(args: list[str], expected: str) -> None:
    result = plcbridge_read(*args)

    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_read_cli_unknown_tag_exits_two(plc: PlcSimulator, base: Path) -> None:
    config = write_devices_config(base, plc.port)

    result = plcbridge_read("--config", str(config), "--tag", "nope")

    assert result.returncode == 2
    assert "tag 'nope' not found in [[plc.tags]]" in result.stderr
