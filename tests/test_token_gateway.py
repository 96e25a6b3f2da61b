"""The whole gateway with SAS tokens from the on-site token server, and no key on its disk.

The PLC simulator, the hub emulator (mosquitto behind it), the token server and the four
gateway processes under supervisord all run for real. Tokens live 20 s, so a test of a
minute covers several renewals, and a stopped token server lets the gateway's token run
out.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devstack.dev_certs import dev_cert_paths, make_client_cert
from devstack.gateway_toml import toml_table
from tests.support.broker import Subscriber
from tests.support.delivery import DeliveryReport
from tests.support.gateway import Gateway, gateway_config
from tests.support.hub import HubStack
from tests.support.plc import PlcSimulator
from tests.support.token_server import (
    AllowedGateway,
    TokenServerProcess,
    new_secret,
    server_toml,
    write_private,
)
from tests.support.waiting import wait_until
from tests.test_alerts import PLCBRIDGE
from tests.test_gateway import TOPIC_FILTER, Stack

pytestmark = pytest.mark.integration

DEVICE_ID = "e2e-device"
SERIAL = "GW-SN-0042"
DEVICE_KEY = new_secret()
SECRET = new_secret()
TTL_S = 20


@dataclass
class TokenStack:
    stack: Stack
    hub: HubStack
    server: TokenServerProcess

    @property
    def gateway(self) -> Gateway:
        return self.stack.gateway


def token_gateway_config(base: Path, certs: Path, plc_port: int, hub: HubStack,
                         server: TokenServerProcess, auth: dict[str, Any]) -> str:
    """Return the test stack's configuration with tokens from the server, not a key."""
    text = gateway_config(base, plc_port, hub.mqtt_port, hub.ca_file,
                          extra_uplink=f"date_port = {hub.https_port}")
    text = re.sub(r"(?m)^connection_string_file = .*\n", "", text)
    settings = {"url": server.url, "ca_file": dev_cert_paths(certs).ca_cert,
                "hub_host_name": "localhost", "device_id": DEVICE_ID, "timeout_s": 2.0, **auth}
    return text + "\n" + toml_table("credentials.token_server", settings)


@pytest.fixture(params=["certificate", "challenge"])
def token_stack(request: pytest.FixtureRequest, base: Path,
                certs: Path) -> Iterator[TokenStack]:
    paths = dev_cert_paths(certs)
    if request.param == "certificate":
        cert, key = make_client_cert(base / "gateway-certs", paths.ca_cert, paths.ca_key, SERIAL)
        auth: dict[str, Any] = {"client_cert_file": cert, "client_key_file": key}
    else:
        auth = {"serial": SERIAL,
                "secret_file": write_private(base / "gateway-certs" / "token.secret", SECRET)}

    server_dir = base / "tokens"
    server_dir.mkdir()
    server = TokenServerProcess(server_dir, server_toml(
        server_dir, certs, [AllowedGateway(SERIAL, DEVICE_ID, DEVICE_KEY, SECRET)],
        ttl_s=TTL_S, client_certificates=request.param == "certificate"))
    # skew 0: the hub rejects a token as soon as its se has passed.
    hub = HubStack(certs, base / "hub", {DEVICE_ID: {"primary_key": DEVICE_KEY}}, skew_s=0)
    plc = PlcSimulator(base)
    subscriber: Subscriber | None = None
    gateway: Gateway | None = None
    try:
        server.start()
        hub.start()
        plc.start()
        assert plc.port is not None
        subscriber = Subscriber(hub.broker.port, hub.ca_file, TOPIC_FILTER,
                                persistent_session=True)
        subscriber.start()
        gateway = Gateway(base, token_gateway_config(base, certs, plc.port, hub, server, auth),
                          device_id=DEVICE_ID)
        # Gateway writes a connection string with a key for other tests; this one has none.
        gateway.connection_string.unlink()
        gateway.start()
        yield TokenStack(Stack(base, plc, hub.broker, subscriber, gateway), hub, server)
    finally:
        if gateway is not None:
            gateway.stop()
        if subscriber is not None:
            subscriber.stop()
        plc.stop()
        hub.stop()
        server.stop()


def assert_delivered(report: DeliveryReport, totals: dict[int, int]) -> None:
    """Check that every sample that the reader numbered arrived.

    Sample values are not compared: on a loaded machine the simulator answers some reads
    late, and those samples arrive with quality bad, which is correct delivery.
    """
    for epoch, total in totals.items():
        assert report.gaps(epoch) == [], f"epoch {epoch} has gaps"
        assert report.max_seq(epoch) + 1 == total, f"epoch {epoch} tail missing"


def status(gateway: Gateway) -> dict[str, Any]:
    result = subprocess.run([str(PLCBRIDGE), "status", "--json", "--config",
                             str(gateway.config)],
                            capture_output=True, text=True, timeout=30, check=False)
    report: dict[str, Any] = json.loads(result.stdout) if result.stdout.strip() else {}
    return report


def token_alert(report: dict[str, Any]) -> dict[str, Any] | None:
    for alert in report.get("alerts", []):
        if alert["name"] == "credentials" and alert["key"] == "token_server":
            return dict(alert)
    return None


def status_with_token_alert(gateway: Gateway) -> dict[str, Any] | None:
    report = status(gateway)
    return report if token_alert(report) else None


def issued(server: TokenServerProcess) -> int:
    return sum(1 for record in server.audit() if record["outcome"] == "issued")


@pytest.mark.timeout(300)
def test_token_gateway_renews_under_load(token_stack: TokenStack) -> None:
    stack, server, gateway = token_stack.stack, token_stack.server, token_stack.gateway
    stack.wait_for_samples(200)

    # Three renewals of 20 s tokens take about 50 s; the bound leaves room on a loaded host.
    wait_until(lambda: gateway.log("uplink").count("sas_renew ") >= 3, 120,
               "three token renewals through the server", step_s=0.5)
    totals = stack.drain_reader()

    assert_delivered(stack.report(), totals)
    assert issued(server) >= 4
    assert "token expired" not in token_stack.hub.log()
    assert not (stack.base / "connection-string.txt").exists()
    assert DEVICE_KEY not in gateway.log("uplink")


@pytest.mark.timeout(300)
def test_token_gateway_server_outage_alerts_then_delivers(token_stack: TokenStack) -> None:
    stack, server, gateway = token_stack.stack, token_stack.server, token_stack.gateway
    stack.wait_for_samples(200)

    # Without the server, the token runs out within one lifetime and the hub closes.
    server.stop()
    report = wait_until(lambda: status_with_token_alert(gateway), 3 * TTL_S + 30,
                        "the token_server credentials alert in status", step_s=1.0)
    alert = token_alert(report)
    assert alert is not None
    assert "expired" in alert["detail"]
    assert report["uplink"]["connected"] is False

    # The reader goes on while nothing reaches the hub, so pages wait in the buffer.
    received = stack.sample_count()
    wait_until(lambda: (status(gateway).get("buffer") or {}).get("pages", 0) > 0, 30,
               "pages waiting in the buffer", step_s=1.0)
    assert stack.sample_count() == received
    assert "token_fetch_failed" in gateway.log("uplink")

    server.start()
    stack.wait_for_samples(200, timeout_s=90)
    totals = stack.drain_reader()

    assert_delivered(stack.report(), totals)
    wait_until(lambda: token_alert(status(gateway)) is None, 30,
               "the credentials alert to clear", step_s=1.0)
    assert "alert_cleared alert=credentials" in gateway.log("uplink")
