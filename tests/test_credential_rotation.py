"""Credential rotations against the real uplink and watcher, under supervisord, with the hub.

Each test runs supervisord with the real uplink and the real credential watcher, as
supervisord.conf runs them, and the uplink connects to the hub emulator with TLS. The
watcher's restarts are counted on its tap, and the uplink's connections in the emulator's
log, which has a line for every CONNECT.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from common.supervisor_rpc import SupervisorClient, SupervisorUnavailableError
from devstack.dev_certs import make_client_cert
from devstack.gateway_toml import gateway_dirs, gateway_toml
from tests.gateway_files import REPO, stop_process
from tests.support.fault_stack import TapReader
from tests.support.hub import HubStack, new_device_key
from tests.support.plc import free_port
from tests.support.supervisord_conf import SUPERVISORD_HEAD
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

SUPERVISORD = Path(sys.executable).parent / "supervisord"
UPLINK = "plcbridge:uplink"
WATCHER = "plcbridge:credential_watcher"
SAS_DEVICE = "gw-rotate"
X509_DEVICE = "gw-rotate-x509"
PRIMARY = new_device_key()
SECONDARY = new_device_key()

# The two programs with the settings of the shipped supervisord.conf.
PROGRAMS = """
[group:plcbridge]
programs=uplink,credential_watcher
"""
PROGRAM = """
[program:{name}]
command={python} -m processes.{name} --config {config}
directory={repo}
priority={priority}
autorestart=true
startsecs=1
startretries=1000
stopsignal=TERM
stopwaitsecs=10
stopasgroup=true
killasgroup=true
redirect_stderr=true
stdout_logfile={log_dir}/{name}.log
"""

# Checks the watcher makes after a restart before a test concludes that no second one
# follows. At the default 0.1 s interval that is 3 s, longer than the settle time and the
# 2 s in which a set that fails to parse is checked quietly.
QUIET_CHECKS = 30


def sas_string(key: str) -> bytes:
    return f"HostName=localhost;DeviceId={SAS_DEVICE};SharedAccessKey={key}\n".encode()


class RotationGateway:
    """supervisord with the real uplink and watcher, the hub emulator and the watcher's tap."""

    def __init__(self, base: Path, certs: Path, context: zmq.Context[zmq.Socket[bytes]],
                 x509: bool) -> None:
        self.base = base
        self.certs = certs
        self.x509 = x509
        self.device = X509_DEVICE if x509 else SAS_DEVICE
        self.run_dir = base / "run"
        self.log_dir = base / "log"
        self.connection_string = base / "connection-string.txt"
        self.ca_file = base / "ca.pem"
        self.client_cert = base / "device" / f"{X509_DEVICE}.pem"
        self.client_key = base / "device" / f"{X509_DEVICE}.key"
        self.config = base / "plcbridge.toml"
        self.hub = HubStack(certs, base / "hub", {
            SAS_DEVICE: {"primary_key": PRIMARY, "secondary_key": SECONDARY},
            X509_DEVICE: {"ca_signed": True},
        }, client_ca_file=certs / "ca.pem")
        self.client = SupervisorClient(self.run_dir / "supervisord.sock")
        self.context = context
        self.tap: TapReader | None = None
        self.supervisord: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.hub.start()
        self._write_files()
        for folder in (self.run_dir, self.log_dir):
            folder.mkdir(parents=True, exist_ok=True)
        conf = self.base / "supervisord.conf"
        text = SUPERVISORD_HEAD.format(runtime=self.run_dir) + PROGRAMS
        for name, priority in (("uplink", 30), ("credential_watcher", 40)):
            text += PROGRAM.format(name=name, priority=priority, python=sys.executable,
                                   config=self.config, repo=REPO, log_dir=self.log_dir)
        conf.write_text(text)
        self.tap = TapReader(self.context, self.run_dir, "credential_watcher")
        self.supervisord = subprocess.Popen([str(SUPERVISORD), "-n", "-c", str(conf)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        wait_until(lambda: self.state(UPLINK) == "RUNNING" and self.state(WATCHER) == "RUNNING",
                   20, "supervisord to run the uplink and the watcher")
        wait_until(lambda: self.connects() >= 1, 20, "the uplink's first CONNECT")
        wait_until(lambda: "applied_record_created" in self.log("credential_watcher"), 10,
                   "the watcher's first applied record")
        self.counters(lambda counters: "restarts" in counters, "the watcher's tap counters")

    def _write_files(self) -> None:
        shutil.copy(self.certs / "ca.pem", self.ca_file)
        credentials: dict[str, Any] = {"connection_string_file": str(self.connection_string),
                                       "ca_file": str(self.ca_file)}
        if self.x509:
            self.connection_string.write_text(f"HostName=localhost;DeviceId={X509_DEVICE};"
                                              "x509=true\n")
            folder = self.client_cert.parent
            self.client_cert, self.client_key = self.issue_device_certificate(folder)
            credentials.update(client_cert_file=str(self.client_cert),
                               client_key_file=str(self.client_key))
        else:
            self.connection_string.write_bytes(sas_string(PRIMARY))
        self.config.write_text(gateway_toml(
            gateway={**gateway_dirs(self.base), "log_level": "INFO"},
            plc={"host": "127.0.0.1", "port": free_port()},
            uplink={"mode": "azure", "port": self.hub.mqtt_port,
                    "date_port": self.hub.https_port, "connect_timeout_s": 5.0,
                    "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
            credentials=credentials,
        ))

    def issue_device_certificate(self, folder: Path) -> tuple[Path, Path]:
        """Issue a certificate and key for the X.509 device, signed by the emulator's CA."""
        return make_client_cert(folder, self.certs / "ca.pem", self.certs / "ca.key", X509_DEVICE)

    def stop(self) -> None:
        if self.supervisord is not None:
            stop_process(self.supervisord, timeout_s=30)
        if self.tap is not None:
            self.tap.close()
        self.hub.stop()

    def state(self, program: str) -> str | None:
        try:
            return str(self.client.process_info(program)["statename"])
        except SupervisorUnavailableError:
            return None

    def pid(self, program: str) -> int:
        return int(self.client.process_info(program)["pid"])

    def log(self, program: str) -> str:
        path = self.log_dir / f"{program}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def watcher_lines(self, event: str) -> list[str]:
        return [line for line in self.log("credential_watcher").splitlines()
                if f" {event} " in line]

    def connects(self) -> int:
        """Return how many CONNECTs of this gateway's device the emulator has logged."""
        pattern = re.compile(rf"connect_(accepted|rejected|failed) client_id={self.device} ")
        return len(pattern.findall(self.hub.log()))

    def counters(self, predicate: Any, what: str, timeout_s: float = 15.0) -> dict[str, Any]:
        assert self.tap is not None
        return self.tap.wait_counters(predicate, timeout_s, what)

    def wait_restarts(self, count: int) -> None:
        self.counters(lambda counters: counters["restarts"] >= count,
                      f"{count} restart(s) by the watcher")
        wait_until(lambda: self.state(UPLINK) == "RUNNING", 15, "the uplink RUNNING again")

    def settle(self) -> dict[str, Any]:
        """Wait for QUIET_CHECKS more checks by the watcher and return its counters."""
        assert self.tap is not None
        self.tap.pump(0.0)
        checks = self.tap.counters["checks"]
        return self.counters(lambda counters: counters["checks"] >= checks + QUIET_CHECKS,
                             f"{QUIET_CHECKS} more checks by the watcher")


@pytest.fixture
def gateway(request: pytest.FixtureRequest, base: Path, certs: Path,
            context: zmq.Context[zmq.Socket[bytes]]) -> Iterator[RotationGateway]:
    """The gateway with a SAS device, or with an X.509 device when parametrized with True."""
    stack = RotationGateway(base, certs, context, x509=getattr(request, "param", False))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def assert_one_restart(gateway: RotationGateway, old_pid: int, errors: int = 0) -> None:
    """Check that the rotation restarted the uplink once, and that it connected once more."""
    gateway.wait_restarts(1)
    wait_until(lambda: gateway.connects() >= 2, 15, "the restarted uplink's CONNECT")

    counters = gateway.settle()

    assert counters["restarts"] == 1
    assert gateway.connects() == 2
    assert gateway.pid(UPLINK) != old_pid
    assert len(gateway.watcher_lines("uplink_restarted")) == 1
    assert len(gateway.watcher_lines("credentials_invalid")) == errors


def test_rotation_same_size_rewrite_keeping_mtime(gateway: RotationGateway) -> None:
    path = gateway.connection_string
    before = path.stat()
    pid = gateway.pid(UPLINK)

    # In place, same size, and the old mtime put back, so only the ctime shows the change.
    with path.open("r+b") as stream:
        stream.write(sas_string(SECONDARY))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size, before.st_mtime_ns, before.st_ino)

    assert_one_restart(gateway, pid)


def test_rotation_rename_keeping_old_mtime(gateway: RotationGateway) -> None:
    path = gateway.connection_string
    before = path.stat()
    pid = gateway.pid(UPLINK)

    temporary = path.with_name(".connection-string.new")
    temporary.write_bytes(sas_string(SECONDARY))
    os.utime(temporary, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(temporary, path)

    assert path.stat().st_mtime_ns == before.st_mtime_ns
    assert_one_restart(gateway, pid)


def test_rotation_mtime_moved_backwards(gateway: RotationGateway) -> None:
    path = gateway.connection_string
    before = path.stat()
    pid = gateway.pid(UPLINK)

    path.write_bytes(sas_string(SECONDARY))
    hour_ago_ns = before.st_mtime_ns - 3600 * 1_000_000_000
    os.utime(path, ns=(hour_ago_ns, hour_ago_ns))

    assert_one_restart(gateway, pid)


def test_rotation_identical_content_restarts_nothing(gateway: RotationGateway) -> None:
    path = gateway.connection_string
    before = path.stat()
    pid = gateway.pid(UPLINK)

    path.write_bytes(path.read_bytes())
    later_ns = before.st_mtime_ns + 5 * 1_000_000_000
    os.utime(path, ns=(later_ns, later_ns))
    counters = gateway.settle()

    assert counters["restarts"] == 0
    assert counters["changes"] == 0
    assert gateway.connects() == 1
    assert gateway.pid(UPLINK) == pid


def test_rotation_written_in_steps(gateway: RotationGateway) -> None:
    path = gateway.connection_string
    pid = gateway.pid(UPLINK)
    content = sas_string(SECONDARY)
    parts = [content[:20], content[20:50], content[50:]]

    # Each pause is longer than the settle time, so the watcher sees the partial file stay
    # the same and tries to parse it. A partial string does not parse, and is not reported.
    with path.open("wb") as stream:
        for part in parts:
            stream.write(part)
            stream.flush()
            time.sleep(0.4)

    assert path.read_bytes() == content
    assert_one_restart(gateway, pid)


@pytest.mark.parametrize("gateway", [True], indirect=True, ids=["x509"])
def test_rotation_burst_of_x509_files(gateway: RotationGateway) -> None:
    pid = gateway.pid(UPLINK)
    new_cert, new_key = gateway.issue_device_certificate(gateway.base / "next")

    # The three files of a rotation, one after the other, as an installer writes them: the
    # certificate first, so that for a moment it does not match the key.
    gateway.client_cert.write_bytes(new_cert.read_bytes())
    gateway.client_key.write_bytes(new_key.read_bytes())
    gateway.connection_string.write_text(f"DeviceId={X509_DEVICE};HostName=localhost;"
                                         "x509=true\n")

    assert_one_restart(gateway, pid)
    # The one restart applied all three files.
    record = json.loads((gateway.base / "state" / "credentials-applied.json").read_text())
    for path in (gateway.connection_string, gateway.client_cert, gateway.client_key):
        assert record["files"][str(path)] == hashlib.sha256(path.read_bytes()).hexdigest()


def assert_connection_kept(gateway: RotationGateway, pid: int, file: Path, reason: str) -> None:
    """Check that one ERROR names file and reason, and that the first connection stays up."""
    wait_until(lambda: gateway.watcher_lines("credentials_invalid"), 10,
               "the watcher's credentials_invalid line")

    counters = gateway.settle()

    errors = gateway.watcher_lines("credentials_invalid")
    assert len(errors) == 1
    assert " ERROR " in errors[0]
    assert f"file={file}" in errors[0]
    assert reason in errors[0]
    assert counters["restarts"] == 0
    assert gateway.pid(UPLINK) == pid
    assert gateway.connects() == 1
    assert f"disconnected client_id={gateway.device}" not in gateway.hub.log()


def test_rotation_unreadable_file_keeps_connection(gateway: RotationGateway) -> None:
    path = gateway.connection_string
    pid = gateway.pid(UPLINK)

    path.write_bytes(sas_string(SECONDARY))
    path.chmod(0o000)

    assert_connection_kept(gateway, pid, path, "mode 0000")

    # Fixing the mode alone leaves the content as it was, and is still a change.
    path.chmod(0o600)
    assert_one_restart(gateway, pid, errors=1)


def test_rotation_malformed_file_keeps_connection(gateway: RotationGateway) -> None:
    path = gateway.connection_string
    pid = gateway.pid(UPLINK)

    path.write_bytes(b"HostName=localhost;DeviceId=gw-rotate;SharedAccessKey\n")

    assert_connection_kept(gateway, pid, path, "reason=")


def test_rotation_ca_without_root_keeps_connection(
    gateway: RotationGateway, certs: Path
) -> None:
    pid = gateway.pid(UPLINK)

    # The server certificate alone: a certificate, but not a root that chains can end at.
    shutil.copy(certs / "server.pem", gateway.ca_file)

    assert_connection_kept(gateway, pid, gateway.ca_file, "no root CA")


class UplinkCounter(threading.Thread):
    """Samples the process table and records the most uplinks of this gateway seen at once."""

    def __init__(self, config: Path) -> None:
        super().__init__(name="uplink-counter", daemon=True)
        self.marker = f"processes.uplink\0--config\0{config}".encode()
        self.max_seen = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def count(self) -> int:
        found = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue  # the process has exited
            if self.marker in cmdline:
                found += 1
        return found

    def run(self) -> None:
        while not self._stop_event.wait(0.01):
            self.max_seen = max(self.max_seen, self.count())
            self.samples += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


def test_rotation_during_slow_connect_runs_one_uplink(gateway: RotationGateway) -> None:
    counter = UplinkCounter(gateway.config)
    counter.start()
    try:
        gateway.hub.set_faults(connack_delay_s=3.0)
        pid = gateway.pid(UPLINK)

        # The first rotation restarts the uplink, whose new connection waits 3 s for its
        # CONNACK. Two more rotations arrive during that wait.
        gateway.connection_string.write_bytes(sas_string(SECONDARY))
        gateway.wait_restarts(1)
        gateway.hub.wait_for_log("connack_delayed client_id=gw-rotate", 10)
        gateway.connection_string.write_bytes(sas_string(PRIMARY))
        wait_until(lambda: gateway.watcher_lines("uplink_restart_deferred"), 10,
                   "the watcher to defer the restart")
        # The same key without the final line break: other content, so another rotation.
        gateway.connection_string.write_bytes(sas_string(PRIMARY).rstrip(b"\n"))

        gateway.counters(lambda counters: counters["restarts"] >= 2, "the deferred restart",
                         timeout_s=30)
        wait_until(lambda: gateway.state(UPLINK) == "RUNNING", 15, "the uplink RUNNING")
        counters = gateway.settle()
    finally:
        counter.stop()

    assert counter.samples > 100
    assert counter.max_seen == 1
    assert counters["restarts"] == 2
    assert counters["deferred"] >= 1
    assert gateway.pid(UPLINK) != pid
    assert gateway.state(WATCHER) == "RUNNING"
    resumed = gateway.watcher_lines("uplink_restart_resumed")
    assert resumed
    deferred = gateway.watcher_lines("uplink_restart_deferred")
    assert "no CONNACK" in deferred[0]
    for program in ("uplink", "credential_watcher"):
        assert "Traceback" not in gateway.log(program)
