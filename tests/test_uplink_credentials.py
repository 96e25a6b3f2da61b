"""The uplink's credentials against a real mosquitto over TLS: X.509, CA bundles, clock checks.

Tests that need a hub that checks SAS tokens are in test_azure_credentials.py.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.credentials import mint_sas_token
from devstack.dev_certs import make_client_cert
from devstack.mosquitto import find_mosquitto, write_config
from tests import test_uplink as uplink_tests
from tests.gateway_files import write_ca
from tests.support.broker import Broker, client_tls_context, free_port
from tests.test_cli_credentials import encrypt_key
from tests.test_clock import DateServer
from tests.test_uplink import (
    DEVICE_ID,
    DEVICE_KEY,
    LIBFAKETIME,
    StandInBuffer,
    azure_config,
    uplink_config,
    write_connection_string,
)

pytestmark = pytest.mark.integration

# The uplink tests' fixtures: a mosquitto over TLS, a stand-in buffer and uplink processes.
broker = uplink_tests.broker
buffer = uplink_tests.buffer
uplinks = uplink_tests.uplinks

# Validity start of the backdated test CA and server certificate, so that an uplink whose
# clock runs 90 days behind still accepts the broker's certificate.
BACKDATE = datetime.timedelta(days=200)


def write_backdated_certs(folder: Path) -> None:
    """Write ca.pem, ca.key, server.pem and server.key, valid from 200 days ago, for loopback."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plcbridge backdated CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + BACKDATE)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + BACKDATE)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    for name, key in (("ca.key", ca_key), ("server.key", server_key)):
        (folder / name).write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        (folder / name).chmod(0o600)
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))


class X509Broker:
    """mosquitto over TLS with require_certificate true, on a free loopback port."""

    def __init__(self, certs: Path, workdir: Path) -> None:
        self.certs = certs
        self.workdir = workdir
        # The readiness probe presents a certificate of its own, because the listener
        # ends every handshake without one.
        self.client = make_client_cert(workdir / "probe", certs / "ca.pem", certs / "ca.key",
                                       "readiness-probe")
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        config = write_config(self.port, self.certs, self.workdir, require_certificate=True)
        self.process = subprocess.Popen([find_mosquitto(), "-c", str(config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        context = client_tls_context(self.certs / "ca.pem")
        context.load_cert_chain(*self.client)
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process.poll() is None, "mosquitto exited at start"
            try:
                with (socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as raw,
                      context.wrap_socket(raw, server_hostname="localhost")):
                    return
            except OSError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def given_token(expiry_s: int) -> str:
    token = mint_sas_token(f"localhost/devices/{DEVICE_ID}", base64.b64decode(DEVICE_KEY),
                           expiry_s)
    return f"HostName=localhost;DeviceId={DEVICE_ID};SharedAccessSignature={token}"


@pytest.fixture
def started() -> Iterator[list[Any]]:
    """Servers a test starts; each is stopped at the end."""
    servers: list[Any] = []
    try:
        yield servers
    finally:
        for server in reversed(servers):
            server.stop()


def azure_credentials_config(base: Path, port: int, ca_file: Path, credentials: str = "",
                             uplink: str = "", **kwargs: Any) -> str:
    lines = f'connection_string_file = "{base}/connection-string.txt"\n{credentials}'
    return uplink_config(base, port, ca_file, uplink=f'mode = "azure"\n{uplink}',
                         credentials=lines, **kwargs)


def test_uplink_x509_encrypted_key_connects(
    base: Path, certs: Path, buffer: StandInBuffer, uplinks: Any, started: list[Any]
) -> None:
    broker = X509Broker(certs, base / "mosquitto")
    started.append(broker)
    broker.start()
    cert, key = make_client_cert(base / "device", certs / "ca.pem", certs / "ca.key", DEVICE_ID)
    encrypt_key(key, b"key passphrase")
    (base / "passphrase.txt").write_text("key passphrase\n")
    write_connection_string(base, f"HostName=localhost;DeviceId={DEVICE_ID};x509=true")
    credentials = (f'client_cert_file = "{cert}"\nclient_key_file = "{key}"\n'
                   f'client_key_passphrase_file = "{base}/passphrase.txt"\n')

    uplink = uplinks(base, azure_credentials_config(base, broker.port, certs / "ca.pem",
                                                     credentials))

    buffer.wait_link("up", 15)
    output = uplink.log()
    assert re.search(rf"INFO .*certificate_check client certificate CN={DEVICE_ID} valid", output)
    assert "key passphrase" not in output


def test_uplink_x509_without_certificate_refused_by_broker(
    base: Path, certs: Path, buffer: StandInBuffer, uplinks: Any, started: list[Any]
) -> None:
    broker = X509Broker(certs, base / "mosquitto")
    started.append(broker)
    broker.start()
    write_connection_string(base)

    uplink = uplinks(base, azure_config(base, broker.port, certs / "ca.pem"))

    uplink.wait_log(r"WARNING .*connect_failed ", 15)
    assert buffer.links == [] or buffer.links[-1]["state"] == "down"


def test_uplink_ca_bundle_with_two_roots_connects(
    base: Path, broker: Broker, buffer: StandInBuffer, uplinks: Any
) -> None:
    # The broker's root comes second, as the next CA does during a hub's change of root.
    write_ca(base / "other-root.pem", common_name="current root")
    bundle = base / "bundle.pem"
    bundle.write_bytes((base / "other-root.pem").read_bytes() + broker.ca_file.read_bytes())
    write_connection_string(base)

    uplinks(base, azure_config(base, broker.port, bundle))

    buffer.wait_link("up", 15)


@pytest.mark.parametrize("content", [b"", b"# no certificate here\n"], ids=["empty", "comment"])
def test_uplink_empty_ca_bundle_exits(base: Path, uplinks: Any, content: bytes) -> None:
    (base / "empty.pem").write_bytes(content)
    write_connection_string(base)

    uplink = uplinks(base, azure_config(base, 1, base / "empty.pem"))

    assert uplink.wait_exit(15) != 0
    output = uplink.log()
    assert f"{base}/empty.pem" in output
    assert "contains no PEM certificate" in output
    assert "Traceback" not in output


def test_uplink_expired_given_token_alerts(
    base: Path, broker: Broker, buffer: StandInBuffer, uplinks: Any
) -> None:
    # mosquitto does not check SAS tokens, so the link comes up. The uplink still logs
    # that the hub would reject this token and that only a new one fixes it.
    expired_s = int(time.time()) - 3600
    write_connection_string(base, given_token(expired_s))

    uplink = uplinks(base, azure_config(base, broker.port, broker.ca_file))

    buffer.wait_link("up", 15)
    lines = uplink.wait_log(r"ERROR .*sas_check SAS token expired", 5)
    assert f"se={expired_s} (" in lines[0]
    assert "now=" in lines[0]
    assert "only a new SAS token fixes this" in lines[0]


def test_uplink_token_expiring_soon_warns(
    base: Path, broker: Broker, buffer: StandInBuffer, uplinks: Any
) -> None:
    expiry_s = int(time.time()) + 2 * 86400
    write_connection_string(base, given_token(expiry_s))

    uplink = uplinks(base, azure_config(base, broker.port, broker.ca_file))

    buffer.wait_link("up", 15)
    lines = uplink.wait_log(r"WARNING .*sas_check SAS token might be outdated soon", 5)
    assert f"se={expiry_s} (" in lines[0]
    assert "only a new SAS token fixes this" in lines[0]


@pytest.mark.skipif(not LIBFAKETIME.exists(), reason="needs Debian's faketime package")
def test_uplink_clock_behind_logs_error_and_connects(
    base: Path, buffer: StandInBuffer, uplinks: Any, started: list[Any]
) -> None:
    certs = base / "backdated"
    write_backdated_certs(certs)
    broker = Broker(certs, base / "mosquitto")
    started.append(broker)
    broker.start()
    date_server = DateServer(certs, 0.0).__enter__()
    started.append(StopDateServer(date_server))
    write_connection_string(base, given_token(int(time.time()) + 3600))
    # With a negative offset libfaketime 0.9.10 also moves the monotonic clock back,
    # and Event.wait() then never returns, so only the wall clock is faked.
    env = dict(os.environ, LD_PRELOAD=str(LIBFAKETIME), FAKETIME="-90d",
               FAKETIME_DONT_FAKE_MONOTONIC="1")

    uplink = uplinks(base, azure_config(base, broker.port, broker.ca_file,
                                        uplink=f"date_port = {date_server.port}"), env)

    buffer.wait_link("up", 20)
    errors = uplink.wait_log(r"ERROR .*clock_behind ", 5)
    assert 'floor_source="release time"' in errors[0]
    applied = uplink.wait_log(r"WARNING .*clock_offset_applied ", 5)
    offset_s = float(re.search(r"offset_s=(\S+)", applied[0]).group(1))  # type: ignore[union-attr]
    assert abs(offset_s - 90 * 86400) < 5
    # With the hub's time, the given token is judged by the real clock: one hour left, not
    # the 90 days and one hour that the wall clock would show.
    assert "sas_check SAS token might be outdated soon: 1.0 h left" in uplink.log()
    floor = json.loads((base / "state" / "time-floor.json").read_text())
    assert abs(floor["floor_s"] - time.time()) < 60


@pytest.mark.skipif(not LIBFAKETIME.exists(), reason="needs Debian's faketime package")
def test_uplink_clock_ahead_warns_outdated_token(
    base: Path, broker: Broker, buffer: StandInBuffer, uplinks: Any
) -> None:
    expiry_s = int(time.time()) + 3600
    write_connection_string(base, given_token(expiry_s))
    env = dict(os.environ, LD_PRELOAD=str(LIBFAKETIME), FAKETIME="+30d")

    uplink = uplinks(base, azure_config(base, broker.port, broker.ca_file), env)

    lines = uplink.wait_log(r"ERROR .*sas_check SAS token expired or the clock is wrong", 15)
    assert f"se={expiry_s} (" in lines[0]


class StopDateServer:
    def __init__(self, server: DateServer) -> None:
        self.server = server

    def stop(self) -> None:
        self.server.__exit__(None, None, None)


@pytest.mark.skipif(not LIBFAKETIME.exists(), reason="needs Debian's faketime package")
def test_faketime_negative_offset_wait_returns() -> None:
    # The uplink's retries wait on an Event, which hangs under a negative offset unless the
    # monotonic clock is left alone.
    script = "import threading, time; print(threading.Event().wait(0.2), int(time.time()))"
    env = dict(os.environ, LD_PRELOAD=str(LIBFAKETIME), FAKETIME="-90d",
               FAKETIME_DONT_FAKE_MONOTONIC="1")

    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=10, check=False)

    assert result.returncode == 0, result
    waited, wall_s = result.stdout.split()
    assert waited == "False"
    assert abs(int(wall_s) - (time.time() - 90 * 86400)) < 60
