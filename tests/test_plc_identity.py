"""The PLC's serial-number identity: read at start, the PLC unreachable, and a swapped PLC."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from devstack.gateway_toml import simulator_tags
from processes.plc_reader.identity import IdentityError, check_composed_id, compose_id
from tests.support.plc import ROOT, PlcSimulator, free_port
from tests.support.waiting import wait_until
from tests.test_plc_reader import (
    StandInBuffer,
    TapWatcher,
    cleanup,
    start_buffer,
    start_reader,
    watch_tap,
    write_config,
)
from tests.test_plc_tags import base_config, config_error, tag_toml

__all__ = ["cleanup"]  # a fixture shared with the module it comes from

SERIAL_NUMBER = "22091017"
IDENTITY_KEYS = """
[plc.identity]
table = "input_register"
serial_address = 10
"""
COUNTER_TAG = simulator_tags("line1.counter")


@pytest.mark.parametrize(
    ("year", "month", "unit", "expected"),
    [(22, 9, 1017, "22091017"), (2022, 9, 1017, "22091017"), (0, 1, 0, "00010000"),
     (99, 12, 9999, "99129999")],
)
def test_identity_compose_id(year: int, month: int, unit: int, expected: str) -> None:
    assert compose_id(year, month, unit) == expected


@pytest.mark.parametrize(("year", "month", "unit"), [(22, 13, 1), (22, 0, 1), (100, 1, 1),
                                                     (22, 1, 10000)])
def test_identity_compose_id_rejects(year: int, month: int, unit: int) -> None:
    with pytest.raises(IdentityError, match="expected year 0-99 or 2000-2099, month 1-12"):
        compose_id(year, month, unit)


def test_identity_composed_register_checked() -> None:
    assert check_composed_id(22091017) == "22091017"
    assert check_composed_id(1010001) == "01010001"
    with pytest.raises(IdentityError, match="8-digit YYMMNNNN"):
        check_composed_id(22131017)
    with pytest.raises(IdentityError, match="8-digit YYMMNNNN"):
        check_composed_id(123456789)


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ("[plc.identity]\nyear_address = 1\n",
         "plc.identity.serial_address: None; expected serial_address, or all three"),
        ("[plc.identity]\nserial_address = 1\nyear_address = 3\n",
         "plc.identity.serial_address: 1; expected either serial_address or the three"),
        ("[plc.identity]\nserial_address = 1\ntable = \"coil\"\n",
         "plc.identity.table: 'coil'; expected one of holding_register, input_register"),
        ("[plc.identity]\nserial_address = 1\nrecheck_interval_s = 0.5\n",
         "plc.identity.recheck_interval_s: 0.5; expected 0, or a number from 1 to 86400"),
        ("[plc.identity]\nserial_address = 1\nrecheck_interval_s = -1\n",
         "plc.identity.recheck_interval_s: -1; expected a number from 0 to 86400"),
    ],
)
def test_identity_config_errors(tmp_path: Path, keys: str, expected: str) -> None:
    path = tmp_path / "plcbridge.toml"
    path.write_text(base_config(plc_keys="", tags=tag_toml("") + keys))

    assert expected in config_error(path)


@pytest.fixture
def base(base: Path) -> Path:
    """The shared short folder, with the run folder where the stand-in buffer binds."""
    (base / "run").mkdir()
    return base


def identity_file(base: Path) -> Path:
    return base / "state" / "plc-identity.json"


def store_id(base: Path, plc_id: str) -> None:
    identity_file(base).parent.mkdir(parents=True, exist_ok=True)
    identity_file(base).write_text(json.dumps({"plc_id": plc_id}))


def stored_id(base: Path) -> str:
    return str(json.loads(identity_file(base).read_text())["plc_id"])


def test_identity_first_start_stores_id(
    base: Path, cleanup: list[Callable[[], None]]
) -> None:
    with PlcSimulator(base, bench_registers=10) as plc:
        buffer = start_buffer(base, cleanup)
        reader = start_reader(write_config(base, plc.port, IDENTITY_KEYS, COUNTER_TAG), cleanup)

        wait_until(lambda: len(buffer.snapshot()) >= 10, 10, "10 samples")
        samples = buffer.snapshot()

    assert all(sample["quality"] == "good" for sample in samples)
    assert stored_id(base) == SERIAL_NUMBER
    assert "identity_recorded plc_id=22091017" in reader.log()


def test_identity_unreachable_uses_stored_id(
    base: Path, cleanup: list[Callable[[], None]]
) -> None:
    store_id(base, SERIAL_NUMBER)
    buffer = start_buffer(base, cleanup)
    reader = start_reader(write_config(base, free_port(), IDENTITY_KEYS, COUNTER_TAG), cleanup)

    wait_until(lambda: len(buffer.snapshot()) >= 5, 10, "5 bad samples")
    wait_until(lambda: "identity_unverified" in reader.log(), 5, "identity_unverified")

    log = reader.log()
    assert log.count("identity_unverified") == 1, log
    assert "samples are sent under the stored id 22091017" in log
    assert all(sample["quality"] == "bad" for sample in buffer.snapshot())


def test_identity_swapped_plc_withheld_until_confirmed(
    base: Path, cleanup: list[Callable[[], None]]
) -> None:
    store_id(base, "21010001")
    with PlcSimulator(base, bench_registers=10) as plc:
        config = write_config(base, plc.port, IDENTITY_KEYS, COUNTER_TAG)
        buffer = start_buffer(base, cleanup)
        reader = start_reader(config, cleanup)
        tap = watch_tap(base, cleanup)

        wait_until(lambda: "identity_changed" in reader.log(), 10, "identity_changed")
        wait_until(lambda: (tap.counter("withheld_samples") or 0) >= 20, 10,
                   "20 withheld samples")
        assert buffer.snapshot() == []
        assert tap.counter("identity") == "changed"
        assert "ERROR" in reader.log().split("identity_changed")[0].splitlines()[-1]

        result = subprocess.run(
            [sys.executable, "-m", "cli.main", "confirm-identity", "--config", str(config)],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert "stored PLC id 22091017" in result.stdout
        assert "(was 21010001)" in result.stdout

        wait_until(lambda: "identity_confirmed" in reader.log(), 5, "identity_confirmed")
        wait_until(lambda: len(buffer.snapshot()) >= 5, 10, "samples after confirmation")
        samples = buffer.snapshot()

    assert stored_id(base) == SERIAL_NUMBER
    assert all(sample["quality"] == "good" for sample in samples)


def confirm_identity_with_id(base: Path, identity: str) -> subprocess.CompletedProcess[str]:
    """Run `plcbridge confirm-identity --id identity` against a PLC that is not there."""
    config = write_config(base, free_port(), IDENTITY_KEYS, COUNTER_TAG)
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "confirm-identity", "--config", str(config),
         "--id", identity],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )


def test_identity_confirm_with_explicit_id(base: Path) -> None:
    result = confirm_identity_with_id(base, "23120042")

    assert result.returncode == 0, result.stderr
    assert stored_id(base) == "23120042"


def test_identity_confirm_bad_id_exits_two(base: Path) -> None:
    result = confirm_identity_with_id(base, "2209")

    assert result.returncode == 2
    assert "--id '2209': expected 8 digits YYMMNNNN" in result.stderr


SWAPPED_SERIAL_NUMBER = "23010042"


def identity_keys(recheck_interval_s: float) -> str:
    return IDENTITY_KEYS + f"recheck_interval_s = {recheck_interval_s}\n"


def confirm_identity(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "confirm-identity", "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )


def assert_withholding(buffer: StandInBuffer, tap: TapWatcher) -> None:
    """Check that samples read after the swap are counted as withheld and never sent."""
    wait_until(lambda: (tap.counter("withheld_samples") or 0) >= 20, 10,
               "20 withheld samples")
    # Samples read before the swap was noticed may still be on their way. They reach the
    # buffer within an ack round trip, and nothing may arrive after them.
    sent = len(buffer.snapshot())
    withheld = tap.counter("withheld_samples")
    wait_until(lambda: tap.counter("withheld_samples") >= withheld + 50, 10,
               "50 more withheld samples")
    assert len(buffer.snapshot()) == sent
    assert tap.counter("identity") == "changed"


def test_identity_swap_while_running_noticed_at_interval(
    base: Path, cleanup: list[Callable[[], None]]
) -> None:
    serial_file = base / "plc-serial.txt"
    serial_file.write_text(SERIAL_NUMBER)
    with PlcSimulator(base, bench_registers=10, serial_file=serial_file) as plc:
        config = write_config(base, plc.port, identity_keys(1), COUNTER_TAG)
        buffer = start_buffer(base, cleanup)
        reader = start_reader(config, cleanup)
        tap = watch_tap(base, cleanup)
        wait_until(lambda: len(buffer.snapshot()) >= 10, 10, "10 samples before the swap")
        assert stored_id(base) == SERIAL_NUMBER

        # The registers change under a live connection, so only the periodic read detects it.
        serial_file.write_text(SWAPPED_SERIAL_NUMBER)
        wait_until(lambda: "identity_changed" in reader.log(), 10, "identity_changed")
        line = reader.log().split("identity_changed")[1].splitlines()[0]
        assert f"plc_id={SWAPPED_SERIAL_NUMBER} stored_id={SERIAL_NUMBER}" in line
        assert_withholding(buffer, tap)
        changes = [event for event in tap.drain().events if event["kind"] == "identity"]
        assert changes[-1]["state"] == "changed"
        assert changes[-1]["plc_id"] == SWAPPED_SERIAL_NUMBER
        assert stored_id(base) == SERIAL_NUMBER

        result = confirm_identity(config)
        assert result.returncode == 0, result.stderr
        assert f"(was {SERIAL_NUMBER})" in result.stdout
        wait_until(lambda: "identity_confirmed" in reader.log(), 5, "identity_confirmed")
        sent = len(buffer.snapshot())
        wait_until(lambda: len(buffer.snapshot()) >= sent + 10, 10,
                   "samples after the confirmation")

    assert stored_id(base) == SWAPPED_SERIAL_NUMBER
    log = reader.log()
    assert log.count("identity_changed") == 1, log
    # The periodic reads of an unchanged id are not logged.
    assert log.count("identity_verified") == 0, log


def test_identity_swap_noticed_at_reconnect(
    base: Path, cleanup: list[Callable[[], None]]
) -> None:
    serial_file = base / "plc-serial.txt"
    serial_file.write_text(SERIAL_NUMBER)
    port = free_port()
    store_id(base, SERIAL_NUMBER)
    # No periodic read: only the reconnect can reveal the swap.
    config = write_config(base, port, identity_keys(0), COUNTER_TAG)
    buffer = start_buffer(base, cleanup)
    with PlcSimulator(base, port=port, bench_registers=10, serial_file=serial_file):
        reader = start_reader(config, cleanup)
        tap = watch_tap(base, cleanup)
        wait_until(lambda: "identity_verified" in reader.log(), 10, "identity_verified")
        wait_until(lambda: len(buffer.snapshot()) >= 10, 10, "10 samples before the swap")

    # The PLC goes away and another one responds on the same address.
    wait_until(lambda: "plc_disconnected" in reader.log(), 10, "plc_disconnected")
    swapped_ms = time.time_ns() // 1_000_000
    serial_file.write_text(SWAPPED_SERIAL_NUMBER)
    with PlcSimulator(base, port=port, bench_registers=10, serial_file=serial_file):
        wait_until(lambda: "identity_changed" in reader.log(), 10, "identity_changed")
        assert_withholding(buffer, tap)

    # Not one good sample of the new PLC went out, not even from the first poll after the
    # reconnect: the id was read before those readings were handed over.
    after_swap = [sample for sample in buffer.snapshot() if sample["ts_ms"] >= swapped_ms]
    assert all(sample["quality"] == "bad" for sample in after_swap), after_swap
    assert stored_id(base) == SERIAL_NUMBER
