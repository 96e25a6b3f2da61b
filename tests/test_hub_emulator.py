"""The hub emulator against real clients: CONNECT checks, forwarding, expiry, faults, Date."""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.credentials import mint_sas_token
from devstack.dev_certs import make_client_cert
from devstack.hub_faults import FaultsError, parse_faults
from tests.support.broker import Subscriber, client_tls_context
from tests.support.hub import HubStack, RawMqttClient, new_device_key, username

pytestmark = pytest.mark.integration

HUB = "localhost"
PRIMARY = new_device_key()
SECONDARY = new_device_key()
MODULE_KEY = new_device_key()


def token_for(resource: str, key: str, expiry_s: float) -> str:
    return mint_sas_token(resource, base64.b64decode(key), int(expiry_s))


def signed_token(sr_as_sent: str, key: str, se: int) -> str:
    """Sign over sr exactly as given, independently of plcbridge's minting code."""
    digest = hmac.new(base64.b64decode(key), f"{sr_as_sent}\n{se}".encode(), hashlib.sha256)
    signature = urllib.parse.quote(base64.b64encode(digest.digest()).decode(), safe="")
    return f"SharedAccessSignature sig={signature}&se={se}&sr={sr_as_sent}"


@pytest.fixture(scope="module")
def hub(certs: Path) -> Iterator[HubStack]:
    workdir = Path(tempfile.mkdtemp(prefix="pb-hub-", dir="/tmp"))
    stack = HubStack(
        certs, workdir,
        devices={"gw-01": {"primary_key": PRIMARY, "secondary_key": SECONDARY},
                 "gw-02": {"primary_key": new_device_key()}},
        modules={"gw-01/historian": {"primary_key": MODULE_KEY}},
        hub_host=HUB,
    )
    try:
        with stack:
            yield stack
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def clean_hub(hub: HubStack) -> Iterator[HubStack]:
    """Provide the shared emulator with no faults, and clear any that a test set."""
    hub.set_faults()
    try:
        yield hub
    finally:
        hub.set_faults()


@pytest.fixture
def subscriber(clean_hub: HubStack) -> Iterator[Subscriber]:
    watcher = Subscriber(clean_hub.broker.port, clean_hub.ca_file, "devices/#")
    watcher.start()
    try:
        yield watcher
    finally:
        watcher.stop()


def client(hub: HubStack, **kwargs: object) -> RawMqttClient:
    return RawMqttClient(hub.mqtt_port, hub.ca_file, **kwargs)  # type: ignore[arg-type]


def connect_device(hub: HubStack, key: str = PRIMARY, ttl_s: float = 3600) -> RawMqttClient:
    device = client(hub)
    password = token_for(f"{HUB}/devices/gw-01", key, time.time() + ttl_s)
    code = device.connect("gw-01", username(HUB, "gw-01"), password)
    assert code == 0, f"CONNACK {code}:\n{hub.log()}"
    return device


def wait_puback(device: RawMqttClient, packet_id: int | None, timeout_s: float = 5.0) -> None:
    packet = device.read_packet(timeout_s)
    assert packet is not None, "connection closed before the PUBACK"
    assert packet[0] >> 4 == 4, f"expected PUBACK, got packet type {packet[0] >> 4}"
    assert int.from_bytes(packet[1][:2], "big") == packet_id


@pytest.mark.parametrize("key_name", ["primary", "secondary"])
def test_hub_emulator_sas_key_connects_and_forwards(
    clean_hub: HubStack, subscriber: Subscriber, key_name: str
) -> None:
    key = PRIMARY if key_name == "primary" else SECONDARY
    topic = f"devices/gw-01/messages/events/%24.ct=application%2Fjson&k={key_name}"

    with connect_device(clean_hub, key) as device:
        packet_id = device.publish(topic, b'{"v": 1}')
        wait_puback(device, packet_id)

    subscriber.wait_for(lambda messages: (topic, b'{"v": 1}') in messages, 5.0,
                        f"the publish signed with the {key_name} key")
    line = clean_hub.wait_for_log(f"auth=\"sas {key_name}\"")
    assert "connect_accepted" in line


def test_hub_emulator_forwards_max_size_message(
    clean_hub: HubStack, subscriber: Subscriber
) -> None:
    # IoT Hub takes device-to-cloud messages up to 256 KB, so these must pass unchanged.
    topic = "devices/gw-01/messages/events/"
    payload = bytes(range(256)) * 1024

    with connect_device(clean_hub) as device:
        wait_puback(device, device.publish(topic, payload))

    subscriber.wait_for(lambda messages: (topic, payload) in messages, 5.0, "the 256 KB message")


def test_hub_emulator_module_publishes_under_module(
    clean_hub: HubStack, subscriber: Subscriber
) -> None:
    topic = "devices/gw-01/modules/historian/messages/events/"
    password = token_for(f"{HUB}/devices/gw-01/modules/historian", MODULE_KEY, time.time() + 600)

    with client(clean_hub) as module:
        assert module.connect("gw-01/historian", username(HUB, "gw-01/historian"), password) == 0
        wait_puback(module, module.publish(topic, b"m"))

    subscriber.wait_for(lambda messages: (topic, b"m") in messages, 5.0, "the module's publish")


def test_hub_emulator_sr_as_received_is_signed(clean_hub: HubStack) -> None:
    se = int(time.time()) + 600
    # The C SDK signs the resource unencoded, and the host's case may differ: both pass.
    for sr in ("localhost/devices/gw-01", "LOCALHOST%2fdevices%2fgw-01"):
        with client(clean_hub) as device:
            code = device.connect("gw-01", username(HUB, "gw-01"), signed_token(sr, PRIMARY, se))
            assert code == 0, f"sr={sr}: CONNACK {code}"


def _rejected_cases() -> dict[str, tuple[str, str | None, str | None, str]]:
    """Map each case to (client id, user name, password, the reason logged)."""
    now = time.time()
    good_user = username(HUB, "gw-01")
    good_token = token_for(f"{HUB}/devices/gw-01", PRIMARY, now + 600)
    return {
        "wrong key": ("gw-01", good_user,
                      token_for(f"{HUB}/devices/gw-01", new_device_key(), now + 600),
                      "signature matches neither"),
        "wrong sr scope": ("gw-01", good_user,
                           token_for(f"{HUB}/devices/gw-02", PRIMARY, now + 600),
                           "token scope"),
        "sr signed other than sent": ("gw-01", good_user,
                                      good_token.replace("%2F", "%2f"),
                                      "signature matches neither"),
        "unknown client id": ("gw-99", username(HUB, "gw-99"), good_token, "not in the registry"),
        "client id of another device": ("gw-02", username(HUB, "gw-02"), good_token,
                                        "token scope"),
        "user name of another device": ("gw-01", username(HUB, "gw-02"), good_token,
                                        "does not match"),
        "user name of another hub": ("gw-01", username("other.azure-devices.net", "gw-01"),
                                     good_token, "does not match"),
        "user name without api-version": ("gw-01", f"{HUB}/gw-01/?api-version=", good_token,
                                          "has no api-version"),
        "user name without query": ("gw-01", f"{HUB}/gw-01", good_token, "does not match"),
        # A password without a user name is malformed in MQTT 3.1.1, so none is sent here.
        "no user name": ("gw-01", None, None, "no user name"),
        "no password": ("gw-01", good_user, None, "no password"),
        "not a SAS token": ("gw-01", good_user, "secret", "does not start with"),
        "expired se": ("gw-01", good_user,
                       token_for(f"{HUB}/devices/gw-01", PRIMARY, now - 86400), "token expired"),
        "se beyond skew": ("gw-01", good_user,
                           token_for(f"{HUB}/devices/gw-01", PRIMARY, now - 310),
                           "token expired"),
        "se too large for a float": ("gw-01", good_user,
                                     signed_token("localhost%2Fdevices%2Fgw-01", PRIMARY,
                                                  10**400),
                                     "se out of range (401 digits)"),
        "se of 5000 digits": ("gw-01", good_user,
                              "SharedAccessSignature sr=localhost%2Fdevices%2Fgw-01&sig=AAAA"
                              f"&se={'9' * 5000}",
                              "se out of range (5000 digits)"),
        # The log's password redaction must not swallow the word after "password field:".
        "duplicate se": ("gw-01", good_user, good_token + f"&se={int(now) + 600}",
                         "duplicate SAS token field 'se'"),
    }


def test_hub_emulator_rejects_bad_connects(clean_hub: HubStack) -> None:
    for case, (client_id, user, password, reason) in _rejected_cases().items():
        with client(clean_hub) as device:
            code = device.connect(client_id, user, password)
            assert code == 5, f"{case}: CONNACK {code}"
            assert device.wait_closed(5.0) == [], f"{case}: packets after CONNACK 5"
        line = clean_hub.wait_for_log(f"client_id={client_id} ")
        assert "connect_rejected" in clean_hub.log(), case
        assert reason in clean_hub.log(), f"{case}: no reason {reason!r} in {line}"

    assert "sig=" not in clean_hub.log()
    assert PRIMARY not in clean_hub.log()


def test_hub_emulator_se_within_skew_accepted(clean_hub: HubStack) -> None:
    # The skew only widens the check at CONNECT: the session still ends at se.
    password = token_for(f"{HUB}/devices/gw-01", PRIMARY, time.time() - 200)
    with client(clean_hub) as device:
        assert device.connect("gw-01", username(HUB, "gw-01"), password) == 0
        device.wait_closed(5.0)


def test_hub_emulator_token_expiry_closes_connection(clean_hub: HubStack) -> None:
    with connect_device(clean_hub, ttl_s=2) as device:
        started = time.monotonic()
        wait_puback(device, device.publish("devices/gw-01/messages/events/", b"x"))
        device.wait_closed(6.0)
        assert time.monotonic() - started >= 0.5
    clean_hub.wait_for_log("reason=\"token expired")


@pytest.mark.parametrize(
    ("topic", "qos", "reason"),
    [
        ("devices/gw-02/messages/events/", 1, "does not accept from gw-01"),
        ("plain/topic", 0, "does not accept from gw-01"),
        ("devices/gw-01/modules/historian/messages/events/", 1, "does not accept from gw-01"),
        ("devices/gw-01/messages/devicebound/forged", 1, "does not accept from gw-01"),
        ("$iothub/twin/PATCH/properties/desired/?$version=2", 1, "does not accept from gw-01"),
        ("devices/gw-01/messages/events/", 2, "QoS 2"),
    ],
)
def test_hub_emulator_bad_publish_closes(
    clean_hub: HubStack, subscriber: Subscriber, topic: str, qos: int, reason: str
) -> None:
    with connect_device(clean_hub) as device:
        device.publish(topic, b"forbidden", qos=qos)
        assert device.wait_closed(5.0) == []
    line = clean_hub.wait_for_log(f"publish to {topic!r}")
    assert reason in line
    assert all(payload != b"forbidden" for _topic, payload in subscriber.messages)


@pytest.mark.parametrize(
    "topic",
    [
        "$iothub/twin/GET/?$rid=1",
        "$iothub/twin/PATCH/properties/reported/?$rid=2",
        "$iothub/methods/res/200/?$rid=3",
        "devices/gw-01/messages/events/%24.mid=1",
    ],
)
def test_hub_emulator_device_publish_allowed(clean_hub: HubStack, topic: str) -> None:
    with connect_device(clean_hub) as device:
        wait_puback(device, device.publish(topic, b"{}"))


def wait_suback(device: RawMqttClient, packet_id: int) -> None:
    packet = device.read_packet(5.0)
    assert packet is not None, "connection closed before the SUBACK"
    assert packet[0] >> 4 == 9, f"expected SUBACK, got packet type {packet[0] >> 4}"
    assert int.from_bytes(packet[1][:2], "big") == packet_id
    assert packet[1][2] in (0, 1), f"SUBACK return code {packet[1][2]:#04x}"


@pytest.mark.parametrize(
    "topic_filter",
    [
        "devices/gw-01/messages/devicebound/#",
        "$iothub/twin/res/#",
        "$iothub/twin/PATCH/properties/desired/#",
        "$iothub/methods/POST/#",
    ],
)
def test_hub_emulator_device_subscribe_allowed(clean_hub: HubStack, topic_filter: str) -> None:
    with connect_device(clean_hub) as device:
        wait_suback(device, device.subscribe(topic_filter))


@pytest.mark.parametrize(
    "topic_filter",
    [
        "devices/gw-02/messages/events/#",
        "devices/gw-02/messages/devicebound/#",
        "devices/+/messages/devicebound/#",
        "devices/gw-01/messages/events/#",
        "#",
        "$iothub/#",
    ],
)
def test_hub_emulator_bad_subscribe_closes(clean_hub: HubStack, topic_filter: str) -> None:
    with connect_device(clean_hub) as device:
        device.subscribe(topic_filter)
        assert device.wait_closed(5.0) == [], "a SUBACK for a forbidden topic filter"
    line = clean_hub.wait_for_log(f"subscribe to {topic_filter!r}")
    assert "disconnected client_id=gw-01" in line


def connect_module(hub: HubStack) -> RawMqttClient:
    module = client(hub)
    password = token_for(f"{HUB}/devices/gw-01/modules/historian", MODULE_KEY, time.time() + 600)
    code = module.connect("gw-01/historian", username(HUB, "gw-01/historian"), password)
    assert code == 0, f"CONNACK {code}:\n{hub.log()}"
    return module


def test_hub_emulator_module_topics(clean_hub: HubStack) -> None:
    with connect_module(clean_hub) as module:
        wait_suback(module, module.subscribe("$iothub/methods/POST/#"))
        wait_puback(module, module.publish("$iothub/twin/PATCH/properties/reported/?$rid=1",
                                           b"{}"))

    # A module publishes under its own module only, and gets no cloud-to-device messages.
    with connect_module(clean_hub) as module:
        module.publish("devices/gw-01/messages/events/", b"as the device")
        assert module.wait_closed(5.0) == []
    clean_hub.wait_for_log("publish to 'devices/gw-01/messages/events/'")
    with connect_module(clean_hub) as module:
        module.subscribe("devices/gw-01/messages/devicebound/#")
        assert module.wait_closed(5.0) == []
    clean_hub.wait_for_log("subscribe to 'devices/gw-01/messages/devicebound/#'")


def test_hub_emulator_twin_and_methods_reach_broker(clean_hub: HubStack) -> None:
    # The test plays the cloud side on mosquitto: it receives the reported properties and
    # sends a direct-method request that the device receives.
    cloud = Subscriber(clean_hub.broker.port, clean_hub.ca_file, "$iothub/twin/PATCH/#")
    cloud.start()
    try:
        with connect_device(clean_hub) as device:
            wait_suback(device, device.subscribe("$iothub/methods/POST/#"))
            reported = "$iothub/twin/PATCH/properties/reported/?$rid=7"
            wait_puback(device, device.publish(reported, b'{"fw": "1.2"}'))
            cloud.wait_for(lambda messages: (reported, b'{"fw": "1.2"}') in messages, 5.0,
                           "the reported properties")

            cloud.client.publish("$iothub/methods/POST/reboot/?$rid=8", b"{}", qos=0)
            packet = device.read_packet(5.0)
            assert packet is not None
            assert packet[0] >> 4 == 3, f"expected PUBLISH, got packet type {packet[0] >> 4}"
            assert b"$iothub/methods/POST/reboot/?$rid=8" in packet[1]
    finally:
        cloud.stop()


def test_hub_emulator_refuse_fault(clean_hub: HubStack) -> None:
    clean_hub.set_faults(refuse=True)
    password = token_for(f"{HUB}/devices/gw-01", PRIMARY, time.time() + 600)
    with client(clean_hub) as device:
        assert device.connect("gw-01", username(HUB, "gw-01"), password) == 5
    clean_hub.wait_for_log("refuse fault is set")

    clean_hub.set_faults()
    connect_device(clean_hub).close()


def test_hub_emulator_invalid_faults_keep_previous(clean_hub: HubStack) -> None:
    password = token_for(f"{HUB}/devices/gw-01", PRIMARY, time.time() + 600)
    clean_hub.set_faults(refuse=True)
    with client(clean_hub) as device:
        assert device.connect("gw-01", username(HUB, "gw-01"), password) == 5

    clean_hub.set_faults(close_after_s="soon")
    with client(clean_hub) as device:
        assert device.connect("gw-01", username(HUB, "gw-01"), password) == 5
    line = clean_hub.wait_for_log("faults_invalid")
    assert "close_after_s" in line


def test_hub_emulator_blackhole_fault(clean_hub: HubStack) -> None:
    clean_hub.set_faults(blackhole=True)
    context = client_tls_context(clean_hub.ca_file)
    for port in (clean_hub.mqtt_port, clean_hub.https_port):
        with (
            socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw,
            pytest.raises(TimeoutError),
        ):
            context.wrap_socket(raw, server_hostname="localhost")

    clean_hub.set_faults()
    connect_device(clean_hub).close()


def test_hub_emulator_close_after_fault(clean_hub: HubStack) -> None:
    clean_hub.set_faults(close_after_s=0.5)
    with connect_device(clean_hub) as device:
        started = time.monotonic()
        device.wait_closed(5.0)
        assert time.monotonic() - started >= 0.3
    clean_hub.wait_for_log("close_after_s fault")


def test_hub_emulator_puback_delay_fault(clean_hub: HubStack) -> None:
    clean_hub.set_faults(puback_delay_s=1.0)
    with connect_device(clean_hub) as device:
        started = time.monotonic()
        packet_id = device.publish("devices/gw-01/messages/events/", b"slow")
        with pytest.raises(TimeoutError):
            device.read_packet(timeout_s=0.7)
        wait_puback(device, packet_id, timeout_s=3.0)
        assert time.monotonic() - started >= 1.0


def test_hub_emulator_connack_delay_fault(clean_hub: HubStack) -> None:
    clean_hub.set_faults(connack_delay_s=1.0)
    password = token_for(f"{HUB}/devices/gw-01", PRIMARY, time.time() + 3600)
    with client(clean_hub) as device:
        started = time.monotonic()
        code = device.connect("gw-01", username(HUB, "gw-01"), password)

        assert code == 0
        assert time.monotonic() - started >= 1.0
    clean_hub.wait_for_log("connack_delayed client_id=gw-01 delay_s=1")

    clean_hub.set_faults()
    with client(clean_hub) as device:
        started = time.monotonic()
        assert device.connect("gw-01", username(HUB, "gw-01"), password) == 0
        assert time.monotonic() - started < 1.0


def test_hub_emulator_clock_offset_fault(clean_hub: HubStack) -> None:
    password = token_for(f"{HUB}/devices/gw-01", PRIMARY, time.time() + 3600)
    clean_hub.set_faults(clock_offset_s=86400)
    with client(clean_hub) as device:
        assert device.connect("gw-01", username(HUB, "gw-01"), password) == 5
    clean_hub.wait_for_log("token expired")

    clean_hub.set_faults(clock_offset_s=-86400)
    expired_in_real_time = token_for(f"{HUB}/devices/gw-01", PRIMARY, time.time() - 3600)
    with client(clean_hub) as device:
        assert device.connect("gw-01", username(HUB, "gw-01"), expired_in_real_time) == 0


def date_header(hub: HubStack, method: str = "GET") -> float:
    context = client_tls_context(hub.ca_file)
    connection = http.client.HTTPSConnection("localhost", hub.https_port, context=context,
                                             timeout=5)
    try:
        connection.request(method, "/")
        response = connection.getresponse()
        assert response.status == 200
        date = response.getheader("Date")
    finally:
        connection.close()
    assert date is not None
    assert date.endswith(" GMT")
    return email.utils.parsedate_to_datetime(date).timestamp()


def test_hub_emulator_date_header(clean_hub: HubStack) -> None:
    assert abs(date_header(clean_hub) - time.time()) < 5
    assert abs(date_header(clean_hub, "HEAD") - time.time()) < 5

    clean_hub.set_faults(clock_offset_s=-90 * 86400)
    expected = time.time() - 90 * 86400
    assert abs(date_header(clean_hub) - expected) < 5


@pytest.fixture(scope="module")
def x509_hub(certs: Path) -> Iterator[tuple[HubStack, dict[str, tuple[Path, Path]]]]:
    """Start an emulator that requests client certificates, with three X.509 devices."""
    workdir = Path(tempfile.mkdtemp(prefix="pb-hubx-", dir="/tmp"))
    try:
        pairs = _client_certificates(certs, workdir)
        thumbprint = hashlib.sha256(_der(pairs["meter-7"][0])).hexdigest()
        sha1_colons = ":".join(
            f"{byte:02X}" for byte in hashlib.sha1(_der(pairs["self-signed"][0])).digest()
        )
        # A thumbprint device whose self-signed certificate has the CN of a ca_signed
        # device: as its own trust anchor it must not pass as that device.
        impostor = hashlib.sha256(_der(pairs["line-3-self-signed"][0])).hexdigest()
        client_ca = workdir / "client-ca.pem"
        client_ca.write_bytes((certs / "ca.pem").read_bytes()
                              + pairs["self-signed"][0].read_bytes()
                              + pairs["line-3-self-signed"][0].read_bytes())
        stack = HubStack(
            certs, workdir,
            devices={"meter-7": {"primary_thumbprint": thumbprint},
                     "meter-9": {"primary_thumbprint": impostor},
                     "self-signed": {"primary_thumbprint": "00" * 20,
                                     "secondary_thumbprint": sha1_colons},
                     "line-3": {"ca_signed": True},
                     "gw-01": {"primary_key": PRIMARY}},
            client_ca_file=client_ca,
        )
        with stack:
            yield stack, pairs
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _der(pem_file: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem_file.read_text())


def _client_certificates(certs: Path, workdir: Path) -> dict[str, tuple[Path, Path]]:
    ca, ca_key = certs / "ca.pem", certs / "ca.key"
    pairs = {name: make_client_cert(workdir, ca, ca_key, name)
             for name in ("meter-7", "line-3", "unregistered")}
    pairs["line-3-wrong-cn"] = make_client_cert(workdir, ca, ca_key, "line-4",
                                                name="line-3-wrong-cn")
    pairs["self-signed"] = _self_signed(workdir, "self-signed")
    pairs["line-3-self-signed"] = _self_signed(workdir, "line-3-self-signed", common_name="line-3")
    return pairs


def _self_signed(workdir: Path, name: str, common_name: str | None = None) -> tuple[Path, Path]:
    cert, key = workdir / f"{name}.pem", workdir / f"{name}.key"
    subject = f"/CN={common_name or name}"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "30", "-subj", subject,
         "-addext", "extendedKeyUsage=clientAuth",
         "-addext", "basicConstraints=critical,CA:FALSE"],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.mark.parametrize(
    ("device_id", "certificate", "expected"),
    [
        ("meter-7", "meter-7", 0),
        ("self-signed", "self-signed", 0),
        ("line-3", "line-3", 0),
        ("line-3", "line-3-wrong-cn", 5),
        ("meter-7", "unregistered", 5),
        ("meter-7", None, 5),
        ("meter-9", "line-3-self-signed", 0),
        ("line-3", "line-3-self-signed", 5),
    ],
)
def test_hub_emulator_x509_device(
    x509_hub: tuple[HubStack, dict[str, tuple[Path, Path]]],
    device_id: str, certificate: str | None, expected: int,
) -> None:
    stack, pairs = x509_hub
    pair = pairs[certificate] if certificate else None
    with RawMqttClient(stack.mqtt_port, stack.ca_file, certificate=pair) as device:
        code = device.connect(device_id, username(HUB, device_id), None)
        assert code == expected, stack.log()
        if certificate == "line-3-self-signed" and device_id == "line-3":
            assert "is itself in the client CA file" in stack.wait_for_log("self-issued")
        if expected == 0:
            device.publish(f"devices/{device_id}/messages/events/", b"x509")
            wait_puback(device, 1)


def test_hub_emulator_x509_expired_by_emulator_clock(
    x509_hub: tuple[HubStack, dict[str, tuple[Path, Path]]],
) -> None:
    stack, pairs = x509_hub
    # The development certificates are valid for 825 days; move the clock past that.
    stack.set_faults(clock_offset_s=900 * 86400)
    try:
        with RawMqttClient(stack.mqtt_port, stack.ca_file, certificate=pairs["meter-7"]) as device:
            assert device.connect("meter-7", username(HUB, "meter-7"), None) == 5
        stack.wait_for_log("client certificate expired")
    finally:
        stack.set_faults()


def test_hub_emulator_x509_sas_device_still_works(
    x509_hub: tuple[HubStack, dict[str, tuple[Path, Path]]],
) -> None:
    stack, _pairs = x509_hub
    password = token_for(f"{HUB}/devices/gw-01", PRIMARY, time.time() + 600)
    with RawMqttClient(stack.mqtt_port, stack.ca_file) as device:
        assert device.connect("gw-01", username(HUB, "gw-01"), password) == 0


def test_hub_emulator_untrusted_certificate_fails_tls(
    x509_hub: tuple[HubStack, dict[str, tuple[Path, Path]]], base: Path,
) -> None:
    stack, _pairs = x509_hub
    stranger = _self_signed(base, "stranger")
    try:
        with RawMqttClient(stack.mqtt_port, stack.ca_file, certificate=stranger) as device:
            # TLS 1.3 finishes the client's side of the handshake before the server checks
            # the certificate, so the rejection may arrive only as a closed connection.
            assert device.connect("meter-7", username(HUB, "meter-7"), None) is None
    except (ssl.SSLError, ConnectionResetError):
        pass
    stack.wait_for_log("tls_failed port=mqtt")


def run_emulator(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devstack.hub_emulator", *args],
        capture_output=True, text=True, timeout=30,
    )


def test_hub_emulator_bad_registry_exits_2(certs: Path, base: Path) -> None:
    cases = {
        "[devices.gw-01]\nprimary_key = \"not base64!\"\n": "devices.gw-01.primary_key",
        "[devices.gw-01]\nprimary_key = \"AAAA\"\ncolour = 1\n": "devices.gw-01.colour",
        "[devices.gw-01]\n": "exactly one of",
        "[devices.gw-01]\nprimary_thumbprint = \"abc\"\n": "primary_thumbprint = 'abc'",
        "[modules.\"gw-09/m\"]\nprimary_key = \"AAAA\"\n": "gw-09",
        "devices = 3\n": "devices must be a table",
        "[devices\n": "invalid TOML",
    }
    registry = base / "registry.toml"
    for text, expected in cases.items():
        registry.write_text(text)
        result = run_emulator(
            "--cert", str(certs / "server.pem"), "--key", str(certs / "server.key"),
            "--registry", str(registry), "--upstream", "127.0.0.1:1", "--hub-host", HUB,
        )
        assert result.returncode == 2, text
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert str(registry) in result.stderr
        assert expected in result.stderr, result.stderr


def test_hub_emulator_bad_options_exit_2(certs: Path, base: Path) -> None:
    registry = base / "registry.toml"
    registry.write_text("[devices.gw-01]\nprimary_key = \"AAAA\"\n")
    common = ["--cert", str(certs / "server.pem"), "--key", str(certs / "server.key"),
              "--registry", str(registry), "--hub-host", HUB]
    cases = [
        ([], "the following arguments are required: --upstream"),
        (["--upstream", "localhost"], "--upstream 'localhost'"),
        (["--upstream", "127.0.0.1:1", "--listen", "127.0.0.1:70000"], "--listen"),
        (["--upstream", "127.0.0.1:1", "--skew-s", "-1"], "--skew-s"),
        (["--upstream", "127.0.0.1:1", "--client-ca", str(base / "missing.pem")],
         "--client-ca"),
        (["--upstream", "127.0.0.1:1", "--key", str(registry)], "--key"),
    ]
    for extra, expected in cases:
        result = run_emulator(*common, *extra)
        assert result.returncode == 2, extra
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert expected in result.stderr, result.stderr



def test_hub_emulator_non_utf8_registry_exits_2(certs: Path, base: Path) -> None:
    registry = base / "registry.toml"
    registry.write_bytes(b'[devices.gw-01]\nprimary_key = "\xff\xfeAAAA"\n')
    result = run_emulator(
        "--cert", str(certs / "server.pem"), "--key", str(certs / "server.key"),
        "--registry", str(registry), "--upstream", "127.0.0.1:1", "--hub-host", HUB,
    )
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert f"{registry}: invalid TOML: not UTF-8 at byte 31" in result.stderr


def count_lines(hub: HubStack, text: str) -> int:
    return sum(text in line for line in hub.log().splitlines())


def wait_for_count(hub: HubStack, text: str, count: int, timeout_s: float = 5.0) -> None:
    """Wait until at least count lines of the emulator's log contain text."""
    deadline = time.monotonic() + timeout_s
    while count_lines(hub, text) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {count} lines with {text!r}:\n{hub.log()}")
        time.sleep(0.05)


def write_faults_text(hub: HubStack, text: str) -> None:
    temporary = hub.faults_file.with_name(".faults.json.tmp")
    temporary.write_text(text)
    os.replace(temporary, hub.faults_file)


@pytest.mark.parametrize(
    ("document", "error"),
    [
        ({"clock_offset_s": 10**400}, "<a number of 401 digits>"),
        ({"clock_offset_s": 1e20}, "clock_offset_s = 1e+20"),
        ({"clock_offset_s": -11 * 366 * 86400}, "clock_offset_s"),
        ({"close_after_s": 10**6}, "close_after_s"),
        ({"puback_delay_s": -1}, "puback_delay_s"),
        ({"puback_delay_s": 1e9}, "puback_delay_s"),
        ({"connack_delay_s": -0.5}, "connack_delay_s"),
        ({"connack_delay_s": 3601}, "connack_delay_s"),
        ({"refuse": 1}, "refuse"),
    ],
)
def test_hub_emulator_parse_faults_rejects(document: dict[str, object], error: str) -> None:
    with pytest.raises(FaultsError, match="invalid") as raised:
        parse_faults(document)
    assert error in str(raised.value)


def test_hub_emulator_parse_faults_bounds_accepted() -> None:
    faults = parse_faults({"clock_offset_s": -10 * 365 * 86400, "close_after_s": 86400,
                           "puback_delay_s": 3600, "connack_delay_s": 3600})
    assert faults.clock_offset_s == -10 * 365 * 86400
    assert faults.close_after_s == 86400.0
    assert faults.connack_delay_s == 3600.0


def test_hub_emulator_bad_faults_files_keep_previous(clean_hub: HubStack) -> None:
    password = token_for(f"{HUB}/devices/gw-01", PRIMARY, time.time() + 600)
    clean_hub.set_faults(refuse=True)
    with client(clean_hub) as device:
        assert device.connect("gw-01", username(HUB, "gw-01"), password) == 5

    cases = {
        "integer of 401 digits": json.dumps({"clock_offset_s": 10**400}),
        "clock offset of 1e20 s": json.dumps({"clock_offset_s": 1e20}),
        "nesting 100000 deep": "[" * 100000,
        "file over 64 KiB": json.dumps({"refuse": False}) + " " * 70000,
        "not UTF-8": '{"refuse": false, "x": "\udcff"}',
    }
    for case, text in cases.items():
        invalid_lines = count_lines(clean_hub, "faults_invalid")
        if case == "not UTF-8":
            temporary = clean_hub.faults_file.with_name(".faults.json.tmp")
            temporary.write_bytes(b'{"refuse": false, "x": "\xff"}')
            os.replace(temporary, clean_hub.faults_file)
        else:
            write_faults_text(clean_hub, text)
        with client(clean_hub) as device:
            code = device.connect("gw-01", username(HUB, "gw-01"), password)
            assert code == 5, f"{case}: CONNACK {code}\n{clean_hub.log()}"
        wait_for_count(clean_hub, "faults_invalid", invalid_lines + 1)

    assert "Traceback" not in clean_hub.log()


def test_hub_emulator_faults_fifo_does_not_block(clean_hub: HubStack) -> None:
    password = token_for(f"{HUB}/devices/gw-01", PRIMARY, time.time() + 600)
    clean_hub.set_faults(refuse=True)
    with client(clean_hub) as device:
        assert device.connect("gw-01", username(HUB, "gw-01"), password) == 5

    fifo = clean_hub.faults_file.with_name(".faults.fifo")
    os.mkfifo(fifo)
    os.replace(fifo, clean_hub.faults_file)
    # No writer ever opens the FIFO: the emulator must not wait for one.
    with client(clean_hub) as device:
        assert device.connect("gw-01", username(HUB, "gw-01"), password) == 5
    line = clean_hub.wait_for_log("not a regular file")
    assert "faults_invalid" in line

    clean_hub.faults_file.unlink()
    connect_device(clean_hub).close()


def test_hub_emulator_newline_client_id_one_line(clean_hub: HubStack) -> None:
    forged = ("x\n2026-12-04 00:00:00,000 INFO plcbridge.hub_emulator connect_accepted "
              "client_id=gw-01 FORGED")
    with client(clean_hub) as device:
        assert device.connect(forged, username(HUB, "gw-01"), None) == 5
    clean_hub.wait_for_log("FORGED")
    for line in clean_hub.log().splitlines():
        if "FORGED" in line:
            assert "connect_rejected client_id=\"x\\n2026-12-04" in line, line


def mqtt_text(value: str) -> bytes:
    data = value.encode()
    return len(data).to_bytes(2, "big") + data


def connect_body(flags: int, *fields: bytes, trailer: bytes = b"") -> bytes:
    return mqtt_text("MQTT") + bytes((4, flags)) + (60).to_bytes(2, "big") + b"".join(
        fields) + trailer


def _malformed_connects() -> dict[str, tuple[int, bytes, str]]:
    """Map each case to (first header byte, CONNECT body, the error logged)."""
    password = token_for(f"{HUB}/devices/gw-01", PRIMARY, time.time() + 600)
    cid, user, secret = mqtt_text("gw-01"), mqtt_text(username(HUB, "gw-01")), mqtt_text(password)
    will = mqtt_text("devices/gw-01/messages/events/") + mqtt_text("gone")
    return {
        "trailing bytes": (0x10, connect_body(0xC2, cid, user, secret, trailer=b"xx"),
                           "2 bytes after the last field"),
        "fixed header flags": (0x1F, connect_body(0xC2, cid, user, secret),
                               "fixed header flags"),
        "will QoS without will": (0x10, connect_body(0xCA, cid, user, secret),
                                  "without the will flag"),
        "will retain without will": (0x10, connect_body(0xE2, cid, user, secret),
                                     "without the will flag"),
        "will QoS 3": (0x10, connect_body(0xDE, cid, will, user, secret), "will QoS 3"),
        "password without user name": (0x10, connect_body(0x42, cid, secret),
                                       "password flag set without the user name flag"),
    }


def test_hub_emulator_malformed_connect_closed(clean_hub: HubStack) -> None:
    accepted = count_lines(clean_hub, "connect_accepted")
    for case, (first_byte, body, error) in _malformed_connects().items():
        with client(clean_hub) as device:
            device.send_packet(first_byte, body)
            assert device.wait_closed(5.0) == [], f"{case}: a CONNACK for a malformed CONNECT"
        line = clean_hub.wait_for_log(error)
        assert "connect_failed" in line, case
    assert count_lines(clean_hub, "connect_accepted") == accepted


def test_hub_emulator_pubacks_keep_order(clean_hub: HubStack) -> None:
    # PUBLISH 1 is held with a delay that is then lowered to 0 before PUBLISH 2.
    clean_hub.set_faults(puback_delay_s=1.5)
    with connect_device(clean_hub) as device:
        first = device.publish("devices/gw-01/messages/events/", b"1")
        with pytest.raises(TimeoutError):
            device.read_packet(timeout_s=0.3)
        # The emulator reads the faults file again when PUBACK 2 arrives from the broker.
        clean_hub.set_faults()
        second = device.publish("devices/gw-01/messages/events/", b"2")
        wait_puback(device, first, timeout_s=3.0)
        wait_puback(device, second, timeout_s=3.0)


def test_hub_emulator_disconnect_logged_as_client(clean_hub: HubStack) -> None:
    with connect_device(clean_hub) as device:
        device.disconnect()
        assert device.wait_closed(5.0) == []
    line = clean_hub.wait_for_log("client sent DISCONNECT")
    assert "disconnected client_id=gw-01" in line


def test_hub_emulator_close_before_tls_logged(clean_hub: HubStack) -> None:
    # An earlier test's client may have had the same port, so only new lines count.
    start = len(clean_hub.log())
    raw = socket.create_connection(("127.0.0.1", clean_hub.mqtt_port), timeout=5)
    peer = f"127.0.0.1:{raw.getsockname()[1]}"
    raw.close()
    line = clean_hub.wait_for_log(f"peer={peer}", after=start)
    assert "tls_failed port=mqtt" in line
    assert 'error=""' not in line


def test_hub_emulator_accept_failure_keeps_listening(certs: Path, base: Path) -> None:
    # With 40 file descriptors, idle TCP clients use up the rest and accept() fails.
    stack = HubStack(certs, base / "hub", devices={"gw-01": {"primary_key": PRIMARY}},
                     fd_limit=40)
    with stack:
        idle = [socket.create_connection(("127.0.0.1", stack.mqtt_port), timeout=5)
                for _ in range(45)]
        try:
            line = stack.wait_for_log("accept_failed")
            assert "Too many open files" in line
        finally:
            for connection in idle:
                connection.close()

        connect_device(stack).close()
        stack.wait_for_log("accept_recovered port=mqtt")
        assert "Task exception was never retrieved" not in stack.log()


def test_hub_emulator_sigterm_with_idle_clients(certs: Path, base: Path) -> None:
    stack = HubStack(certs, base / "hub", devices={"gw-01": {"primary_key": PRIMARY}})
    with stack:
        context = client_tls_context(stack.ca_file)
        silent_tls = context.wrap_socket(
            socket.create_connection(("127.0.0.1", stack.mqtt_port), timeout=5),
            server_hostname="localhost")
        silent_https = context.wrap_socket(
            socket.create_connection(("127.0.0.1", stack.https_port), timeout=5),
            server_hostname="localhost")
        session = connect_device(stack)
        process = stack.process
        assert process is not None
        try:
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
            elapsed_s = time.monotonic() - started
        finally:
            for connection in (silent_tls, silent_https, session.sock):
                connection.close()
        assert elapsed_s < 3.0, f"exit took {elapsed_s:.1f} s"
        assert "stopped version=" in stack.log()
