"""Test-side builders of gateway configurations and credential files: CA, client pair, strings."""

from __future__ import annotations

import base64
import datetime
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.credentials import mint_sas_token
from devstack.gateway_toml import COUNTER_TAG, gateway_toml

REPO = Path(__file__).resolve().parent.parent
HUB = "hub.example.net"
DEVICE = "gw-test-01"
# GatewayHostName keeps any uplink that these tests start on loopback, away from HUB.
IDENTITY = f"HostName={HUB};DeviceId={DEVICE};GatewayHostName=127.0.0.1"


@dataclass
class GatewayFiles:
    """A gateway folder: config.toml, credential files, and a short runtime folder."""

    root: Path
    runtime_dir: Path
    config: Path
    connection_string: Path
    ca: Path
    secrets: list[str]  # every key and signature written, to search logs for


def make_runtime_dir() -> Path:
    # ipc:// and unix socket paths are limited to about 100 bytes, so stay short and in /tmp.
    return Path(tempfile.mkdtemp(prefix="pb-", dir="/tmp"))


def write_ca(path: Path, common_name: str = "plcbridge test CA") -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _self_signed(key, common_name, ca=True)
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def write_client_pair(cert_path: Path, key_path: Path, common_name: str = DEVICE,
                      expired: bool = False) -> None:
    """Write a self-signed EC certificate and its key, valid for 30 days, or one that
    expired on 2021-06-30 12:00 UTC."""
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _self_signed(key, common_name, expired=expired)
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))


def _self_signed(key: ec.EllipticCurvePrivateKey, common_name: str,
                 ca: bool = False, expired: bool = False) -> x509.Certificate:
    """Build a self-signed certificate; ca marks it as a root CA, as OpenSSL expects one."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    if expired:
        now = datetime.datetime(2021, 5, 31, 12, 0, tzinfo=datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                        critical=True)
    return builder.sign(key, hashes.SHA256())


def device_key_string(secrets: list[str]) -> str:
    key = base64.b64encode(os.urandom(32)).decode()
    secrets.append(key)
    return f"{IDENTITY};SharedAccessKey={key}"


def sas_token_string(secrets: list[str], expiry_s: int) -> str:
    key = os.urandom(32)
    token = mint_sas_token(f"{HUB}/devices/{DEVICE}", key, expiry_s)
    signature = token.split("sig=")[1].split("&")[0]
    secrets.extend([signature, base64.b64encode(key).decode()])
    return f"{IDENTITY};SharedAccessSignature={token}"


def write_gateway(root: Path, runtime_dir: Path, credentials_extra: str = "",
                  extra_sections: str = "", log_level: str = "DEBUG",
                  loopback_port: int = 1502) -> GatewayFiles:
    """Write a valid azure-mode gateway with a device-key connection string and a CA file.

    Both the PLC and the uplink point at 127.0.0.1:loopback_port.
    """
    secrets: list[str] = []
    files = GatewayFiles(
        root=root,
        runtime_dir=runtime_dir,
        config=root / "config.toml",
        connection_string=root / "connection-string.txt",
        ca=root / "ca.pem",
        secrets=secrets,
    )
    files.connection_string.write_text(device_key_string(secrets) + "\n")
    write_ca(files.ca)
    files.config.write_text(gateway_toml(
        gateway={"state_dir": "state", "runtime_dir": str(runtime_dir), "log_dir": "log",
                 "log_level": log_level},
        plc={"host": "127.0.0.1", "port": loopback_port},
        tags=[{**COUNTER_TAG, "type": "uint32"}],
        uplink={"mode": "azure", "port": loopback_port},
        credentials=[{"connection_string_file": "connection-string.txt", "ca_file": "ca.pem",
                      "check_interval_s": 0.1, "rehash_interval_s": 1.0},
                     credentials_extra, extra_sections],
    ))
    return files



def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """Send SIGTERM, wait, and SIGKILL a process that does not exit in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)


@contextmanager
def removed_afterwards(*paths: Path) -> Iterator[None]:
    try:
        yield
    finally:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
