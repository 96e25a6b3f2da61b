"""The token server for tests: its configuration, key files and process on a loopback port.

TokenServerProcess writes the device keys and challenge secrets with mode 0600, as the
server requires, starts `plcbridge token-server` and reads the port from its ready line.
A restart binds the same port, so a gateway configured with the URL finds it again.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devstack.dev_certs import dev_cert_paths
from devstack.gateway_toml import toml_table
from tests.gateway_files import stop_process
from tests.support.waiting import wait_for_ready_line

ROOT = Path(__file__).resolve().parents[2]
_READY = re.compile(r"token_server_ready .*port=(\d+)")


def new_secret() -> str:
    """Return a random 32-byte key or secret in base64."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def write_private(path: Path, text: str) -> Path:
    """Write a key or secret file that only its owner can read, as the server requires."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text + "\n")
    os.chmod(path, 0o600)
    return path


@dataclass(frozen=True)
class AllowedGateway:
    """One [[devices]] entry: device_key None means the group key signs its tokens."""

    serial: str
    device_id: str
    device_key: str | None = None
    secret: str | None = None


def server_toml(workdir: Path, certs_dir: Path, gateways: list[AllowedGateway], *,
                port: int = 0, ttl_s: int = 3600, hub_host: str = "localhost",
                client_certificates: bool = True, group_key: str | None = None,
                rate_limit: Mapping[str, object] | None = None) -> str:
    """Write the key files below workdir and return the server's configuration text."""
    certs = dev_cert_paths(certs_dir)
    listen: dict[str, object] = {"host": "127.0.0.1", "port": port,
                                 "cert_file": certs.server_cert, "key_file": certs.server_key,
                                 "request_timeout_s": 5.0}
    if client_certificates:
        listen["client_ca_file"] = certs.ca_cert
    tokens: dict[str, object] = {"hub_host_name": hub_host, "ttl_s": ttl_s}
    if group_key is not None:
        tokens["group_key_file"] = write_private(workdir / "group.key", group_key)
    tables = [f'audit_log_file = "{workdir}/audit.jsonl"\n', toml_table("listen", listen),
              toml_table("tokens", tokens)]
    if rate_limit is not None:
        tables.append(toml_table("rate_limit", rate_limit))
    for gateway in gateways:
        device: dict[str, object] = {"serial": gateway.serial, "device_id": gateway.device_id}
        if gateway.device_key is not None:
            device["key_file"] = write_private(workdir / f"{gateway.serial}.key",
                                               gateway.device_key)
        if gateway.secret is not None:
            device["secret_file"] = write_private(workdir / f"{gateway.serial}.secret",
                                                  gateway.secret)
        tables.append(toml_table("[devices]", device))
    return "\n".join(tables)


class TokenServerProcess:
    """`plcbridge token-server` as a real process; stop() and start() keep its port."""

    def __init__(self, workdir: Path, config_text: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.config = workdir / "token-server.toml"
        self.config.write_text(config_text)
        self.audit_file = workdir / "audit.jsonl"
        self.log_file = workdir / "token-server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def start(self, timeout_s: float = 15.0) -> None:
        if self.port:
            # Bind the port of the first run again, which the gateway's URL names.
            text = re.sub(r"(?m)^port = \d+$", f"port = {self.port}", self.config.read_text())
            self.config.write_text(text)
        started_at = len(self.log())
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "token-server", "--config", str(self.config)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        # The log file is appended to across restarts, so only this start's lines count.
        found = wait_for_ready_line(self.process, lambda: self.log()[started_at:], _READY,
                                    timeout_s, "token server")
        self.port = int(found[1])

    def stop(self, timeout_s: float = 5.0) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_process(process, timeout_s)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def audit(self) -> list[dict[str, Any]]:
        if not self.audit_file.exists():
            return []
        return [json.loads(line) for line in self.audit_file.read_text().splitlines()]


def write_expired_client_cert(outdir: Path, ca_cert_file: Path, ca_key_file: Path,
                              common_name: str) -> tuple[Path, Path]:
    """Write a client certificate signed by the CA that expired an hour ago."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_file.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now - datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    outdir.mkdir(parents=True, exist_ok=True)
    cert_path = outdir / f"{common_name}-expired.pem"
    key_path = outdir / f"{common_name}-expired.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    write_private(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode().strip())
    return cert_path, key_path
