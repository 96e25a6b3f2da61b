"""A running gateway under supervisord rotates its credentials through the hub emulator.

`plcbridge rotate`, or a rotate_credentials command from the cloud, installs a connection
string with the device's secondary key. The credential watcher restarts the uplink alone,
the emulator admits the secondary key, and every sample the reader read still arrives.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.gateway_files import stop_process
from tests.support.broker import Subscriber
from tests.support.gateway import DEVICE_KEY, ROOT, Gateway, gateway_config
from tests.support.hub import HubStack, new_device_key
from tests.support.plc import PlcSimulator
from tests.support.waiting import wait_until
from tests.test_gateway import Stack, assert_complete

pytestmark = pytest.mark.integration

DEVICE = "e2e-device"
C2D_TOPIC = f"devices/{DEVICE}/messages/devicebound/%24.to=%2Fdevices%2F{DEVICE}"
SECONDARY_KEY = new_device_key()


@dataclass
class HubStackGateway:
    hub: HubStack
    stack: Stack

    def all_logs(self) -> str:
        programs = ("buffer", "plc_reader", "uplink", "credential_watcher")
        return "".join(self.stack.gateway.log(name) for name in programs) + self.hub.log()

    def send(self, body: dict[str, Any]) -> None:
        """Publish a command to the device's cloud-to-device topic, as IoT Hub delivers it."""
        self.stack.subscriber.client.publish(C2D_TOPIC, json.dumps(body).encode(), qos=1)

    def results(self) -> list[dict[str, Any]]:
        return [json.loads(payload) for topic, payload in self.stack.subscriber.messages
                if "plcbridge-kind=command-result" in topic]

    def wait_result(self, request_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((r for r in self.results() if r["request_id"] == request_id), None)

        result: dict[str, Any] = wait_until(found, timeout_s, f"the result of {request_id}")
        return result

    def wait_subscribed(self) -> None:
        """Send unknown commands until one is rejected: the uplink's subscription is then up."""
        probes = itertools.count(1)
        wait_until(lambda: self.probe(next(probes)), 30, "a result for a probe command",
                   step_s=0.5)

    def probe(self, number: int) -> bool:
        self.send({"command": "probe", "request_id": f"probe-{number}"})
        return "probe" in {result["command"] for result in self.results()}

    def finish_complete(self) -> None:
        """Stop the reader and check that every sample it read arrived, in one epoch."""
        totals = self.stack.drain_reader()
        assert len(totals) == 1
        assert_complete(self.stack.report(), totals)


@pytest.fixture
def running(base: Path, certs: Path) -> Iterator[HubStackGateway]:
    plc = PlcSimulator(base)
    plc.start()
    devices = {DEVICE: {"primary_key": DEVICE_KEY, "secondary_key": SECONDARY_KEY}}
    try:
        with HubStack(certs, base / "hub", devices=devices) as hub:
            subscriber = Subscriber(hub.broker.port, hub.ca_file, "devices/+/messages/events/#",
                                    persistent_session=True)
            subscriber.start()
            assert plc.port is not None
            gateway = Gateway(base, gateway_config(base, plc.port, hub.mqtt_port,
                                                   certs / "ca.pem"), DEVICE)
            try:
                gateway.start()
                yield HubStackGateway(hub, Stack(base, plc, hub.broker, subscriber, gateway))
            finally:
                gateway.stop()
                subscriber.stop()
    finally:
        plc.stop()


def test_rotate_cli_to_secondary_key_loses_nothing(running: HubStackGateway) -> None:
    hub, stack = running.hub, running.stack
    hub.wait_for_log('auth="sas primary"', timeout_s=30)
    stack.wait_for_samples(200)
    reader_pid = stack.gateway.pid("plc_reader")
    uplink_pid = stack.gateway.pid("uplink")
    new = stack.base / "new-connection-string.txt"
    new.write_text(hub.connection_string(DEVICE, SECONDARY_KEY) + "\n")

    tap_output = stack.base / "tap.jsonl"
    with tap_output.open("wb") as output:
        tap = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "tap", "--config", str(stack.gateway.config),
             "credential_watcher", "--json", "--timeout-s", "60"],
            cwd=ROOT, stdout=output, stderr=subprocess.DEVNULL)
    try:
        # The tap prints the watcher's counters once a second once it is subscribed.
        wait_until(lambda: tap_output.read_text().strip(), 15, "the watcher's tap")
        result = subprocess.run(
            [sys.executable, "-m", "cli.main", "rotate", "--config", str(stack.gateway.config),
             "--connection-string-file", str(new)],
            cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 0, result
        wait_until(lambda: '"kind":"rotation"' in tap_output.read_text(), 15,
                   "a rotation event on the watcher's tap")
    finally:
        stop_process(tap)

    line = hub.wait_for_log('auth="sas secondary"', timeout_s=30)
    assert f"client_id={DEVICE}" in line
    stack.wait_for_samples(200)

    rotations = [json.loads(text) for text in tap_output.read_text().splitlines()
                 if '"kind":"rotation"' in text]
    assert [(r["source"], r["status"], r["files"]) for r in rotations] == [
        ("cli", "ok", [str(stack.gateway.connection_string)])]
    assert stack.gateway.pid("uplink") != uplink_pid
    assert stack.gateway.pid("plc_reader") == reader_pid
    assert stack.gateway.connection_string.read_bytes() == new.read_bytes()

    running.finish_complete()
    assert SECONDARY_KEY not in running.all_logs() + result.stdout + tap_output.read_text()


def test_rotate_c2d_to_secondary_key_loses_nothing(running: HubStackGateway) -> None:
    hub, stack = running.hub, running.stack
    hub.wait_for_log('auth="sas primary"', timeout_s=30)
    running.wait_subscribed()
    stack.wait_for_samples(200)
    reader_pid = stack.gateway.pid("plc_reader")
    uplink_pid = stack.gateway.pid("uplink")
    pushed = hub.connection_string(DEVICE, SECONDARY_KEY)

    running.send({"command": "rotate_credentials", "request_id": "rot-1",
                  "connection_string": pushed})

    result = running.wait_result("rot-1")
    assert result["status"] == "ok"
    assert result["files"] == [str(stack.gateway.connection_string)]
    assert result["credentials"]["device"] == DEVICE
    # The result comes from the uplink that connected with the secondary key.
    line = hub.wait_for_log('auth="sas secondary"', timeout_s=1)
    assert f"client_id={DEVICE}" in line
    assert stack.gateway.pid("uplink") != uplink_pid
    assert stack.gateway.connection_string.read_text() == pushed + "\n"
    results_folder = stack.base / "state" / "command-results"
    wait_until(lambda: not any(results_folder.iterdir()), 15,
               "the stored result deleted after its PUBACK")
    stack.wait_for_samples(200)
    assert stack.gateway.pid("plc_reader") == reader_pid

    running.finish_complete()
    assert SECONDARY_KEY not in running.all_logs()
    assert [r["request_id"] for r in running.results()].count("rot-1") == 1
