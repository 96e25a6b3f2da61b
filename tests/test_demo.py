"""The demo's path through the hub emulator: its registry and a real gateway minting tokens."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.credentials import mint_sas_token, read_connection_string
from devstack.demo import HUB_HOST, write_connection_string, write_registry
from devstack.hub_auth import authenticate
from devstack.hub_registry import load_registry
from devstack.mqtt_frames import Connect
from tests.support.broker import Subscriber
from tests.support.gateway import DEVICE_KEY, Gateway, gateway_config
from tests.support.hub import HubStack
from tests.support.plc import PlcSimulator


def test_demo_registry_admits_demo_token(base: Path) -> None:
    connection_file = base / "connection-string.txt"
    registry_file = base / "hub-registry.toml"
    write_connection_string(connection_file, HUB_HOST)
    write_registry(connection_file, registry_file)

    connection = read_connection_string(connection_file)
    assert connection.shared_access_key is not None
    token = mint_sas_token(connection.resource_uri, connection.shared_access_key,
                           int(time.time()) + 600)
    connect = Connect(
        protocol_name="MQTT", protocol_level=4, clean_session=False, keep_alive_s=60,
        client_id=connection.client_id, will_topic=None,
        username=f"{HUB_HOST}/{connection.client_id}/?api-version=2021-04-12",
        password=token.encode(),
    )
    admission = authenticate(connect, None, load_registry(registry_file), HUB_HOST,
                             time.time(), 300)
    assert admission.method == "sas primary"
    assert registry_file.stat().st_mode & 0o077 == 0


@pytest.fixture
def plc(base: Path) -> Iterator[PlcSimulator]:
    simulator = PlcSimulator(base)
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()


@pytest.mark.integration
def test_demo_gateway_connects_through_emulator(
    base: Path, certs: Path, plc: PlcSimulator
) -> None:
    with HubStack(certs, base / "hub", devices={"e2e-device": {"primary_key": DEVICE_KEY}},
                  hub_host=HUB_HOST) as hub:
        subscriber = Subscriber(hub.broker.port, hub.ca_file, "devices/+/messages/events/#")
        subscriber.start()
        assert plc.port is not None
        gateway = Gateway(base, gateway_config(base, plc.port, hub.mqtt_port, certs / "ca.pem"))
        try:
            gateway.start()
            subscriber.wait_for(lambda messages: len(messages) >= 3, 30.0,
                                "three pages through the emulator")
            line = hub.wait_for_log("connect_accepted client_id=e2e-device")
            assert 'auth="sas primary"' in line
            assert all(topic.startswith("devices/e2e-device/messages/events/")
                       for topic, _payload in subscriber.messages)
        finally:
            gateway.stop()
            subscriber.stop()
