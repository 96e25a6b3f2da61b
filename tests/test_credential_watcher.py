"""The credential watcher against a real supervisord that runs a stand-in uplink program."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.supervisor_rpc import SupervisorClient, SupervisorUnavailableError
from tests.gateway_files import (
    DEVICE,
    REPO,
    GatewayFiles,
    device_key_string,
    make_runtime_dir,
    removed_afterwards,
    sas_token_string,
    stop_process,
    write_client_pair,
    write_gateway,
)
from tests.support.supervisord_conf import SUPERVISORD_HEAD
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

UPLINK = "plcbridge:uplink"
WATCHER = "plcbridge:credential_watcher"
SUPERVISORD = Path(sys.executable).parent / "supervisord"

# The stand-in uplink prints its pid and sleeps; a restart gives it a new pid.
STAND_IN_UPLINK = """/bin/sh -c 'echo "pid $$"; exec sleep 3600'"""
# A stand-in that ignores SIGTERM, so that supervisord reports it STOPPING until it sends
# SIGKILL after stopwaitsecs. An ignored signal stays ignored across exec.
STUBBORN_UPLINK = """/bin/sh -c 'trap "" TERM; echo "pid $$"; exec sleep 3600'"""
SUPERVISORD_CONF = SUPERVISORD_HEAD + """

[supervisorctl]
serverurl=unix://{runtime}/supervisord.sock

[group:plcbridge]
programs={programs}

[program:uplink]
command={uplink_command}
startsecs=0
autorestart=true
stopsignal=TERM
stopwaitsecs=5
stdout_logfile={runtime}/uplink.log
"""

# The real watcher as a supervisord program, so that supervisord restarts it after a kill.
WATCHER_PROGRAM = """
[program:credential_watcher]
command={python} -m processes.credential_watcher --config {config}
directory={repo}
startsecs=0
autorestart=true
stopsignal=TERM
stopwaitsecs=5
redirect_stderr=true
stdout_logfile={log}
"""


@dataclass
class Gateway:
    files: GatewayFiles
    client: SupervisorClient
    log: Path
    supervisord: subprocess.Popen[bytes] | None = None
    watcher: subprocess.Popen[bytes] | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def uplink_pid(self) -> int:
        info = self.client.process_info(UPLINK)
        assert info["statename"] == "RUNNING", info
        pid: int = info["pid"]
        return pid

    def uplink_restarted(self, old_pid: int) -> bool:
        """Return True once the uplink runs again with another pid than old_pid."""
        info = self.client.process_info(UPLINK)
        return info["statename"] == "RUNNING" and info["pid"] != old_pid

    def watcher_restarted(self, old_pid: int) -> bool:
        """Return True once supervisord runs the watcher again with another pid than old_pid."""
        info = self.client.process_info(WATCHER)
        return info["statename"] == "RUNNING" and info["pid"] != old_pid

    @property
    def record(self) -> Path:
        return self.files.root / "state" / "credentials-applied.json"

    def recorded_files(self) -> dict[str, str | None]:
        files: dict[str, str | None] = json.loads(self.record.read_text())["files"]
        return files

    def start_supervisord(self, with_watcher: bool = False,
                          uplink_command: str = STAND_IN_UPLINK) -> None:
        """Start supervisord with the stand-in uplink and, if asked, the real watcher."""
        conf = self.files.root / "supervisord.conf"
        text = SUPERVISORD_CONF.format(runtime=self.files.runtime_dir,
                                       programs="uplink,credential_watcher" if with_watcher
                                       else "uplink", uplink_command=uplink_command)
        if with_watcher:
            text += WATCHER_PROGRAM.format(python=sys.executable, config=self.files.config,
                                           repo=REPO, log=self.log)
        conf.write_text(text)
        self.supervisord = subprocess.Popen(
            [str(SUPERVISORD), "-n", "-c", str(conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(self._uplink_running, 10, "supervisord to start the stand-in uplink")

    def start_watcher(self, ready_line: str = "credentials_loaded") -> None:
        seen = self.output().count(ready_line) if self.log.exists() else 0
        self.watcher = subprocess.Popen(
            [sys.executable, "-m", "processes.credential_watcher",
             "--config", str(self.files.config)],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, cwd=REPO,
        )
        wait_until(lambda: self.output().count(ready_line) > seen, 10,
                 f"watcher log line {ready_line!r}")

    def stop_watcher(self) -> None:
        assert self.watcher is not None
        stop_process(self.watcher)
        assert self.watcher.returncode == 0

    def _uplink_running(self) -> bool:
        try:
            return self.client.process_info(UPLINK)["statename"] == "RUNNING"
        except SupervisorUnavailableError:
            return False

    def assert_no_secret_in_output(self) -> None:
        output = self.output()
        for secret in self.files.secrets:
            assert secret not in output


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    runtime = make_runtime_dir()
    files = write_gateway(tmp_path, runtime)
    client = SupervisorClient(runtime / "supervisord.sock")
    gateway = Gateway(files, client, tmp_path / "watcher.log")
    with removed_afterwards(runtime):
        try:
            yield gateway
        finally:
            for process in (gateway.watcher, gateway.supervisord):
                if process is not None:
                    stop_process(process)


@pytest.fixture
def paired(gateway: Gateway) -> Gateway:
    """The gateway with a device certificate and key in its [credentials] section."""
    # write_gateway ends the configuration with [credentials], so the keys land there.
    with gateway.files.config.open("a") as config:
        config.write('client_cert_file = "client.pem"\nclient_key_file = "client.key"\n')
    write_client_pair(gateway.files.root / "client.pem", gateway.files.root / "client.key")
    return gateway


@pytest.fixture
def running(gateway: Gateway) -> Gateway:
    gateway.start_supervisord()
    gateway.start_watcher()
    return gateway


def rewrite(path: Path, text: str) -> None:
    """Write text and move the mtime a second on, as a slow copy from another host would."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


def test_watcher_new_connection_string_restarts_uplink(running: Gateway) -> None:
    pid = running.uplink_pid()

    rewrite(running.files.connection_string, device_key_string(running.files.secrets) + "\n")

    wait_until(lambda: running.uplink_restarted(pid), 10, "the uplink to get a new pid")
    wait_until(lambda: "uplink_restarted" in running.output(), 5, "the uplink_restarted line")
    assert f"pid_before={pid}" in running.output()
    running.assert_no_secret_in_output()


def test_watcher_identical_rewrite_restarts_nothing(running: Gateway) -> None:
    pid = running.uplink_pid()
    path = running.files.connection_string

    rewrite(path, path.read_text())

    wait_until(lambda: f"file_touched content unchanged file={path}" in running.output(), 5,
             "the watcher to notice the new mtime")
    assert running.uplink_pid() == pid
    assert "credentials_changed" not in running.output()
    assert "uplink_restarted" not in running.output()


def test_watcher_malformed_string_logged_then_fixed(running: Gateway) -> None:
    pid = running.uplink_pid()
    path = running.files.connection_string

    rewrite(path, "HostName=hub.example.net;DeviceId=gw;SharedAccessKey=\n")
    wait_until(lambda: "credentials_invalid" in running.output(), 5, "the credentials_invalid line")
    error_lines = [line for line in running.output().splitlines() if "credentials_invalid" in line]
    assert len(error_lines) == 1
    assert " ERROR " in error_lines[0]
    assert f"file={path}" in error_lines[0]
    assert running.uplink_pid() == pid

    rewrite(path, device_key_string(running.files.secrets) + "\n")
    wait_until(lambda: running.uplink_restarted(pid), 10, "the uplink to get a new pid")
    assert len([line for line in running.output().splitlines()
                if "credentials_invalid" in line]) == 1
    running.assert_no_secret_in_output()


def test_watcher_expired_token_keeps_uplink(running: Gateway) -> None:
    pid = running.uplink_pid()
    path = running.files.connection_string
    expired_s = int(time.time()) - 3600

    rewrite(path, sas_token_string(running.files.secrets, expired_s) + "\n")
    wait_until(lambda: "credentials_invalid" in running.output(), 5, "the credentials_invalid line")
    error_lines = [line for line in running.output().splitlines() if "credentials_invalid" in line]
    assert len(error_lines) == 1
    assert " ERROR " in error_lines[0]
    assert f"se={expired_s}" in error_lines[0]
    assert running.uplink_pid() == pid

    rewrite(path, sas_token_string(running.files.secrets, int(time.time()) + 86400 * 30) + "\n")
    wait_until(lambda: running.uplink_restarted(pid), 10, "the uplink to get a new pid")
    running.assert_no_secret_in_output()


def test_watcher_pasted_key_not_logged(running: Gateway) -> None:
    pid = running.uplink_pid()
    bare_key = device_key_string(running.files.secrets).split("SharedAccessKey=")[1]

    # A key pasted without its name makes the key an unknown key name in the parse error.
    rewrite(running.files.connection_string, f"HostName=h;DeviceId=d;{bare_key}\n")

    wait_until(lambda: "credentials_invalid" in running.output(), 5, "the credentials_invalid line")
    assert "not shown" in running.output()
    assert running.uplink_pid() == pid
    running.assert_no_secret_in_output()


def test_watcher_invalid_ca_keeps_uplink(running: Gateway) -> None:
    pid = running.uplink_pid()
    ca = running.files.ca

    rewrite(ca, "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")

    wait_until(lambda: "credentials_invalid" in running.output(), 5, "the credentials_invalid line")
    assert f"file={ca}" in running.output()
    assert running.uplink_pid() == pid


def test_watcher_sas_token_expiry_logged(gateway: Gateway) -> None:
    expiry_s = int(time.time()) + 2 * 86400
    gateway.files.connection_string.write_text(
        sas_token_string(gateway.files.secrets, expiry_s) + "\n"
    )
    gateway.start_supervisord()

    gateway.start_watcher(ready_line="sas_expiry")

    lines = [line for line in gateway.output().splitlines() if "sas_expiry" in line]
    assert " WARNING " in lines[0]
    assert "might be outdated" in lines[0]
    assert f"se={expiry_s}" in lines[0]
    assert "now=" in lines[0]
    gateway.assert_no_secret_in_output()


def test_watcher_device_key_logs_minted_ttl(running: Gateway) -> None:
    lines = [line for line in running.output().splitlines() if "sas_expiry" in line]

    assert " INFO " in lines[0]
    assert "uplink.sas_ttl_s=3600" in lines[0]


def test_watcher_invalid_at_start_keeps_watching(gateway: Gateway) -> None:
    gateway.files.connection_string.write_text("HostName=h\n")
    gateway.start_supervisord()
    pid = gateway.uplink_pid()

    gateway.start_watcher(ready_line="credentials_invalid")
    rewrite(gateway.files.connection_string, device_key_string(gateway.files.secrets) + "\n")

    wait_until(lambda: gateway.uplink_restarted(pid), 10, "the uplink to get a new pid")
    assert gateway.watcher is not None and gateway.watcher.poll() is None


def test_watcher_retries_until_supervisord_is_up(gateway: Gateway) -> None:
    gateway.start_watcher()
    rewrite(gateway.files.connection_string, device_key_string(gateway.files.secrets) + "\n")
    wait_until(lambda: "restart_failed" in gateway.output(), 5, "the restart_failed line")
    assert "not found; is supervisord running?" in gateway.output()

    gateway.start_supervisord()

    wait_until(lambda: "uplink_restarted" in gateway.output(), 10, "the uplink_restarted line")


def test_watcher_stopped_uplink_stays_stopped(running: Gateway) -> None:
    conf = running.files.root / "supervisord.conf"
    subprocess.run(
        [str(SUPERVISORD.parent / "supervisorctl"), "-c", str(conf), "stop", UPLINK],
        check=True, capture_output=True, timeout=10,
    )

    rewrite(running.files.connection_string, device_key_string(running.files.secrets) + "\n")

    wait_until(lambda: "uplink_not_restarted" in running.output(), 5, "uplink_not_restarted")
    assert running.client.process_info(UPLINK)["statename"] == "STOPPED"


def test_watcher_unknown_program_logged(gateway: Gateway) -> None:
    with gateway.files.config.open("a") as config:
        config.write("\n[supervisor]\nuplink_program = \"uplnk\"\n")
    gateway.start_supervisord()
    gateway.start_watcher()
    pid = gateway.uplink_pid()

    rewrite(gateway.files.connection_string, device_key_string(gateway.files.secrets) + "\n")

    wait_until(lambda: "restart_failed" in gateway.output(), 5, "the restart_failed line")
    assert "BAD_NAME: plcbridge:uplnk" in gateway.output()
    assert "check supervisor.group and supervisor.uplink_program" in gateway.output()
    assert gateway.uplink_pid() == pid


def test_watcher_expired_client_certificate_warned(paired: Gateway) -> None:
    write_client_pair(paired.files.root / "client.pem", paired.files.root / "client.key",
                      expired=True)

    paired.start_watcher(ready_line="client_certificate_expired")

    output = paired.output()
    assert f"client_certificate=CN={DEVICE}" in output
    assert "not_after=2021-06-30T12:00:00Z" in output
    warnings = [line for line in output.splitlines() if "client_certificate_expired" in line]
    assert " WARNING " in warnings[0]


def test_watcher_imports_no_heavy_modules(paired: Gateway) -> None:
    # Validate a set with a client pair and call a supervisord that is not there, so that
    # every code path of a check runs, then list what the watcher process would hold.
    # cryptography may load only for the client certificate, never at import.
    script = f"""
import sys
from pathlib import Path
from common.config import load_config
from common.credential_files import validate_credential_files
from common.supervisor_rpc import SupervisorClient, SupervisorUnavailableError
import processes.credential_watcher

at_import = sorted(name for name in sys.modules if name.startswith("cryptography"))
validate_credential_files(load_config({str(paired.files.config)!r}).credentials)
try:
    SupervisorClient(Path({str(paired.files.runtime_dir / "none.sock")!r})).process_info("x")
except SupervisorUnavailableError:
    pass
heavy = ("importlib.metadata", "supervisor", "pymodbus", "paho", "lmdb")
print(at_import, sorted(name for name in sys.modules if name.startswith(heavy)))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=30, check=True)

    assert result.stdout.strip() == "[] []"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def set_check_interval(files: GatewayFiles, interval_s: float) -> None:
    text = files.config.read_text()
    assert "check_interval_s = 0.1\n" in text
    files.config.write_text(text.replace("check_interval_s = 0.1\n",
                                         f"check_interval_s = {interval_s}\n"))


def kill_watcher(gateway: Gateway) -> int:
    """SIGKILL the supervised watcher and return its pid."""
    pid: int = gateway.client.process_info(WATCHER)["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


def test_watcher_first_start_writes_private_record(running: Gateway) -> None:
    files = running.files

    wait_until(running.record.exists, 5, "the applied record")

    assert stat.S_IMODE(running.record.stat().st_mode) == 0o600
    assert running.recorded_files() == {
        str(files.connection_string): sha256_of(files.connection_string),
        str(files.ca): sha256_of(files.ca),
    }
    assert "applied_record_created" in running.output()
    text = running.record.read_text()
    for secret in files.secrets:
        assert secret not in text


def test_watcher_killed_before_acting_applies_rotation(gateway: Gateway) -> None:
    # Two checks 2 s apart must see the new string before the watcher acts on it, so a kill
    # right after the write lands before the restart.
    set_check_interval(gateway.files, 2.0)
    gateway.start_supervisord(with_watcher=True)
    wait_until(lambda: "applied_record_created" in gateway.output(), 10, "the first record")
    pid = gateway.uplink_pid()
    path = gateway.files.connection_string

    rewrite(path, device_key_string(gateway.files.secrets) + "\n")
    watcher_pid = kill_watcher(gateway)

    assert gateway.uplink_pid() == pid
    assert "uplink_restarted" not in gateway.output()
    wait_until(lambda: gateway.watcher_restarted(watcher_pid), 10, "a new watcher")
    wait_until(lambda: gateway.uplink_restarted(pid), 10, "the uplink to get a new pid")
    wait_until(lambda: gateway.recorded_files()[str(path)] == sha256_of(path), 5,
             "the record of the new string")
    output = gateway.output()
    assert "uplink_runs_recorded_files" in output
    assert f"credentials_changed files={path}" in output
    gateway.assert_no_secret_in_output()


def test_watcher_restart_without_change_restarts_nothing(gateway: Gateway) -> None:
    gateway.start_supervisord(with_watcher=True)
    wait_until(lambda: "applied_record_created" in gateway.output(), 10, "the first record")
    pid = gateway.uplink_pid()
    path = gateway.files.connection_string

    watcher_pid = kill_watcher(gateway)
    wait_until(lambda: gateway.watcher_restarted(watcher_pid), 10, "a new watcher")
    wait_until(lambda: "applied_record_matches" in gateway.output(), 10, "the record check")
    # A touch that the new watcher reports proves that its checks run.
    rewrite(path, path.read_text())
    wait_until(lambda: f"file_touched content unchanged file={path}" in gateway.output(), 15,
             "the new watcher to notice the new mtime")

    assert gateway.uplink_pid() == pid
    assert "credentials_changed" not in gateway.output()
    assert "uplink_restarted" not in gateway.output()


def test_watcher_uplink_started_after_rotation_not_restarted(gateway: Gateway) -> None:
    gateway.start_supervisord()
    gateway.start_watcher()
    gateway.stop_watcher()
    path = gateway.files.connection_string
    rewrite(path, device_key_string(gateway.files.secrets) + "\n")

    # supervisord reports the start in whole seconds, and the watcher wants the uplink's start
    # a second clear of the file's last change.
    changed_s = path.stat().st_ctime
    wait_until(lambda: time.time() >= changed_s + 2.0, 5, "two seconds after the rotation")
    pid = gateway.client.restart(UPLINK).pid_after
    gateway.start_watcher(ready_line="uplink_runs_current_files")

    wait_until(lambda: gateway.recorded_files()[str(path)] == sha256_of(path), 5,
             "the record of the new string")
    assert gateway.uplink_pid() == pid
    assert "uplink_restarted" not in gateway.output()


def test_watcher_rotation_after_uplink_start_restarts(gateway: Gateway) -> None:
    gateway.start_supervisord()
    gateway.start_watcher()
    gateway.stop_watcher()

    # The uplink starts after the record was written but before the rotation, so it still
    # runs with the recorded string.
    written_s = gateway.record.stat().st_mtime
    wait_until(lambda: time.time() >= written_s + 1.5, 5, "a second after the record")
    pid = gateway.client.restart(UPLINK).pid_after
    rewrite(gateway.files.connection_string, device_key_string(gateway.files.secrets) + "\n")
    gateway.start_watcher(ready_line="uplink_runs_recorded_files")

    wait_until(lambda: gateway.uplink_restarted(pid), 10, "the uplink to get a new pid")


@pytest.mark.parametrize("content", [
    pytest.param(b'{"version": 1, "files": {', id="truncated"),
    pytest.param(b"\xff\xfe", id="not_utf8"),
    pytest.param(b'{"version": 1, "files": {"/x": "abc"}}', id="short_digest"),
    pytest.param(b'{"files": {}}', id="no_version"),
])
def test_watcher_corrupt_record_warned_and_replaced(gateway: Gateway, content: bytes) -> None:
    gateway.record.parent.mkdir()
    gateway.record.write_bytes(content)

    gateway.start_watcher()

    output = gateway.output()
    warnings = [line for line in output.splitlines() if "applied_record_invalid" in line]
    assert len(warnings) == 1
    assert " WARNING " in warnings[0]
    assert f"file={gateway.record}" in warnings[0]
    assert "applied_record_created" in output
    assert gateway.recorded_files()[str(gateway.files.ca)] == sha256_of(gateway.files.ca)
    # A set that the watcher takes as changed is logged before credentials_loaded.
    assert "credentials_changed" not in output


def test_watcher_far_future_se_keeps_uplink(running: Gateway) -> None:
    pid = running.uplink_pid()
    path = running.files.connection_string

    rewrite(path, sas_token_string(running.files.secrets, 99_999_999_999_999) + "\n")

    wait_until(lambda: "credentials_invalid" in running.output(), 5, "the credentials_invalid line")
    output = running.output()
    assert "se out of range (14 digits)" in output
    assert "99999999999999" not in output
    assert "Traceback" not in output
    assert running.uplink_pid() == pid

    rewrite(path, sas_token_string(running.files.secrets, int(time.time()) + 86400 * 30) + "\n")
    wait_until(lambda: running.uplink_restarted(pid), 10, "the uplink to get a new pid")


def test_watcher_fifo_credential_file_keeps_watching(running: Gateway) -> None:
    pid = running.uplink_pid()
    path = running.files.connection_string

    path.unlink()
    os.mkfifo(path)

    wait_until(lambda: "credentials_invalid" in running.output(), 5, "the credentials_invalid line")
    assert "not a regular file (a FIFO)" in running.output()
    assert running.uplink_pid() == pid

    # The watcher is not blocked in the FIFO, so it sees the good file.
    path.unlink()
    path.write_text(device_key_string(running.files.secrets) + "\n")
    wait_until(lambda: running.uplink_restarted(pid), 10, "the uplink to get a new pid")


def test_watcher_expired_pair_keeps_uplink(paired: Gateway) -> None:
    paired.start_supervisord()
    paired.start_watcher()
    pid = paired.uplink_pid()
    cert_path = paired.files.root / "client.pem"
    key_path = paired.files.root / "client.key"

    write_client_pair(cert_path, key_path, expired=True)

    # The watcher may first see the new certificate with the old key, a mismatch, so wait
    # for the line about the complete pair.
    expired = "new client certificate has expired while the running one is valid"
    wait_until(lambda: expired in paired.output(), 5, "the credentials_invalid line")
    errors = [line for line in paired.output().splitlines() if expired in line]
    assert " ERROR " in errors[0]
    assert f"files={cert_path},{key_path}" in errors[0]
    assert paired.uplink_pid() == pid
    assert "uplink_restarted" not in paired.output()


def test_watcher_defers_restart_while_uplink_stops(gateway: Gateway) -> None:
    gateway.start_supervisord(uplink_command=STUBBORN_UPLINK)
    gateway.start_watcher()
    first_pid = gateway.uplink_pid()

    # An operator's restart, which supervisord runs for stopwaitsecs (5 s) in STOPPING.
    operator = threading.Thread(target=gateway.client.restart, args=(UPLINK,), daemon=True)
    operator.start()
    wait_until(lambda: gateway.client.process_info(UPLINK)["statename"] == "STOPPING", 5,
               "the uplink STOPPING")
    rewrite(gateway.files.connection_string, device_key_string(gateway.files.secrets) + "\n")
    wait_until(lambda: "uplink_restart_deferred" in gateway.output(), 5,
               "the watcher to defer its restart")
    operator.join(20)
    assert not operator.is_alive()
    second_pid = gateway.uplink_pid()

    wait_until(lambda: "uplink_restarted" in gateway.output(), 20, "the watcher's restart")
    output = gateway.output()
    deferred = [line for line in output.splitlines() if "uplink_restart_deferred" in line]
    assert len(deferred) == 1
    assert "STOPPING" in deferred[0]
    assert "uplink_restart_resumed" in output
    restarted = [line for line in output.splitlines() if "uplink_restarted" in line]
    assert len(restarted) == 1
    assert f"pid_before={second_pid}" in restarted[0]
    assert second_pid != first_pid
    assert gateway.uplink_pid() not in (first_pid, second_pid)
