"""Health alerts and `plcbridge status`, with a real uplink against the hub emulator.

The test plays the buffer twice: StandInBuffer is its delivery ROUTER, and the test writes
the buffer's status file, buffer-status.json, as the buffer does every second. A PUB socket
on the reader's tap endpoint plays the reader's counters.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from common import alerts, wire
from common.alerts import AlertBook, alerts_path
from tests import test_azure_credentials as azure_tests
from tests import test_uplink as uplink_tests
from tests.support.broker import Subscriber
from tests.support.hub import HubStack
from tests.test_uplink import StandInBuffer, sample_page, write_connection_string
from tests.test_uplink_credentials import given_token

pytestmark = pytest.mark.integration

buffer = uplink_tests.buffer
uplinks = uplink_tests.uplinks
hubs = azure_tests.hubs

PLCBRIDGE = Path(sys.executable).parent / "plcbridge"
EVENTS_FILTER = "devices/+/messages/events/#"


# -- the alert book on its own --------------------------------------------------------------


def test_alert_book_raises_and_clears_once(base: Path, caplog: pytest.LogCaptureFixture) -> None:
    published: list[dict[str, Any]] = []
    logger = logging.getLogger("plcbridge.test")

    def publish(kind: str, **values: Any) -> None:
        published.append({"kind": kind, **values})

    book = AlertBook("uplink", base, logger, publish)
    with caplog.at_level(logging.INFO, logger="plcbridge.test"):
        for _ in range(3):
            book.set(alerts.BUFFER_FULL, True, "the buffer is 91.0 % full")
        for _ in range(3):
            book.set(alerts.BUFFER_FULL, False)

    raised = [r for r in caplog.records if "alert_raised" in r.getMessage()]
    cleared = [r for r in caplog.records if "alert_cleared" in r.getMessage()]
    assert len(raised) == 1
    assert raised[0].levelno == logging.ERROR
    assert len(cleared) == 1
    assert cleared[0].levelno == logging.INFO
    assert [event["state"] for event in published] == ["raised", "cleared"]
    assert all(event["kind"] == "alert" for event in published)


def test_alert_book_survives_restart(base: Path) -> None:
    logger = logging.getLogger("plcbridge.test")
    first = AlertBook("uplink", base, logger, lambda *_a, **_k: None)
    first.raise_alert(alerts.PLC_UNREACHABLE, "PLC press1 has not answered", key="press1")

    published: list[str] = []
    second = AlertBook("uplink", base, logger, lambda kind, **v: published.append(v["state"]))
    second.raise_alert(alerts.PLC_UNREACHABLE, "again", key="press1")
    assert published == []
    assert second.is_open(alerts.PLC_UNREACHABLE, "press1")
    assert [change.state for change in second.unsent] == ["raised"]

    second.mark_sent(second.unsent[0].seq)
    third = AlertBook("uplink", base, logger, lambda *_a, **_k: None)
    assert third.unsent == []
    document = json.loads(alerts_path(base, "uplink").read_text())
    assert document["open"][0]["key"] == "press1"


# -- helpers for the gateway tests ----------------------------------------------------------


class BufferStatus:
    """Writes buffer-status.json as the buffer would, with figures the test sets."""

    def __init__(self, runtime_dir: Path) -> None:
        self.path = runtime_dir / "buffer-status.json"
        self.figures: dict[str, Any] = {"pages": 0, "bytes": 0, "open_samples": 0,
                                        "max_bytes": 1_000_000, "dropped_by_reason": {}}

    def write(self) -> None:
        document = {**self.figures, "running": True, "pid": os.getpid(),
                    "ts_ms": int(time.time() * 1000)}
        temporary = self.path.with_name(".buffer-status.json.test")
        temporary.write_text(json.dumps(document))
        os.replace(temporary, self.path)


class StandInReaderTap:
    """The reader's tap: publishes counters with the devices' states that the test sets."""

    def __init__(self, runtime_dir: Path) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.socket = wire.make_socket(self.context, zmq.PUB, wire.TAP_HWM, linger_ms=0)
        self.socket.bind(wire.tap_endpoint(runtime_dir, "plc_reader"))
        self.devices: dict[str, dict[str, Any]] = {}
        self.dropped_samples = 0

    def publish(self) -> None:
        message = {"ts_ms": int(time.time() * 1000), "process": "plc_reader",
                   "kind": "counters", "devices": self.devices,
                   "dropped_samples": self.dropped_samples,
                   "plc_connected": all(d["state"] == "connected" for d in self.devices.values())}
        self.socket.send_multipart([b"plc_reader", json.dumps(message).encode()])

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


@pytest.fixture
def reader_tap(base: Path) -> Iterator[StandInReaderTap]:
    (base / "run").mkdir(parents=True, exist_ok=True)
    tap = StandInReaderTap(base / "run")
    try:
        yield tap
    finally:
        tap.close()


@pytest.fixture
def subscribers() -> Iterator[list[Subscriber]]:
    started: list[Subscriber] = []
    try:
        yield started
    finally:
        for subscriber in started:
            subscriber.stop()


def status(base: Path) -> tuple[int, dict[str, Any], str]:
    result = subprocess.run([str(PLCBRIDGE), "status", "--json", "--config",
                             str(base / "uplink.toml")],
                            capture_output=True, text=True, timeout=30, check=False)
    report = json.loads(result.stdout) if result.stdout.strip() else {}
    return result.returncode, report, result.stderr


def alert_messages(messages: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    return [json.loads(payload) for topic, payload in messages
            if "plcbridge-kind=alert" in topic]


def config_text(base: Path, stack: HubStack, alerts_table: str) -> str:
    return azure_tests.hub_config(base, stack) + f"\n[alerts]\n{alerts_table}\n"


def count_lines(log: str, pattern: str) -> int:
    return len(re.findall(pattern, log))


# -- the gateway tests ----------------------------------------------------------------------


def test_status_silent_expiry_alert_reaches_cloud(
    base: Path, certs: Path, hubs: Any, buffer: StandInBuffer, uplinks: Any,
    subscribers: list[Subscriber],
) -> None:
    """A given token expires while connected; the hub closes and rejects the reconnect."""
    stack = hubs(certs)
    subscriber = Subscriber(stack.broker.port, stack.ca_file, EVENTS_FILTER)
    subscriber.start()
    subscribers.append(subscriber)
    buffer_status = BufferStatus(base / "run")
    buffer_status.write()

    # Connected with a token that has a few seconds left, and a page acknowledged.
    write_connection_string(base, given_token(int(time.time()) + 8))
    config = config_text(base, stack, "no_publish_s = 2\nhealth_interval_s = 0")
    uplink = uplinks(base, config)
    buffer.wait_link("up", 20)
    buffer.send_page(0, sample_page(0))
    buffer.wait_for(lambda: buffer.pubacks, 10, "the first puback")

    # The token expires; from then on pages pile up in the buffer, and none goes out.
    buffer.wait_for(lambda: buffer_status.write() or buffer.links[-1]["state"] == "down",
                    30, "the hub to close the expired connection")
    down_at = time.monotonic()
    buffer_status.figures.update(pages=3, bytes=3000)

    def unhealthy() -> tuple[int, dict[str, Any], str] | None:
        buffer_status.write()
        code, report, stderr = status(base)
        names = [alert["name"] for alert in report.get("alerts", [])]
        return (code, report, stderr) if alerts.NO_PUBLISH in names else None

    code, report, stderr = buffer.wait_for(unhealthy, 30, "status to show no_publish")
    # no_publish_s is 2; the rest is the status command's and a loaded machine's delay.
    assert time.monotonic() - down_at < 20
    assert code == 1
    assert "open alerts" in stderr
    assert report["uplink"]["connected"] is False
    assert report["uplink"]["last_puback_ts_ms"] is not None
    assert report["buffer"]["pages"] == 3
    assert report["credentials"]["time_left_s"] <= 0
    uplink.wait_log(r"ERROR .*alert_raised alert=credentials", 20)
    # Only the token's coming expiry reached the cloud while the link was up.
    sent_early = alert_messages(subscriber.messages)
    assert [m["name"] for m in sent_early] == [alerts.CREDENTIALS]
    assert "outdated soon" in sent_early[0]["detail"]

    # A valid token, and a restart of the uplink as the credential watcher would do it.
    first_log = uplink.log()
    uplink.terminate(20)
    write_connection_string(base, given_token(int(time.time()) + 3600))
    restarted = uplinks(base, config)
    buffer.wait_for(lambda: buffer_status.write() or buffer.links[-1]["state"] == "up",
                    30, "the link to come back")
    received = subscriber.wait_for(
        lambda messages: [m for m in alert_messages(messages)
                          if m["name"] == alerts.NO_PUBLISH and m["state"] == "raised"],
        20, "the no_publish alert at the cloud")
    assert received[0]["process"] == "uplink"

    # The first page after the restart clears the alert, and the cloud hears of that too.
    buffer.send_page(1, sample_page(1))
    subscriber.wait_for(
        lambda messages: [m for m in alert_messages(messages)
                          if m["name"] == alerts.NO_PUBLISH and m["state"] == "cleared"],
        20, "the cleared no_publish alert at the cloud")
    second_log = restarted.log()
    assert count_lines(first_log, r"ERROR \S+ alert_raised alert=no_publish") == 1
    assert count_lines(second_log, r"alert_raised alert=no_publish") == 0
    assert count_lines(second_log, r"INFO \S+ alert_cleared alert=no_publish") == 1


def test_alerts_each_raise_and_clear_once(
    base: Path, certs: Path, hubs: Any, buffer: StandInBuffer, uplinks: Any,
    reader_tap: StandInReaderTap,
) -> None:
    stack = hubs(certs)
    write_connection_string(base)
    buffer_status = BufferStatus(base / "run")
    settings = ("buffer_fill_percent = 50\ndrops_clear_s = 2\nplc_unreachable_s = 1\n"
                "health_interval_s = 0")
    uplink = uplinks(base, config_text(base, stack, settings))
    reader_tap.devices = {"press1": {"state": "connected", "last_good_ts_ms": None,
                                     "bad_tags": 0}}
    buffer.wait_link("up", 20)

    def feed() -> None:
        buffer_status.write()
        reader_tap.publish()

    def wait_alert(name: str, state: str) -> None:
        pattern = rf"alert_{state} alert={name}"
        buffer.wait_for(lambda: feed() or re.search(pattern, uplink.log()), 20, pattern)

    buffer_status.figures.update(bytes=600_000)
    wait_alert(alerts.BUFFER_FULL, "raised")
    buffer_status.figures.update(bytes=100_000)
    wait_alert(alerts.BUFFER_FULL, "cleared")

    buffer_status.figures["dropped_by_reason"] = {"oldest": {"pages": 1, "samples": 40}}
    wait_alert(alerts.SAMPLES_DROPPED, "raised")
    wait_alert(alerts.SAMPLES_DROPPED, "cleared")

    reader_tap.devices["press1"]["state"] = "disconnected"
    wait_alert(alerts.PLC_UNREACHABLE, "raised")
    code, report, _stderr = status(base)
    assert code == 1
    assert report["plc"]["devices"]["press1"]["state"] == "disconnected"
    assert [(a["name"], a["key"]) for a in report["alerts"]] == [
        (alerts.PLC_UNREACHABLE, "press1")]
    reader_tap.devices["press1"]["state"] = "connected"
    wait_alert(alerts.PLC_UNREACHABLE, "cleared")

    # Some more seconds of unchanged figures must not raise or clear anything again.
    deadline = time.monotonic() + 3
    buffer.wait_for(lambda: feed() or time.monotonic() > deadline, 10, "3 quiet seconds")
    log = uplink.log()
    for name in (alerts.BUFFER_FULL, alerts.SAMPLES_DROPPED, alerts.PLC_UNREACHABLE):
        assert count_lines(log, rf"ERROR \S+ alert_raised alert={name} ") == 1, name
        assert count_lines(log, rf"INFO \S+ alert_cleared alert={name} ") == 1, name
    code, report, stderr = status(base)
    assert code == 0, stderr
    assert report["alerts"] == []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_metrics_endpoint_serves_health(
    base: Path, certs: Path, hubs: Any, buffer: StandInBuffer, uplinks: Any,
    reader_tap: StandInReaderTap,
) -> None:
    stack = hubs(certs)
    write_connection_string(base)
    buffer_status = BufferStatus(base / "run")
    buffer_status.figures.update(pages=2, bytes=2048)
    port = free_port()
    config = config_text(base, stack, "plc_unreachable_s = 1\nhealth_interval_s = 0")
    uplink = uplinks(base, config + f"\n[metrics]\nport = {port}\n")
    reader_tap.devices = {"press1": {"state": "disconnected", "last_good_ts_ms": None,
                                     "bad_tags": 4}}
    buffer.wait_link("up", 20)
    uplink.wait_log(r"INFO .*metrics_served host=127.0.0.1", 20)

    def scrape() -> str | None:
        buffer_status.write()
        reader_tap.publish()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text: str = answer.read().decode()
        return text if 'plcbridge_alert_open{alert="plc_unreachable"' in text else None

    text = buffer.wait_for(scrape, 20, "the plc_unreachable alert in the metrics")
    assert "plcbridge_uplink_connected 1.0" in text
    assert "plcbridge_buffer_pages 2.0" in text
    assert 'plcbridge_plc_bad_tags{device="press1"} 4.0' in text
    assert 'plcbridge_plc_connected{device="press1"} 0.0' in text
    assert "plcbridge_uplink_pages_published_total" in text
    assert 'plcbridge_alert_open{alert="plc_unreachable",key="press1"} 1.0' in text


def test_alert_clock_raised_and_cleared(
    base: Path, certs: Path, hubs: Any, buffer: StandInBuffer, uplinks: Any,
) -> None:
    # The hub's clock runs 30 days ahead of the gateway's, so the uplink applies an offset.
    stack = hubs(certs)
    stack.set_faults(clock_offset_s=30 * 86400)
    write_connection_string(base)
    config = config_text(base, stack, "health_interval_s = 0")
    uplink = uplinks(base, config)
    buffer.wait_link("up", 20)
    lines = uplink.wait_log(r"ERROR \S+ alert_raised alert=clock ", 20)
    assert "offset from the hub" in lines[0]
    code, report, _stderr = status(base)
    assert code == 1
    assert report["credentials"]["clock"]["offset_s"] > 29 * 86400

    # With the clocks agreeing again, the restarted uplink finds its clock right.
    stack.set_faults(clock_offset_s=0)
    uplink.terminate(20)
    buffer.links.clear()
    restarted = uplinks(base, config)
    buffer.wait_link("up", 20)
    restarted.wait_log(r"INFO \S+ alert_cleared alert=clock ", 20)
    assert count_lines(restarted.log(), r"alert_raised alert=clock") == 0


def test_alerts_bad_status_file_keeps_delivering(
    base: Path, certs: Path, hubs: Any, buffer: StandInBuffer, uplinks: Any,
) -> None:
    stack = hubs(certs)
    write_connection_string(base)
    buffer_status = BufferStatus(base / "run")
    buffer_status.figures.update(pages="many")
    buffer_status.write()
    uplink = uplinks(base, config_text(base, stack, "health_interval_s = 0"))
    buffer.wait_link("up", 20)

    lines = uplink.wait_log(r"ERROR \S+ health_check_failed ", 20)
    assert "TypeError" in lines[0]
    buffer.send_page(0, sample_page(0))
    buffer.wait_for(lambda: buffer.pubacks, 10, "a puback despite the bad status file")
    assert count_lines(uplink.log(), "health_check_failed") == 1
