"""The hub emulator for tests: mosquitto behind devstack.hub_emulator, and a raw MQTT client.

HubStack starts both on free loopback ports and stops both. RawMqttClient speaks just
enough MQTT 3.1.1 over TLS to read a CONNACK code and to see the emulator close the
connection, which a paho client hides behind its reconnect logic.
"""

from __future__ import annotations

import base64
import json
import os
import re
import resource
import secrets
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from devstack.dev_certs import dev_cert_paths
from tests.gateway_files import stop_process
from tests.support.broker import Broker, client_tls_context
from tests.support.waiting import wait_for_ready_line

_READY = re.compile(r"hub_emulator ready mqtt_port=(\d+) https_port=(\d+)")


def new_device_key() -> str:
    """Return a random 32-byte device key in base64, as the Azure portal creates them."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def registry_toml(devices: dict[str, dict[str, Any]],
                  modules: dict[str, dict[str, Any]] | None = None) -> str:
    """Render a registry file: {"gw-01": {"primary_key": "..."}, ...}."""
    lines: list[str] = []
    for section, identities in (("devices", devices), ("modules", modules or {})):
        for name, table in identities.items():
            lines.append(f"[{section}.{json.dumps(name)}]")
            lines.extend(f"{key} = {json.dumps(value)}" for key, value in table.items())
            lines.append("")
    return "\n".join(lines)


def username(hub_host: str, client_id: str, api_version: str = "2021-04-12") -> str:
    return f"{hub_host}/{client_id}/?api-version={api_version}"


class HubStack:
    """mosquitto plus the hub emulator in front of it, each on a free loopback port.

    The emulator uses the development server certificate, so clients verify it against
    certs_dir/ca.pem under the name "localhost". server_pair gives the emulator another
    certificate and key file instead, which a test may then rewrite; mosquitto keeps the
    development pair. The hub host name defaults to "localhost",
    so that a connection string's HostName is also where a gateway can connect.
    """

    def __init__(
        self,
        certs_dir: Path,
        workdir: Path,
        devices: dict[str, dict[str, Any]],
        modules: dict[str, dict[str, Any]] | None = None,
        hub_host: str = "localhost",
        skew_s: float = 300.0,
        client_ca_file: Path | None = None,
        extra_args: tuple[str, ...] = (),
        fd_limit: int | None = None,
        server_pair: tuple[Path, Path] | None = None,
    ) -> None:
        self.certs = dev_cert_paths(certs_dir)
        self.server_cert, self.server_key = server_pair or (
            self.certs.server_cert, self.certs.server_key)
        self.ca_file = self.certs.ca_cert
        self.workdir = workdir
        self.hub_host = hub_host
        self.skew_s = skew_s
        self.client_ca_file = client_ca_file
        self.extra_args = extra_args
        # Soft RLIMIT_NOFILE of the emulator process, to run it out of file descriptors.
        self.fd_limit = fd_limit
        self.registry_file = workdir / "registry.toml"
        self.faults_file = workdir / "faults.json"
        self.log_file = workdir / "hub_emulator.log"
        workdir.mkdir(parents=True, exist_ok=True)
        self.registry_file.write_text(registry_toml(devices, modules))
        self.broker = Broker(certs_dir, workdir / "mosquitto")
        self.process: subprocess.Popen[bytes] | None = None
        self.mqtt_port = 0
        self.https_port = 0

    def __enter__(self) -> HubStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def command(self) -> list[str]:
        command = [
            sys.executable, "-m", "devstack.hub_emulator",
            "--listen", "127.0.0.1:0",
            "--https-port", "0",
            "--cert", str(self.server_cert),
            "--key", str(self.server_key),
            "--registry", str(self.registry_file),
            "--upstream", f"127.0.0.1:{self.broker.port}",
            "--upstream-ca", str(self.ca_file),
            "--skew-s", str(self.skew_s),
            "--faults", str(self.faults_file),
            "--hub-host", self.hub_host,
            *self.extra_args,
        ]
        if self.client_ca_file is not None:
            command += ["--client-ca", str(self.client_ca_file)]
        return command

    def start(self, timeout_s: float = 15.0) -> None:
        self.broker.start()
        with self.log_file.open("wb") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=self._limit_fds if self.fd_limit else None)
        self._wait_ready(timeout_s)

    def _limit_fds(self) -> None:
        assert self.fd_limit is not None
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.fd_limit, hard))

    def _wait_ready(self, timeout_s: float) -> None:
        assert self.process is not None
        found = wait_for_ready_line(self.process, self.log, _READY, timeout_s, "hub emulator")
        self.mqtt_port, self.https_port = int(found[1]), int(found[2])

    def stop(self, timeout_s: float = 5.0) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_process(process, timeout_s)
        self.broker.stop()

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def wait_for_log(self, text: str, timeout_s: float = 10.0, after: int = 0) -> str:
        """Wait until a line of the emulator's log contains text and return that line.

        after skips the first characters of the log, so that a line written before the
        step under test cannot match.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.log()[after:].splitlines():
                if text in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line with {text!r} within {timeout_s:g} s:\n{self.log()}")

    def set_faults(self, **faults: Any) -> None:
        """Replace the faults file in one rename; the emulator follows it at its next check."""
        temporary = self.faults_file.with_name(".faults.json.tmp")
        temporary.write_text(json.dumps(faults))
        os.replace(temporary, self.faults_file)

    def connection_string(self, device_id: str, key: str) -> str:
        return f"HostName={self.hub_host};DeviceId={device_id};SharedAccessKey={key}"


class RawMqttClient:
    """A blocking MQTT 3.1.1 client over TLS that exposes CONNACK codes and closes."""

    def __init__(self, port: int, ca_file: Path, certificate: tuple[Path, Path] | None = None,
                 timeout_s: float = 5.0) -> None:
        context = client_tls_context(ca_file)
        if certificate is not None:
            context.load_cert_chain(*certificate)
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self.sock: ssl.SSLSocket = context.wrap_socket(raw, server_hostname="localhost")
        self._next_packet_id = 1

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawMqttClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def connect(self, client_id: str, user: str | None, password: str | None,
                keep_alive_s: int = 60) -> int | None:
        """Send CONNECT and return the CONNACK return code, or None if the server closed."""
        flags = 0x02  # clean session
        if user is not None:
            flags |= 0x80
        if password is not None:
            flags |= 0x40
        body = _text("MQTT") + bytes((4, flags)) + keep_alive_s.to_bytes(2, "big")
        body += _text(client_id)
        if user is not None:
            body += _text(user)
        if password is not None:
            body += _text(password)
        self.sock.sendall(_packet(0x10, body))

        try:
            packet = self.read_packet()
        except ssl.SSLError:
            # Under TLS 1.3 a rejected client certificate surfaces at the first read.
            return None
        if packet is None:
            return None
        packet_type, payload = packet
        assert packet_type == 0x20, f"expected CONNACK, got packet type {packet_type >> 4}"
        return payload[1]

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> int | None:
        """Send PUBLISH and return its packet id (None for QoS 0)."""
        body = _text(topic)
        packet_id = None
        if qos > 0:
            packet_id = self._next_packet_id
            self._next_packet_id += 1
            body += packet_id.to_bytes(2, "big")
        self.sock.sendall(_packet(0x30 | (qos << 1), body + payload))
        return packet_id

    def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        """Send SUBSCRIBE with one topic filter and return its packet id."""
        packet_id = self._next_packet_id
        self._next_packet_id += 1
        body = packet_id.to_bytes(2, "big") + _text(topic_filter) + bytes((qos,))
        self.sock.sendall(_packet(0x82, body))
        return packet_id

    def disconnect(self) -> None:
        self.sock.sendall(_packet(0xE0, b""))

    def send_packet(self, first_byte: int, body: bytes) -> None:
        """Send any packet, well-formed or not, with a correct remaining length."""
        self.sock.sendall(_packet(first_byte, body))

    def read_packet(self, timeout_s: float = 5.0) -> tuple[int, bytes] | None:
        """Return (first header byte, body) of the next packet, or None when closed."""
        self.sock.settimeout(timeout_s)
        try:
            first = self.sock.recv(1)
            if not first:
                return None
            length, shift = 0, 0
            while True:
                byte = self._recv_exactly(1)[0]
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            return first[0], self._recv_exactly(length)
        except (ConnectionResetError, ssl.SSLEOFError):
            return None

    def _recv_exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionResetError("closed inside a packet")
            data += chunk
        return data

    def wait_closed(self, timeout_s: float) -> list[int]:
        """Wait until the server closes the connection; return the packet types read first."""
        deadline = time.monotonic() + timeout_s
        seen: list[int] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"connection still open after {timeout_s:g} s")
            try:
                packet = self.read_packet(timeout_s=remaining)
            except TimeoutError:
                continue
            if packet is None:
                return seen
            seen.append(packet[0] >> 4)


def _text(value: str) -> bytes:
    data = value.encode()
    return len(data).to_bytes(2, "big") + data


def _packet(first_byte: int, body: bytes) -> bytes:
    header = bytearray((first_byte,))
    length = len(body)
    while True:
        byte, length = length & 0x7F, length >> 7
        header.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(header) + body
