"""The plcbridge command, run through its installed entry point as an operator would."""

from __future__ import annotations

import json
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.tap import format_human
from common.config import load_config
from common.last_good import save_last_good
from tests.gateway_files import (
    REPO,
    GatewayFiles,
    make_runtime_dir,
    removed_afterwards,
    sas_token_string,
    stop_process,
    write_gateway,
)
from tests.support.waiting import wait_until

PLCBRIDGE = Path(sys.executable).parent / "plcbridge"
TYPO = "colour = 'red'\n"  # appended to [credentials], the last table of the file
PROGRAMS = ("plcbridge:buffer", "plcbridge:plc_reader", "plcbridge:uplink",
            "plcbridge:credential_watcher")


def plcbridge(*args: str, timeout_s: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PLCBRIDGE), *args], capture_output=True, text=True,
                          timeout=timeout_s, check=False)


@pytest.fixture
def files(tmp_path: Path) -> Iterator[GatewayFiles]:
    runtime = make_runtime_dir()
    with removed_afterwards(runtime):
        yield write_gateway(tmp_path, runtime)


def assert_clean_failure(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    """Check exit code 2, one message on stderr with every expected part, and no traceback."""
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    for part in expected:
        assert part in result.stderr


def test_cli_help_lists_exit_codes() -> None:
    result = plcbridge("--help")

    assert result.returncode == 0
    for line in ("0  success", "2  invalid configuration", "3  check-credentials"):
        assert line in result.stdout
    for command in ("run", "tap", "check-config", "check-credentials", "ctl"):
        assert command in result.stdout


def test_check_config_valid_prints_summary(files: GatewayFiles) -> None:
    result = plcbridge("check-config", "--config", str(files.config))

    assert result.returncode == 0, result.stderr
    assert f"configuration {files.config} is valid" in result.stdout
    assert "tags: 1 in 1 groups: fast (100 ms, 1 tags)" in result.stdout
    assert "uplink: azure, 127.0.0.1:" in result.stdout
    assert "credentials: device key" in result.stdout
    assert "SAS expiry: valid" in result.stdout
    for secret in files.secrets:
        assert secret not in result.stdout + result.stderr


def test_check_config_unknown_key(files: GatewayFiles) -> None:
    with files.config.open("a") as config:
        config.write("colour = 'red'\n")

    result = plcbridge("check-config", "--config", str(files.config))

    assert_clean_failure(result, str(files.config), "unknown key credentials.colour")


def test_check_config_wrong_type(files: GatewayFiles) -> None:
    with files.config.open("a") as config:
        config.write("sas_warning_days = 'soon'\n")

    result = plcbridge("check-config", "--config", str(files.config))

    assert_clean_failure(result, str(files.config), "credentials.sas_warning_days", "'soon'",
                         "expected a number")


def test_check_config_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"

    result = plcbridge("check-config", "--config", str(missing))

    assert_clean_failure(result, f"{missing}: configuration file not found")


def test_check_config_missing_connection_string(files: GatewayFiles) -> None:
    files.connection_string.unlink()

    result = plcbridge("check-config", "--config", str(files.config))

    assert_clean_failure(result, str(files.connection_string), "not found")


def test_check_config_unreadable_ca(files: GatewayFiles) -> None:
    # Tests run as root, and chmod 000 does not stop root from reading a file, so a folder
    # in the CA file's place is what makes it unreadable here.
    files.ca.unlink()
    files.ca.mkdir()

    result = plcbridge("check-config", "--config", str(files.config))

    assert_clean_failure(result, f"{files.ca}: CA file is a folder; expected a file")


def test_check_config_invalid_ca_pem(files: GatewayFiles) -> None:
    files.ca.write_text(
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
    )

    result = plcbridge("check-config", "--config", str(files.config))

    assert_clean_failure(result, f"{files.ca}: CA file contains an invalid PEM certificate")


@pytest.mark.parametrize(
    ("expiry_in_s", "state", "exit_code"),
    [(30 * 86400, "valid", 0), (2 * 86400, "warning", 0), (-3600, "expired", 3)],
)
def test_check_credentials_sas_state(files: GatewayFiles, expiry_in_s: int, state: str,
                                     exit_code: int) -> None:
    expiry_s = int(time.time()) + expiry_in_s
    files.connection_string.write_text(sas_token_string(files.secrets, expiry_s) + "\n")

    result = plcbridge("check-credentials", "--config", str(files.config))

    assert result.returncode == exit_code, result
    assert "scheme: SAS token" in result.stdout
    assert f"SAS expiry: {state}\n" in result.stdout
    assert f"se={expiry_s} (" in result.stdout
    assert "now=" in result.stdout
    assert "Z)" in result.stdout
    for secret in files.secrets:
        assert secret not in result.stdout + result.stderr


def test_check_credentials_invalid_file(files: GatewayFiles) -> None:
    files.connection_string.write_text("HostName=h\n")

    result = plcbridge("check-credentials", "--config", str(files.config))

    assert_clean_failure(result, str(files.connection_string), "missing key 'DeviceId'")


def test_tap_receives_watcher_counters(files: GatewayFiles, tmp_path: Path) -> None:
    log = tmp_path / "watcher.log"
    watcher = subprocess.Popen(
        [sys.executable, "-m", "processes.credential_watcher", "--config", str(files.config)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO,
    )
    try:
        wait_until(lambda: "credentials_loaded" in log.read_text(), 10, "the watcher to start")

        result = plcbridge("tap", "--config", str(files.config), "credential_watcher",
                           "--json", "--count", "2", "--timeout-s", "10")
    finally:
        stop_process(watcher)

    assert result.returncode == 0, result.stderr
    messages = [json.loads(line) for line in result.stdout.splitlines()]
    counters = [message for message in messages if message["kind"] == "counters"]
    assert counters
    assert counters[0]["process"] == "credential_watcher"
    assert counters[0]["checks"] > 0
    assert set(counters[0]) >= {"ts_ms", "checks", "changes", "restarts", "invalid"}


def test_tap_count_not_reached(files: GatewayFiles) -> None:
    result = plcbridge("tap", "--config", str(files.config), "buffer", "--count", "1",
                       "--timeout-s", "0.3")

    assert result.returncode == 1
    assert "received 0 of 1 messages in 0.3 s" in result.stderr
    assert "no tap socket at" in result.stderr


def test_tap_ctrl_c_exits_zero(files: GatewayFiles, tmp_path: Path) -> None:
    stderr_path = tmp_path / "tap.err"
    with stderr_path.open("wb") as stderr:
        tap = subprocess.Popen([str(PLCBRIDGE), "tap", "--config", str(files.config), "uplink"],
                               stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_until(lambda: "Waiting for it." in stderr_path.read_text(), 10, "tap to subscribe")
        tap.send_signal(signal.SIGINT)
        tap.wait(10)
    finally:
        stop_process(tap)

    assert tap.returncode == 0
    assert "Traceback" not in stderr_path.read_text()


def test_tap_unknown_process_rejected(files: GatewayFiles) -> None:
    result = plcbridge("tap", "--config", str(files.config), "reader")

    assert result.returncode == 2
    assert "unknown process 'reader'" in result.stderr


def test_tap_human_format() -> None:
    message = {"ts_ms": 1_700_000_000_123, "process": "uplink", "kind": "link_down",
               "reason": "connection refused", "attempt": 3, "files": ["a", "b"]}

    line = format_human(message)

    assert line.endswith(' uplink link_down reason="connection refused" attempt=3 files=a,b')
    assert ".123 " in line


@pytest.fixture
def loopback_listener() -> Iterator[int]:
    """A TCP port that accepts nothing, for the PLC and the uplink of a launched gateway."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def test_run_starts_supervisord_with_four_programs(tmp_path: Path, loopback_listener: int) -> None:
    runtime = make_runtime_dir() / "run"
    gateway = write_gateway(tmp_path, runtime, loopback_port=loopback_listener)
    config = str(gateway.config)

    # From another folder, so that the default supervisord.conf must be found by path.
    launcher = subprocess.Popen([str(PLCBRIDGE), "run", "--config", config], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with removed_afterwards(runtime.parent):
        try:
            # The other programs may still be FATAL or BACKOFF; only the listing matters here.
            status = wait_until(
                lambda: _status_listing(config), 20, "supervisord to list the four programs"
            )
            supervisord_pid = int((runtime / "supervisord.pid").read_text())
            runtime_mode = stat.S_IMODE(runtime.stat().st_mode)
            second_run = plcbridge("run", "--config", config)

            # A mistake saved in the file must not hide the running gateway from ctl.
            good_text = gateway.config.read_text()
            with gateway.config.open("a") as stream:
                stream.write(TYPO)
            status_after_typo = plcbridge("ctl", "--config", config, "status")
        finally:
            stop_process(launcher, timeout_s=20)

    assert all(program in str(status) for program in PROGRAMS)
    copy = tmp_path / ".config.toml.last-good"
    assert copy.read_text() == good_text
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    assert all(program in status_after_typo.stdout for program in PROGRAMS)
    assert f"plcbridge ctl: {config}: unknown key credentials.colour" in status_after_typo.stderr
    assert f"warning: using the last good configuration {copy} instead" in (
        status_after_typo.stderr
    )
    assert supervisord_pid == launcher.pid  # run replaced itself with supervisord
    assert launcher.returncode == 0
    assert runtime_mode == 0o700
    assert second_run.returncode == 1
    assert f"a supervisord is already running on {runtime}/supervisord.sock" in second_run.stderr
    assert (tmp_path / "state").is_dir()
    assert (tmp_path / "log" / "supervisord.log").is_file()


def _status_listing(config: str) -> str | None:
    result = plcbridge("ctl", "--config", config, "status")
    listing = result.stdout
    return listing if all(program in listing for program in PROGRAMS) else None


def test_run_invalid_config(files: GatewayFiles) -> None:
    with files.config.open("a") as config:
        config.write("sas_warning_days = -1\n")

    result = plcbridge("run", "--config", str(files.config))

    assert_clean_failure(result, "credentials.sas_warning_days: -1")
    assert not (files.runtime_dir / "supervisord.sock").exists()


def test_run_missing_supervisord_conf(files: GatewayFiles, tmp_path: Path) -> None:
    result = plcbridge("run", "--config", str(files.config),
                       "--supervisord-conf", str(tmp_path / "none.conf"))

    assert result.returncode == 1
    assert "supervisord configuration not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_ctl_without_supervisord(files: GatewayFiles) -> None:
    result = plcbridge("ctl", "--config", str(files.config), "status")

    assert result.returncode != 0
    assert str(files.runtime_dir / "supervisord.sock") in result.stdout + result.stderr


def test_ctl_bad_config_without_copy(files: GatewayFiles) -> None:
    with files.config.open("a") as config:
        config.write(TYPO)

    result = plcbridge("ctl", "--config", str(files.config), "status")

    assert_clean_failure(result, f"{files.config}: unknown key credentials.colour")
    assert "last good" not in result.stderr


def test_tap_bad_config_uses_last_good(files: GatewayFiles) -> None:
    save_last_good(load_config(files.config))
    with files.config.open("a") as config:
        config.write(TYPO)

    result = plcbridge("tap", "--config", str(files.config), "buffer", "--count", "1",
                       "--timeout-s", "0.3")

    assert result.returncode == 1
    assert f"plcbridge tap: {files.config}: unknown key credentials.colour" in result.stderr
    assert "using the last good configuration" in result.stderr
    assert "received 0 of 1 messages in 0.3 s" in result.stderr


def test_run_and_checks_ignore_last_good(files: GatewayFiles) -> None:
    save_last_good(load_config(files.config))
    with files.config.open("a") as config:
        config.write(TYPO)

    for command in ("run", "check-config", "check-credentials"):
        result = plcbridge(command, "--config", str(files.config))

        assert_clean_failure(result, f"{files.config}: unknown key credentials.colour")
        assert "last good" not in result.stderr


def start_watcher(files: GatewayFiles, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "processes.credential_watcher", "--config", str(files.config)],
            stdout=output, stderr=subprocess.STDOUT, cwd=REPO,
        )


def test_process_restart_after_typo_runs_last_good(files: GatewayFiles, tmp_path: Path) -> None:
    log = tmp_path / "watcher.log"
    copy = tmp_path / ".config.toml.last-good"
    good_text = files.config.read_text()
    watcher = start_watcher(files, log)
    try:
        wait_until(lambda: "credentials_loaded" in log.read_text(), 10, "the watcher to start")
        stop_process(watcher)
        first_exit = watcher.returncode

        with files.config.open("a") as config:
            config.write(TYPO)
        watcher = start_watcher(files, log)
        wait_until(lambda: log.read_text().count("credentials_loaded") == 2, 10,
                 "the restarted watcher to load the credentials")
        running_after_typo = watcher.poll() is None
    finally:
        stop_process(watcher)

    output = log.read_text()
    rejected = [line for line in output.splitlines() if "config_rejected" in line]
    assert first_exit == 0
    assert running_after_typo
    assert watcher.returncode == 0
    assert copy.read_text() == good_text
    assert output.count("last_good_saved") == 1
    assert len(rejected) == 1
    assert " ERROR " in rejected[0]
    assert f"{files.config}: unknown key credentials.colour" in rejected[0]
    assert f"runs on the last good configuration {copy}" in rejected[0]


def test_process_bad_config_without_copy_exits_2(files: GatewayFiles) -> None:
    with files.config.open("a") as config:
        config.write(TYPO)

    result = subprocess.run(
        [sys.executable, "-m", "processes.credential_watcher", "--config", str(files.config)],
        capture_output=True, text=True, timeout=20, cwd=REPO, check=False,
    )

    assert_clean_failure(result, f"plcbridge credential_watcher: {files.config}: unknown key "
                                 "credentials.colour")
    assert not (files.root / ".config.toml.last-good").exists()
