"""The uplink against the hub emulator, which checks SAS tokens and certificates as IoT Hub does.

The emulator rejects every failed CONNECT with CONNACK 5, closes a connection when its token
expires, and serves its clock in an HTTPS Date header. Its fault file sets a clock offset
or rejects every client.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common import wire
from devstack.dev_certs import make_client_cert
from tests import test_uplink as uplink_tests
from tests.gateway_files import stop_process
from tests.support.broker import Subscriber
from tests.support.hub import HubStack
from tests.support.supervisord_conf import SUPERVISORD_HEAD
from tests.test_uplink import (
    DEVICE_ID,
    DEVICE_KEY,
    LIBFAKETIME,
    ROOT,
    StandInBuffer,
    UplinkProcess,
    azure_config,
    sample_page,
    wait_until,
    write_connection_string,
)
from tests.test_uplink_credentials import (
    azure_credentials_config,
    given_token,
    write_backdated_certs,
)

pytestmark = pytest.mark.integration

buffer = uplink_tests.buffer
uplinks = uplink_tests.uplinks

DAY_S = 86400


class TapListener:
    """A SUB socket on the uplink's tap that keeps every event it receives."""

    def __init__(self, runtime_dir: Path) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.connect(wire.tap_endpoint(runtime_dir, "uplink"))
        self.events: list[dict[str, Any]] = []

    def pump(self) -> None:
        while self.socket.poll(0):
            _process, body = self.socket.recv_multipart()
            self.events.append(json.loads(body))

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        self.pump()
        return [event for event in self.events if event["kind"] == kind]

    def close(self) -> None:
        self.socket.close()
        self.context.term()


@pytest.fixture
def tap(base: Path) -> Iterator[TapListener]:
    (base / "run").mkdir(parents=True, exist_ok=True)
    listener = TapListener(base / "run")
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture
def hubs(base: Path) -> Iterator[Callable[..., HubStack]]:
    """Start hub emulators with DEVICE_ID registered under DEVICE_KEY; stop them afterwards."""
    started: list[HubStack] = []

    def start(certs: Path, devices: dict[str, dict[str, Any]] | None = None,
              **kwargs: Any) -> HubStack:
        workdir = base / f"hub{len(started)}"
        workdir.mkdir()
        stack = HubStack(certs, workdir, devices or {DEVICE_ID: {"primary_key": DEVICE_KEY}},
                         **kwargs)
        started.append(stack)
        stack.start()
        return stack

    try:
        yield start
    finally:
        for stack in started:
            stack.stop()


def hub_config(base: Path, stack: HubStack, uplink: str = "", **kwargs: Any) -> str:
    return azure_config(base, stack.mqtt_port, stack.ca_file,
                        uplink=f"date_port = {stack.https_port}\n{uplink}", **kwargs)


def lines_with(output: str, pattern: str) -> list[str]:
    regex = re.compile(pattern)
    return [line for line in output.splitlines() if regex.search(line)]


def test_azure_expired_token_one_alert_capped_backoff(
    base: Path, certs: Path, hubs: Any, buffer: StandInBuffer, uplinks: Any, tap: TapListener
) -> None:
    stack = hubs(certs)
    expired_s = int(time.time()) - 3600
    write_connection_string(base, given_token(expired_s))
    # The hub stays silent until the tap subscription is in place, because PUB drops the
    # events that precede it.
    stack.set_faults(blackhole=True)

    uplink = uplinks(base, hub_config(base, stack, "connect_timeout_s = 0.5"))
    buffer.wait_for(lambda: tap.kinds("counters"), 10, "tap counters")
    stack.set_faults(blackhole=False)

    uplink.wait_log(r"INFO .*connect_rejected_again ", 20, count=5)
    output = uplink.log()
    alerts = lines_with(output, "credentials_rejected")
    assert len(alerts) == 1
    assert " ERROR " in alerts[0]
    assert "Not authorized" in alerts[0]
    assert "only a new SAS token" in alerts[0]
    assert "token expired" in stack.log()

    # reconnect_max_s = 1.0 caps the delay, and each delay is drawn from the upper half of
    # its ceiling, so once the ceiling is at the cap no attempt follows within 0.5 s.
    rejected = output[output.index("credentials_rejected"):]
    delays = [float(value) for value in re.findall(r"next_delay_s=([\d.]+)", rejected)]
    assert all(delay <= 1.0 for delay in delays)
    assert all(delay >= 0.5 for delay in delays[3:])

    # One tap alert, and one ERROR expiry line naming se and now.
    buffer.wait_for(lambda: len(tap.kinds("connect_failed")) >= 3, 10, "connect_failed events")
    assert len(tap.kinds("credentials_rejected")) == 1
    # Only the silent hub's timeouts are errors; the rejections are the one alert above.
    assert [event for event in tap.kinds("error") if "refused" in event["message"]] == []
    expiry_errors = lines_with(output, r"ERROR .*sas_check SAS token expired")
    assert len(expiry_errors) == 1
    assert f"se={expired_s} (" in expiry_errors[0]
    assert all(link["state"] == "down" for link in buffer.links)


def test_azure_key_recovers_without_restart(
    base: Path, certs: Path, hubs: Any, buffer: StandInBuffer, uplinks: Any, tap: TapListener
) -> None:
    stack = hubs(certs)
    stack.set_faults(refuse=True)
    write_connection_string(base)

    uplink = uplinks(base, hub_config(base, stack, log_level="DEBUG"))
    uplink.wait_log(r"connect_rejected_again ", 20, count=3)
    stack.set_faults(refuse=False)

    buffer.wait_link("up", 20)
    output = uplink.log()
    assert len(lines_with(output, r"ERROR .*credentials_rejected")) == 1
    assert lines_with(output, r"INFO .*credentials_accepted after_rejected_attempts=\d+")

    # The delay grows from reconnect_min_s = 0.2 towards reconnect_max_s = 1.0.
    delays = [float(value) for value in re.findall(r"next_delay_s=([\d.]+)", output)]
    assert delays[0] <= 0.2
    assert max(delays) > 0.2
    assert all(delay <= 1.0 for delay in delays)
    assert len(lines_with(output, r" start version=")) == 1
    assert uplink.process is not None and uplink.process.poll() is None

    # A token is minted before each attempt: the expiries move on with the clock.
    expiries = {int(se) for se in re.findall(r"sas_check SAS token valid until \S+ se=(\d+)",
                                             output)}
    assert len(expiries) >= 2
    buffer.wait_for(lambda: tap.kinds("credentials_accepted"), 5, "credentials_accepted")


def test_azure_hub_clock_ahead_recovers_through_date(
    base: Path, certs: Path, hubs: Any, buffer: StandInBuffer, uplinks: Any
) -> None:
    # The hub's clock runs 30 days ahead of the gateway's: each token the gateway mints
    # with its own clock has expired for the hub.
    stack = hubs(certs)
    stack.set_faults(clock_offset_s=30 * DAY_S)
    write_connection_string(base)

    uplink = uplinks(base, hub_config(base, stack))

    buffer.wait_link("up", 20)
    output = uplink.log()
    assert len(lines_with(output, r"ERROR .*credentials_rejected")) == 1
    applied = lines_with(output, r"WARNING .*clock_offset_applied ")
    assert len(applied) == 1
    offset_s = float(re.findall(r"offset_s=([\d.]+)", applied[0])[0])
    assert abs(offset_s - 30 * DAY_S) < 5
    assert "token expired" in stack.log()


def test_azure_hub_clock_ahead_outdates_given_token(
    base: Path, certs: Path, hubs: Any, buffer: StandInBuffer, uplinks: Any
) -> None:
    stack = hubs(certs)
    stack.set_faults(clock_offset_s=30 * DAY_S)
    expiry_s = int(time.time()) + 10 * DAY_S
    write_connection_string(base, given_token(expiry_s))

    uplink = uplinks(base, hub_config(base, stack))

    # With the hub's time, the token that the wall clock found valid has expired.
    lines = uplink.wait_log(r"ERROR .*sas_check SAS token expired or the clock is wrong", 20)
    assert f"se={expiry_s} (" in lines[0]
    assert "only a new SAS token fixes this" in lines[0]
    assert uplink.wait_log(r"WARNING .*clock_offset_applied ", 1)
    assert all(link["state"] == "down" for link in buffer.links)


@pytest.mark.skipif(not LIBFAKETIME.exists(), reason="needs Debian's faketime package")
def test_azure_gateway_clock_ahead_warns_and_connects(
    base: Path, certs: Path, hubs: Any, buffer: StandInBuffer, uplinks: Any
) -> None:
    stack = hubs(certs)
    expiry_s = int(time.time()) + 3600
    write_connection_string(base, given_token(expiry_s))
    env = dict(os.environ, LD_PRELOAD=str(LIBFAKETIME), FAKETIME="+30d")

    uplink = uplinks(base, hub_config(base, stack), env)

    # The hub accepts a token that is valid in real time. By the gateway's clock it has
    # expired, and that warning is how an operator finds the wrong clock.
    buffer.wait_link("up", 20)
    lines = uplink.wait_log(r"ERROR .*sas_check SAS token expired or the clock is wrong", 5)
    assert f"se={expiry_s} (" in lines[0]


@pytest.mark.skipif(not LIBFAKETIME.exists(), reason="needs Debian's faketime package")
@pytest.mark.parametrize("scheme", ["given token", "device key"])
def test_azure_clock_months_behind_connects(
    base: Path, hubs: Any, buffer: StandInBuffer, uplinks: Any, scheme: str
) -> None:
    # Certificates valid from 200 days ago, so TLS still works with the clock 90 days back.
    certs = base / "backdated"
    write_backdated_certs(certs)
    stack = hubs(certs)
    if scheme == "given token":
        write_connection_string(base, given_token(int(time.time()) + 3600))
    else:
        write_connection_string(base)
    # With a negative offset libfaketime 0.9.10 also moves the monotonic clock back,
    # and Event.wait() then never returns, so only the wall clock is faked.
    env = dict(os.environ, LD_PRELOAD=str(LIBFAKETIME), FAKETIME="-90d",
               FAKETIME_DONT_FAKE_MONOTONIC="1")

    uplink = uplinks(base, hub_config(base, stack), env)

    buffer.wait_link("up", 20)
    output = uplink.log()
    assert len(lines_with(output, r"ERROR .*clock_behind ")) == 1
    assert lines_with(output, r"WARNING .*clock_offset_applied ")
    assert lines_with(output, "credentials_rejected") == []


def test_azure_x509_thumbprint_device_connects(
    base: Path, certs: Path, hubs: Any, buffer: StandInBuffer, uplinks: Any
) -> None:
    cert, key = make_client_cert(base / "device", certs / "ca.pem", certs / "ca.key", DEVICE_ID)
    thumbprint = hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()
    stack = hubs(certs, {DEVICE_ID: {"primary_thumbprint": thumbprint}},
                 client_ca_file=certs / "ca.pem")
    write_connection_string(base, f"HostName=localhost;DeviceId={DEVICE_ID};x509=true")
    credentials = f'client_cert_file = "{cert}"\nclient_key_file = "{key}"\n'

    uplink = uplinks(base, azure_credentials_config(
        base, stack.mqtt_port, stack.ca_file, credentials,
        uplink=f"date_port = {stack.https_port}"))

    buffer.wait_link("up", 20)
    assert "x509 thumbprint" in stack.log()
    assert lines_with(uplink.log(), rf"INFO .*certificate_check client certificate CN={DEVICE_ID}")


def test_azure_x509_expired_for_hub_clear_error(
    base: Path, certs: Path, hubs: Any, buffer: StandInBuffer, uplinks: Any
) -> None:
    # make_client_cert(days=30): with the hub's clock 40 days ahead the certificate has
    # expired for the hub, and the gateway logs that once it has read the hub's time.
    cert, key = make_client_cert(base / "device", certs / "ca.pem", certs / "ca.key", DEVICE_ID,
                                 days=30)
    thumbprint = hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()
    stack = hubs(certs, {DEVICE_ID: {"primary_thumbprint": thumbprint}},
                 client_ca_file=certs / "ca.pem")
    stack.set_faults(clock_offset_s=40 * DAY_S)
    write_connection_string(base, f"HostName=localhost;DeviceId={DEVICE_ID};x509=true")
    credentials = f'client_cert_file = "{cert}"\nclient_key_file = "{key}"\n'

    uplink = uplinks(base, azure_credentials_config(
        base, stack.mqtt_port, stack.ca_file, credentials,
        uplink=f"date_port = {stack.https_port}"))

    lines = uplink.wait_log(r"ERROR .*certificate_check client certificate .* expired", 20)
    assert "notAfter=" in lines[0]
    assert len(lines_with(uplink.log(), r"ERROR .*credentials_rejected")) == 1


def test_azure_x509_mismatched_key_clear_error(
    base: Path, certs: Path, uplinks: Any
) -> None:
    cert, _key = make_client_cert(base / "device", certs / "ca.pem", certs / "ca.key", DEVICE_ID)
    _other_cert, other_key = make_client_cert(base / "other", certs / "ca.pem",
                                              certs / "ca.key", "other")
    write_connection_string(base, f"HostName=localhost;DeviceId={DEVICE_ID};x509=true")
    credentials = f'client_cert_file = "{cert}"\nclient_key_file = "{other_key}"\n'

    uplink: UplinkProcess = uplinks(base, azure_credentials_config(
        base, 1, certs / "ca.pem", credentials))

    assert uplink.wait_exit(15) != 0
    output = uplink.log()
    assert f"{other_key}: private key does not match the client certificate {cert}" in output
    assert "Traceback" not in output


@pytest.mark.timeout(480)
def test_azure_renewal_under_load_loses_nothing(
    base: Path, certs: Path, hubs: Any, buffer: StandInBuffer, uplinks: Any
) -> None:
    """Five minutes of pages with 60 s tokens: at least four renewals, every page delivered."""
    stack = hubs(certs)
    subscriber = Subscriber(stack.broker.port, stack.ca_file, "devices/+/messages/events/#",
                            persistent_session=True)
    subscriber.start()
    try:
        write_connection_string(base)
        uplink = uplinks(base, hub_config(base, stack, "sas_ttl_s = 60\nmax_inflight_pages = 20"))
        sent, acked = drive_pages(buffer, duration_s=300.0, pages_per_s=20)

        renewals = lines_with(uplink.log(), r"INFO .*sas_renew ")
        assert len(renewals) >= 4
        assert acked == set(range(sent))
        received = subscriber.wait_for(
            lambda messages: len({topic for topic, _ in messages}) >= sent and messages, 30,
            f"{sent} distinct pages at the broker")
        seen = {int(re.findall(r"\$\.mid=(\d+)", topic)[0]) for topic, _ in received}
        assert seen == set(range(sent))
        assert "token expired" not in stack.log()
    finally:
        subscriber.stop()


def drive_pages(buffer: StandInBuffer, duration_s: float,
                pages_per_s: float) -> tuple[int, set[int]]:
    """Send pages as the buffer does: within the credit, resending the unacknowledged ones
    in each new session. Return the number of pages made and the page_seqs acknowledged."""
    link = buffer.wait_link("up", 20)
    session = link["session"]
    made = 0
    unacked: dict[int, bool] = {}  # page_seq -> sent in the current session
    acked: set[int] = set()
    seen_pubacks = 0
    started = time.monotonic()
    deadline = started + duration_s

    while True:
        buffer.pump(0.02)
        for ack in buffer.pubacks[seen_pubacks:]:
            acked.add(ack["page_seq"])
            unacked.pop(ack["page_seq"], None)
        seen_pubacks = len(buffer.pubacks)

        now = time.monotonic()
        if now < deadline:
            while made < (now - started) * pages_per_s:
                unacked[made] = False
                made += 1
        elif not unacked:
            return made, acked
        assert now < deadline + 60, f"{len(unacked)} pages still unacknowledged"

        latest = buffer.links[-1]
        if latest["state"] != "up":
            continue
        if latest["session"] != session:
            session = latest["session"]
            unacked = dict.fromkeys(unacked, False)
        # Keep at most max_inflight_pages (20) unacknowledged pages at the uplink.
        in_flight = sum(1 for sent in unacked.values() if sent)
        for page_seq in sorted(unacked):
            if in_flight >= 20:
                break
            if not unacked[page_seq]:
                buffer.send_page(page_seq, sample_page(page_seq))
                unacked[page_seq] = True
                in_flight += 1


SUPERVISORD = Path(sys.executable).parent / "supervisord"

# supervisord with the real uplink alone, so that the credential watcher can restart it.
UPLINK_SUPERVISORD_CONF = SUPERVISORD_HEAD + """

[group:plcbridge]
programs=uplink

[program:uplink]
command={python} -m processes.uplink --config {config}
directory={repo}
startsecs=0
autorestart=true
stopsignal=TERM
stopwaitsecs=5
redirect_stderr=true
stdout_logfile={base}/uplink.out
"""


def test_azure_x509_mismatched_key_keeps_connection(
    base: Path, certs: Path, hubs: Any, buffer: StandInBuffer
) -> None:
    cert, key = make_client_cert(base / "device", certs / "ca.pem", certs / "ca.key", DEVICE_ID)
    _other_cert, other_key = make_client_cert(base / "other", certs / "ca.pem",
                                              certs / "ca.key", "other")
    thumbprint = hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()
    stack = hubs(certs, {DEVICE_ID: {"primary_thumbprint": thumbprint}},
                 client_ca_file=certs / "ca.pem")
    write_connection_string(base, f"HostName=localhost;DeviceId={DEVICE_ID};x509=true")
    config = base / "uplink.toml"
    config.write_text(azure_credentials_config(
        base, stack.mqtt_port, stack.ca_file,
        f'client_cert_file = "{cert}"\nclient_key_file = "{key}"\ncheck_interval_s = 0.1\n',
        uplink=f"date_port = {stack.https_port}"))
    conf = base / "supervisord.conf"
    conf.write_text(UPLINK_SUPERVISORD_CONF.format(
        runtime=base / "run", python=sys.executable, config=config, repo=ROOT, base=base))

    supervisord = subprocess.Popen([str(SUPERVISORD), "-n", "-c", str(conf)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watcher_log = base / "watcher.out"
    watcher = None
    try:
        link = buffer.wait_link("up", 20)
        with watcher_log.open("wb") as stream:
            watcher = subprocess.Popen(
                [sys.executable, "-m", "processes.credential_watcher", "--config", str(config)],
                cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT)
        wait_until(lambda: "credentials_loaded" in watcher_log.read_text(), 10,
                   "the watcher's credentials_loaded line")

        # A rotation that pairs the certificate with the wrong key.
        key.write_bytes(other_key.read_bytes())

        wait_until(lambda: "credentials_invalid" in watcher_log.read_text(), 10,
                   "the watcher's credentials_invalid line")
        output = watcher_log.read_text()
        assert "does not match the client certificate" in output
        assert "uplink_restarted" not in output
        # The link stays up in the same session: the connection was kept.
        buffer.pump(1.5)
        assert buffer.links[-1]["state"] == "up"
        assert buffer.links[-1]["session"] == link["session"]
        assert stack.log().count("x509 thumbprint") == 1
    finally:
        if watcher is not None:
            stop_process(watcher)
        stop_process(supervisord)


def write_chained_pair(folder: Path) -> tuple[Path, Path, Path]:
    """Issue a root, an intermediate CA under it and a device certificate under that.

    The device's file contains its certificate followed by the intermediate's, as a device
    whose CA-signed certificate needs its chain has it. Returns the root's file, the
    device's certificate file and its key file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=30))

    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plcbridge device root")])
    root = (
        x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
        .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(validity[0]).not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .sign(root_key, hashes.SHA256())
    )

    middle_key = ec.generate_private_key(ec.SECP256R1())
    middle_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plcbridge intermediate")])
    middle = (
        x509.CertificateBuilder().subject_name(middle_name).issuer_name(root.subject)
        .public_key(middle_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(validity[0]).not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())
    )

    device_key = ec.generate_private_key(ec.SECP256R1())
    device = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE_ID)]))
        .issuer_name(middle_name).public_key(device_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0]).not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(middle_key, hashes.SHA256())
    )

    root_path = folder / "root.pem"
    cert_path = folder / "device.pem"
    key_path = folder / "device.key"
    root_path.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(device.public_bytes(serialization.Encoding.PEM)
                          + middle.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(device_key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    key_path.chmod(0o600)
    return root_path, cert_path, key_path


def test_azure_x509_chain_sent(
    base: Path, certs: Path, hubs: Any, buffer: StandInBuffer, uplinks: Any
) -> None:
    # The hub trusts only the root, so the handshake works only if the uplink sends the
    # intermediate certificate along with the device's.
    root, cert, key = write_chained_pair(base / "device")
    stack = hubs(certs, {DEVICE_ID: {"ca_signed": True}}, client_ca_file=root)
    write_connection_string(base, f"HostName=localhost;DeviceId={DEVICE_ID};x509=true")
    credentials = f'client_cert_file = "{cert}"\nclient_key_file = "{key}"\n'

    uplink = uplinks(base, azure_credentials_config(
        base, stack.mqtt_port, stack.ca_file, credentials,
        uplink=f"date_port = {stack.https_port}"))

    try:
        buffer.wait_link("up", 20)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nuplink:\n{uplink.log()}\nhub:\n{stack.log()}") from None
    assert "x509 ca" in stack.log()
