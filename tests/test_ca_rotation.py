"""A CA rotation: the gateway's CA bundle gains the next root, then the hub moves to a server
certificate under it, and every sample still arrives.

The hub emulator loads its certificate again when the files change or on SIGHUP, and
devstack.dev_certs makes the second CA. The gateway runs whole under supervisord, so the
credential watcher, not the test, restarts the uplink with the new bundle.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.dev_certs import NEXT_PREFIX, DevCerts, ensure_dev_certs
from tests.support.broker import Subscriber, client_tls_context
from tests.support.gateway import DEVICE_KEY, Gateway, gateway_config
from tests.support.hub import HubStack, RawMqttClient, username
from tests.support.plc import PlcSimulator
from tests.support.waiting import wait_until
from tests.test_gateway import TOPIC_FILTER, Stack, assert_complete

pytestmark = pytest.mark.integration

DEVICE_ID = "e2e-device"


@pytest.fixture
def two_cas(base: Path) -> tuple[DevCerts, DevCerts]:
    """The development CA and the next one, in this test's own folder."""
    folder = base / "certs"
    return ensure_dev_certs(folder)[0], ensure_dev_certs(folder, NEXT_PREFIX)[0]


@pytest.fixture
def hub(base: Path, two_cas: tuple[DevCerts, DevCerts]) -> Iterator[HubStack]:
    """The emulator with a copy of the first CA's server pair, which the test may overwrite."""
    current, _next = two_cas
    pair = (base / "hub-server.pem", base / "hub-server.key")
    shutil.copyfile(current.server_cert, pair[0])
    shutil.copyfile(current.server_key, pair[1])
    stack = HubStack(base / "certs", base / "hub", {DEVICE_ID: {"primary_key": DEVICE_KEY}},
                     server_pair=pair)
    with stack:
        yield stack


def replace_file(target: Path, source: Path) -> None:
    """Give target the content of source in one rename, as a deployment tool would."""
    temporary = target.with_name(f".{target.name}.new")
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def switch_server_pair(hub: HubStack, pair: DevCerts) -> None:
    """Copy a server pair over the emulator's files, key first, as the docs advise."""
    replace_file(hub.server_key, pair.server_key)
    replace_file(hub.server_cert, pair.server_cert)


def tls_handshake_ok(port: int, ca_file: Path) -> bool:
    """Return whether a client that trusts only ca_file completes a handshake on port."""
    context = client_tls_context(ca_file)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost"):
                return True
        except ssl.SSLCertVerificationError:
            return False


def test_hub_emulator_file_change_serves_new_certificate(
    hub: HubStack, two_cas: tuple[DevCerts, DevCerts]
) -> None:
    current, following = two_cas
    # This client completes its handshake under the first CA before the switch.
    with RawMqttClient(hub.mqtt_port, current.ca_cert) as open_client:
        switch_server_pair(hub, following)
        hub.wait_for_log("certificate_reloaded trigger=file_changed")

        assert tls_handshake_ok(hub.mqtt_port, following.ca_cert)
        assert not tls_handshake_ok(hub.mqtt_port, current.ca_cert)
        assert tls_handshake_ok(hub.https_port, following.ca_cert)
        # The open connection still works: the emulator reads its CONNECT and replies.
        assert open_client.connect(DEVICE_ID, username("localhost", DEVICE_ID), "x") == 5
    assert "CN=plcbridge development CA 2" in hub.wait_for_log("certificate_reloaded")


def test_hub_emulator_mismatched_pair_keeps_previous(
    hub: HubStack, two_cas: tuple[DevCerts, DevCerts]
) -> None:
    current, following = two_cas

    # A certificate without its key: the load fails and the previous pair stays in use.
    replace_file(hub.server_cert, following.server_cert)
    failed = hub.wait_for_log("certificate_reload_failed")
    assert "trigger=file_changed" in failed
    assert tls_handshake_ok(hub.mqtt_port, current.ca_cert)

    # Its key arrives, and the next change loads the pair.
    replace_file(hub.server_key, following.server_key)
    hub.wait_for_log("certificate_reloaded trigger=file_changed")
    assert tls_handshake_ok(hub.mqtt_port, following.ca_cert)


def test_hub_emulator_sighup_reloads_certificate(
    hub: HubStack, two_cas: tuple[DevCerts, DevCerts]
) -> None:
    current, _following = two_cas
    assert hub.process is not None

    # SIGHUP loads the files even when they have not changed.
    after = len(hub.log())
    hub.process.send_signal(signal.SIGHUP)
    hub.wait_for_log("certificate_reloaded trigger=SIGHUP", after=after)
    assert hub.process.poll() is None
    assert tls_handshake_ok(hub.mqtt_port, current.ca_cert)


@pytest.mark.timeout(240)
def test_ca_rotation_gateway_delivers_every_sample(
    base: Path, hub: HubStack, two_cas: tuple[DevCerts, DevCerts]
) -> None:
    current, following = two_cas
    bundle = base / "ca-bundle.pem"
    shutil.copyfile(current.ca_cert, bundle)
    plc = PlcSimulator(base)
    subscriber = Subscriber(hub.broker.port, hub.ca_file, TOPIC_FILTER, persistent_session=True)
    text = gateway_config(base, plc.port, hub.mqtt_port, bundle,
                          extra_uplink=f"date_port = {hub.https_port}")
    stack = Stack(base, plc, hub.broker, subscriber, Gateway(base, text))
    try:
        plc.start()
        subscriber.start()
        stack.gateway.start()
        stack.wait_for_samples(300)

        # Step 1: the bundle gains the next root, and the watcher restarts the uplink.
        bundle.write_bytes(current.ca_cert.read_bytes() + following.ca_cert.read_bytes())
        wait_until(lambda: "uplink_restarted" in stack.gateway.log("credential_watcher"), 30,
                   "the watcher's restart of the uplink with the two-root bundle")
        stack.wait_for_samples(300)

        # Step 2: the hub moves to the new root; the next connection meets it.
        switch_server_pair(hub, following)
        hub.wait_for_log("certificate_reloaded trigger=file_changed")
        after = len(hub.log())
        stack.gateway.kill9("uplink")
        hub.wait_for_log("connect_accepted", timeout_s=30, after=after)
        assert not tls_handshake_ok(hub.mqtt_port, current.ca_cert)
        stack.wait_for_samples(300)

        totals = stack.drain_reader()
        assert len(totals) == 1
        assert_complete(stack.report(), totals)
    finally:
        stack.gateway.stop()
        subscriber.stop()
        plc.stop()
