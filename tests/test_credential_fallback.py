"""Falling back to the last good credentials: the whole gateway under supervisord, the hub
emulator, a rotation that the hub rejects, and every sample checked at the subscriber.

The emulator's registry contains the device's primary key, which the gateway starts with, and
a secondary key, which the tests write as the operator's corrected rotation. Any other key
is rejected with CONNACK 5.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.last_good_credentials import MANIFEST_FILE, STORE_FOLDER
from devstack.dev_certs import make_client_cert
from tests.gateway_files import write_ca, write_client_pair
from tests.support.broker import Subscriber
from tests.support.gateway import DEVICE_KEY, Gateway, gateway_config
from tests.support.hub import HubStack, new_device_key
from tests.support.plc import PlcSimulator
from tests.support.waiting import wait_until
from tests.test_gateway import Stack, assert_complete

pytestmark = pytest.mark.integration

PLCBRIDGE = Path(sys.executable).parent / "plcbridge"
DEVICE_ID = "e2e-device"
SECONDARY_KEY = new_device_key()
RAISED = r"ERROR \S+ alert_raised alert=rotation_rejected "
CLEARED = r"INFO \S+ alert_cleared alert=rotation_rejected "


class FallbackStack(Stack):
    """The gateway behind the hub emulator, with its own copy of the CA bundle."""

    hub: HubStack

    def status(self) -> dict[str, Any]:
        result = subprocess.run([str(PLCBRIDGE), "status", "--json", "--config",
                                 str(self.gateway.config)],
                                capture_output=True, text=True, timeout=30, check=False)
        report: dict[str, Any] = json.loads(result.stdout)
        return report

    def status_text(self) -> str:
        result = subprocess.run([str(PLCBRIDGE), "status", "--config", str(self.gateway.config)],
                                capture_output=True, text=True, timeout=30, check=False)
        return result.stdout

    def active_set(self) -> str | None:
        credentials = self.status().get("credentials") or {}
        return (credentials.get("set") or {}).get("active")

    def write_key(self, key: str) -> None:
        self.gateway.connection_string.write_text(
            f"HostName=localhost;DeviceId={DEVICE_ID};SharedAccessKey={key}\n")

    def manifest(self) -> Path:
        return self.base / "state" / STORE_FOLDER / MANIFEST_FILE

    def stored_connection_string(self) -> str:
        document = json.loads(self.manifest().read_text())
        folder = self.manifest().parent / document["set"]
        return (folder / "connection-string").read_text()

    def alert_messages(self) -> list[dict[str, Any]]:
        return [json.loads(payload) for topic, payload in self.subscriber.messages
                if "plcbridge-kind=alert" in topic]

    def drain_and_check(self) -> None:
        totals = self.drain_reader()
        assert_complete(self.report(), totals)


def count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


def start_fallback_stack(base: Path, certs: Path, credentials_extra: str = "",
                         x509: bool = False) -> FallbackStack:
    plc = PlcSimulator(base)
    if x509:
        # The hub trusts device certificates that the development CA issued for the device.
        make_client_cert(base / "device", certs / "ca.pem", certs / "ca.key", DEVICE_ID)
        credentials_extra += (f'client_cert_file = "{base}/device/{DEVICE_ID}.pem"\n'
                              f'client_key_file = "{base}/device/{DEVICE_ID}.key"\n')
        hub = HubStack(certs, base / "hub", {DEVICE_ID: {"ca_signed": True}},
                       client_ca_file=certs / "ca.pem")
    else:
        hub = HubStack(certs, base / "hub",
                       {DEVICE_ID: {"primary_key": DEVICE_KEY, "secondary_key": SECONDARY_KEY}})
    ca_file = base / "ca.pem"
    shutil.copyfile(certs / "ca.pem", ca_file)
    plc.start()
    hub.start()
    subscriber = Subscriber(hub.broker.port, hub.ca_file, "devices/+/messages/events/#",
                            persistent_session=True)
    subscriber.start()
    assert plc.port is not None
    text = gateway_config(base, plc.port, hub.mqtt_port, ca_file) + credentials_extra
    gateway = Gateway(base, text, DEVICE_ID)
    if x509:
        gateway.connection_string.write_text(f"HostName=localhost;DeviceId={DEVICE_ID};x509=true\n")
    running = FallbackStack(base, plc, hub.broker, subscriber, gateway)
    running.hub = hub
    return running


def run_stack(running: FallbackStack) -> Iterator[FallbackStack]:
    try:
        running.gateway.start()
        # The first accepted CONNACK saves the set the gateway started with.
        wait_until(running.manifest().exists, 30, "the last good set saved", step_s=0.2)
        running.wait_for_samples(100)
        yield running
    finally:
        running.gateway.stop()
        running.subscriber.stop()
        running.hub.stop()
        running.plc.stop()


@pytest.fixture
def stack(base: Path, certs: Path) -> Iterator[FallbackStack]:
    yield from run_stack(start_fallback_stack(base, certs))


@pytest.fixture
def x509_stack(base: Path, certs: Path) -> Iterator[FallbackStack]:
    yield from run_stack(start_fallback_stack(base, certs, x509=True))


@pytest.fixture
def stack_without_fallback(base: Path, certs: Path) -> Iterator[FallbackStack]:
    yield from run_stack(start_fallback_stack(base, certs, "fallback_to_last_good = false\n"))


def test_fallback_rejected_key_keeps_data_flowing(stack: FallbackStack) -> None:
    uplink_log = stack.gateway.log
    stack.write_key(new_device_key())

    # The watcher restarts the uplink, the hub rejects the key, and the uplink goes back.
    wait_until(lambda: count(r"credential_set set=last_good", uplink_log("uplink")), 30,
               "the uplink on the last good set")
    stack.hub.wait_for_log("connect_rejected client_id=e2e-device")
    stack.wait_for_samples(200)
    wait_until(lambda: stack.active_set() == "last_good", 20, "status showing the fallback")
    status_text = stack.status_text()
    assert "ON THE LAST GOOD SET" in status_text
    assert str(stack.gateway.connection_string) in status_text

    # The alert names the rejected file and reaches the cloud.
    raised = stack.subscriber.wait_for(
        lambda _messages: [alert for alert in stack.alert_messages()
                           if alert["name"] == "rotation_rejected"], 30,
        "the rotation_rejected alert at the subscriber")
    assert raised[0]["state"] == "raised"
    assert str(stack.gateway.connection_string) in raised[0]["detail"]
    assert "last good set" in raised[0]["detail"]
    # The last good set is still the key that connected, not the rejected one.
    assert DEVICE_KEY in stack.stored_connection_string()

    # A restart on the fallback tries the new key once, then falls back again, quietly.
    pid_before = stack.gateway.pid("uplink")
    result = stack.gateway.supervisorctl("restart", "plcbridge:uplink")
    assert "started" in result.stdout, result.stdout + result.stderr
    wait_until(lambda: count(r"credential_set set=last_good", uplink_log("uplink")) >= 2, 30,
               "the restarted uplink on the last good set")
    stack.wait_for_samples(100)
    assert stack.gateway.pid("uplink") != pid_before
    assert count(RAISED, uplink_log("uplink")) == 1
    assert count(r"uplink_restarted", uplink_log("credential_watcher")) == 1

    # A key that the hub accepts ends the fallback and clears the alert.
    stack.write_key(SECONDARY_KEY)
    wait_until(lambda: count(CLEARED, uplink_log("uplink")), 30, "the alert cleared")
    stack.hub.wait_for_log('auth="sas secondary"')
    wait_until(lambda: SECONDARY_KEY in stack.stored_connection_string(), 20,
               "the secondary key saved as the last good set")
    wait_until(lambda: stack.active_set() == "current", 20, "status off the fallback")
    stack.drain_and_check()

    assert count(RAISED, uplink_log("uplink")) == 1
    assert count(CLEARED, uplink_log("uplink")) == 1
    states = [alert["state"] for alert in stack.alert_messages()
              if alert["name"] == "rotation_rejected"]
    assert states.count("raised") >= 1
    for key in (DEVICE_KEY, SECONDARY_KEY):
        for program in ("uplink", "credential_watcher"):
            assert key not in uplink_log(program)


def test_fallback_off_retries_new_key(stack_without_fallback: FallbackStack) -> None:
    stack = stack_without_fallback
    uplink_log = stack.gateway.log
    rejected_before = count("connect_rejected", stack.hub.log())
    stack.write_key(new_device_key())

    wait_until(lambda: count(RAISED, uplink_log("uplink")), 30, "the alert raised")
    assert "fallback_to_last_good is false" in uplink_log("uplink")
    # The uplink keeps trying the new key while the buffer keeps the samples.
    wait_until(lambda: count("connect_rejected", stack.hub.log()) >= rejected_before + 3, 30,
               "three rejected attempts with the new key")
    wait_until(lambda: (stack.status().get("buffer") or {}).get("pages", 0) > 5, 30,
               "pages waiting in the buffer")
    assert "credential_set" not in uplink_log("uplink")
    assert stack.active_set() == "current"

    stack.write_key(SECONDARY_KEY)
    wait_until(lambda: count(CLEARED, uplink_log("uplink")), 30, "the alert cleared")
    stack.drain_and_check()
    assert count(RAISED, uplink_log("uplink")) == 1


def test_fallback_untrusted_ca_bundle(stack: FallbackStack) -> None:
    uplink_log = stack.gateway.log
    ca_file = stack.base / "ca.pem"
    write_ca(ca_file, "a root that did not sign the hub's certificate")

    wait_until(lambda: count(r"credential_set set=last_good", uplink_log("uplink")), 30,
               "the uplink on the last good CA bundle")
    assert "certificate verify failed" in uplink_log("uplink")
    stack.wait_for_samples(200)
    line = [line for line in uplink_log("uplink").splitlines()
            if re.search(RAISED, line)]
    assert len(line) == 1
    assert str(ca_file) in line[0]
    assert str(stack.gateway.connection_string) not in line[0]

    # The operator puts the right bundle back, and the uplink connects with the files again.
    shutil.copyfile(stack.hub.ca_file, ca_file)
    wait_until(lambda: count(CLEARED, uplink_log("uplink")), 30, "the alert cleared")
    stack.drain_and_check()


def test_fallback_client_certificate_rejected_in_tls(x509_stack: FallbackStack) -> None:
    stack = x509_stack
    uplink_log = stack.gateway.log
    cert = stack.base / "device" / f"{DEVICE_ID}.pem"
    key = stack.base / "device" / f"{DEVICE_ID}.key"
    # A self-signed pair, which the hub's TLS layer rejects: it closes the connection
    # after the handshake without a TLS alert.
    write_client_pair(cert, key, DEVICE_ID)

    wait_until(lambda: count(r"credential_set set=last_good", uplink_log("uplink")), 30,
               "the uplink on the last good certificate")
    stack.hub.wait_for_log("tls_failed")
    stack.wait_for_samples(200)
    line = [line for line in uplink_log("uplink").splitlines() if re.search(RAISED, line)]
    assert len(line) == 1
    assert str(cert) in line[0]
    assert str(key) in line[0]
    assert "after a new client certificate" in line[0]
    stack.drain_and_check()
