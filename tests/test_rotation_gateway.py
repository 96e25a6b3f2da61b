"""A running gateway under supervisord rotates its credentials through the hub emulator.

`plcbridge rotate` installs a connection string with the device's secondary key, the
credential watcher restarts the uplink alone, the emulator admits the secondary key, and
every sample the reader read still arrives.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
SECONDARY_KEY = new_device_key()


@dataclass
class HubStackGateway:
    hub: HubStack
    stack: Stack

    def all_logs(self) -> str:
        programs = ("buffer", "plc_reader", "uplink", "credential_watcher")
        return "".join(self.stack.gateway.log(name) for name in programs) + self.hub.log()


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

    totals = stack.drain_reader()
    assert len(totals) == 1
    assert_complete(stack.report(), totals)
    assert SECONDARY_KEY not in running.all_logs() + result.stdout + tap_output.read_text()
