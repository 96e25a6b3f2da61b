"""`plcbridge status` against a whole gateway under supervisord, after scripted faults."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common import alerts
from tests.support.gateway import wait_until
from tests.test_gateway import Stack, start_stack, stop_stack

pytestmark = pytest.mark.integration

PLCBRIDGE = Path(sys.executable).parent / "plcbridge"

# Samples older than MAX_AGE_S are dropped by the buffer, so a broker outage of a few
# seconds makes drops without filling a disk.
MAX_AGE_S = 2
ALERTS_TABLE = """
[alerts]
no_publish_s = 60
health_interval_s = 0
"""


@pytest.fixture
def aged_stack(base: Path, certs: Path) -> Iterator[Stack]:
    running = start_stack(base, certs, extra_buffer=f"max_age_s = {MAX_AGE_S}")
    try:
        config = running.gateway.config
        config.write_text(config.read_text() + ALERTS_TABLE)
        running.gateway.start()
        yield running
    finally:
        stop_stack(running)


def status(stack: Stack) -> tuple[int, dict[str, Any]]:
    result = subprocess.run([str(PLCBRIDGE), "status", "--json", "--config",
                             str(stack.gateway.config)],
                            capture_output=True, text=True, timeout=30, check=False)
    return result.returncode, json.loads(result.stdout)


def wait_status(stack: Stack, predicate: Any, what: str, timeout_s: float = 40) -> Any:
    def check() -> tuple[int, dict[str, Any]] | None:
        code, report = status(stack)
        return (code, report) if predicate(report) else None

    return wait_until(check, timeout_s, what, step_s=0.3)


def uplink_connected(report: dict[str, Any], state: bool) -> bool:
    return bool(report.get("uplink")) and report["uplink"]["connected"] is state


def test_status_after_restarts_outage_drops(aged_stack: Stack) -> None:
    stack = aged_stack
    stack.wait_for_samples(100)
    code, report = wait_status(stack, lambda r: uplink_connected(r, True), "a healthy gateway")
    assert code == 0, report["alerts"]
    assert report["running"] is True
    assert sorted(report["programs"]) == ["buffer", "credential_watcher", "plc_reader",
                                          "provisioning", "uplink"]
    # Without [provisioning] the provisioning program exits at once, and for good, which
    # the restart count does not take for a failure.
    assert report["programs"]["provisioning"]["state"] == "EXITED"
    wait_status(stack, lambda r: r["programs"]["provisioning"]["restarts"] is not None,
                "the provisioning program in the uplink's health report")
    _code, report = status(stack)
    assert report["programs"]["provisioning"]["restarts"] == 0
    assert report["plc"]["devices"]["plc"]["state"] == "connected"

    # Two restarts: the uplink killed, the buffer restarted by the operator.
    stack.gateway.kill9("uplink")
    result = stack.gateway.supervisorctl("restart", "plcbridge:buffer")
    assert "started" in result.stdout, result.stdout + result.stderr
    stack.wait_for_samples(50)

    # A broker outage long enough for the buffer to drop samples older than MAX_AGE_S.
    stack.broker.stop()
    wait_status(stack, lambda r: uplink_connected(r, False), "the uplink disconnected")
    wait_status(stack, lambda r: (r.get("buffer") or {}).get("dropped_samples", 0) > 0,
                "drops of aged samples")
    stack.broker.start()
    wait_status(stack, lambda r: uplink_connected(r, True), "the uplink reconnected", 60)

    code, report = wait_status(
        stack,
        lambda r: r["programs"]["uplink"]["restarts"] == 1
        and r["programs"]["buffer"]["restarts"] == 1,
        "both restarts counted")
    assert code == 1
    programs = {name: info for name, info in report["programs"].items()
                if name != "provisioning"}
    assert {name: info["state"] for name, info in programs.items()} == dict.fromkeys(
        programs, "RUNNING")
    assert programs["plc_reader"]["restarts"] == 0
    assert programs["credential_watcher"]["restarts"] == 0
    assert programs["uplink"]["uptime_s"] < programs["plc_reader"]["uptime_s"]

    buffer_file = json.loads((stack.base / "run" / "buffer-status.json").read_text())
    dropped = sum(c["samples"] for c in buffer_file["dropped_by_reason"].values())
    assert report["buffer"]["dropped_samples"] > 0
    assert report["buffer"]["dropped_samples"] <= dropped
    assert report["uplink"]["last_puback_ts_ms"] > time.time() * 1000 - 30_000
    names = [alert["name"] for alert in report["alerts"]]
    assert alerts.SAMPLES_DROPPED in names
    assert alerts.RESTART_LOOP not in names
    assert report["credentials"]["scheme"].startswith("azure")


LOOP_ALERTS_TABLE = """
[alerts]
restart_loop_count = 2
restart_loop_window_s = 10
health_interval_s = 0
"""


@pytest.fixture
def loop_stack(base: Path, certs: Path) -> Iterator[Stack]:
    running = start_stack(base, certs)
    try:
        config = running.gateway.config
        config.write_text(config.read_text() + LOOP_ALERTS_TABLE)
        running.gateway.start()
        yield running
    finally:
        stop_stack(running)


def test_status_restart_loop_raises_and_clears(loop_stack: Stack) -> None:
    stack = loop_stack
    wait_status(stack, lambda r: uplink_connected(r, True), "a connected uplink")

    # Each kill must be seen by the monitor, which reads supervisord every 5 s, before the
    # next one: two kills within one reading show as a single change of pid.
    for restarts in (1, 2):
        stack.gateway.kill9("credential_watcher")
        wait_status(stack, lambda r, n=restarts: r["programs"]["credential_watcher"]
                    ["restarts"] == n, f"{restarts} restarts seen")

    code, report = wait_status(
        stack, lambda r: [a for a in r["alerts"] if a["name"] == alerts.RESTART_LOOP],
        "the restart_loop alert")
    assert code == 1
    assert [(a["name"], a["key"]) for a in report["alerts"]] == [
        (alerts.RESTART_LOOP, "credential_watcher")]

    # The first restart leaves the 10 s window, and the alert clears.
    code, report = wait_status(stack, lambda r: r["alerts"] == [], "the alert to clear", 40)
    assert code == 0
    log = stack.gateway.log("uplink")
    assert log.count("alert_raised alert=restart_loop") == 1
    assert log.count("alert_cleared alert=restart_loop") == 1
