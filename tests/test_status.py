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


# Three restarts within 20 s raise restart_loop. The kills below come faster than the
# uplink's 5 s readings of supervisord, so a count from changes of pid would miss some.
LOOP_RESTARTS = 4
LOOP_WINDOW_S = 20
LOOP_ALERTS_TABLE = f"""
[alerts]
restart_loop_count = 3
restart_loop_window_s = {LOOP_WINDOW_S}
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


def test_status_restart_loop_counts_exactly(loop_stack: Stack) -> None:
    stack = loop_stack
    wait_status(stack, lambda r: uplink_connected(r, True), "a connected uplink")

    # Each kill waits only until supervisord runs the program again, about a second.
    started = time.monotonic()
    for _ in range(LOOP_RESTARTS):
        stack.gateway.kill9("credential_watcher")
    kills_s = time.monotonic() - started
    assert kills_s < LOOP_WINDOW_S / 2, f"{LOOP_RESTARTS} kills took {kills_s:.1f} s"

    seen: list[int] = []

    def restarts(report: dict[str, Any]) -> int:
        count = int(report["programs"]["credential_watcher"]["restarts"])
        seen.append(count)
        return count

    code, report = wait_status(stack, lambda r: restarts(r) == LOOP_RESTARTS,
                               f"{LOOP_RESTARTS} restarts counted")
    assert code == 1
    assert [(a["name"], a["key"]) for a in report["alerts"]] == [
        (alerts.RESTART_LOOP, "credential_watcher")]
    assert report["programs"]["buffer"]["restarts"] == 0
    assert report["programs"]["uplink"]["restarts"] == 0

    # The restarts leave the window one by one, and the alert clears once fewer than three
    # remain.
    code, report = wait_status(stack, lambda r: restarts(r) == 0 and r["alerts"] == [],
                               "the restarts to leave the window", 2 * LOOP_WINDOW_S)
    assert code == 0
    assert max(seen) == LOOP_RESTARTS
    # The count only falls once the kills are over.
    assert seen[seen.index(LOOP_RESTARTS):] == sorted(seen[seen.index(LOOP_RESTARTS):],
                                                       reverse=True)
    log = stack.gateway.log("uplink")
    assert log.count("alert_raised alert=restart_loop") == 1
    assert log.count("alert_cleared alert=restart_loop") == 1
    assert "supervisord_log_unreadable" not in log
