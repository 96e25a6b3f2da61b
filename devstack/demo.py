"""Run the demo in the foreground: PLC simulator, hub emulator, mosquitto and the gateway.

`make run` calls this after it has installed the project and generated the development
certificates. The gateway runs in azure mode with a device-key connection string and
connects to the hub emulator, which checks its SAS tokens as Azure IoT Hub does and passes
its traffic to mosquitto. Ctrl-C, SIGTERM or SIGHUP (a closed terminal) stops everything.
"""

from __future__ import annotations

import base64
import errno
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from common.config import load_config
from common.credentials import read_connection_string
from common.errors import CredentialError

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "devstack" / "demo.toml"
CERTS = ROOT / "var" / "dev-certs"

# The gateway connects to the hub emulator on uplink.port of demo.toml. mosquitto listens
# behind the emulator, and the emulator serves its HTTPS Date header on a port of its own.
BROKER_PORT = 18884
DATE_PORT = 18443
HUB_HOST = "localhost"
# Seconds each child has to exit after SIGTERM before it is killed.
CHILD_STOP_TIMEOUT_S = 15.0

StartChild = Callable[..., subprocess.Popen[bytes]]


class StopRequested(BaseException):
    """SIGTERM or SIGHUP arrived, and the demo stops its children as it does on Ctrl-C.

    A BaseException like KeyboardInterrupt, so that no handler for Exception swallows it.
    """


def write_connection_string(path: Path, host: str) -> None:
    """Create the demo device's connection string with a fresh random key, once."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    path.write_text(f"HostName={host};DeviceId=demo-gateway;SharedAccessKey={key}\n")
    path.chmod(0o600)


def write_registry(connection_string_file: Path, registry_file: Path) -> None:
    """Register the demo device in the emulator's registry with the connection string's key."""
    try:
        connection = read_connection_string(connection_string_file)
    except CredentialError as exc:
        raise SystemExit(f"demo: {exc}; delete the file so that the demo writes a new one") from exc
    if connection.shared_access_key is None:
        raise SystemExit(
            f"demo: {connection_string_file} has no SharedAccessKey; delete it so that the "
            "demo writes a new one"
        )
    key = base64.b64encode(connection.shared_access_key).decode()
    registry_file.parent.mkdir(parents=True, exist_ok=True)
    registry_file.write_text(f'[devices."{connection.device_id}"]\nprimary_key = "{key}"\n')
    registry_file.chmod(0o600)


def hub_emulator_args(registry_file: Path, faults_file: Path, port: int) -> list[str]:
    return [
        "devstack.hub_emulator",
        "--listen", f"127.0.0.1:{port}",
        "--https-port", str(DATE_PORT),
        "--cert", str(CERTS / "server.pem"),
        "--key", str(CERTS / "server.key"),
        "--registry", str(registry_file),
        "--upstream", f"127.0.0.1:{BROKER_PORT}",
        "--upstream-ca", str(CERTS / "ca.pem"),
        "--faults", str(faults_file),
        "--hub-host", HUB_HOST,
    ]


def wait_for_ready(log_file: Path, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Wait for the hub emulator's ready line in its log; exit naming the log if it fails."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log_file.exists() and "hub_emulator ready" in log_file.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise SystemExit(f"demo: the hub emulator exited with status {process.returncode}; "
                             f"see {log_file}")
        time.sleep(0.1)
    raise SystemExit(f"demo: the hub emulator was not ready after {timeout_s:g} s; see {log_file}")


def wait_for_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"demo: nothing listens on 127.0.0.1:{port} after {timeout_s:g} s")


def check_ports_free(ports: list[int]) -> None:
    """Exit naming the port if another process, such as an old demo, listens on a fixed port."""
    for port in ports:
        with socket.socket() as probe:
            # SO_REUSEADDR ignores connections in TIME_WAIT, which do not stop a listener.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                raise SystemExit(
                    f"demo: 127.0.0.1:{port} is already in use, perhaps by a demo that is still "
                    f"running; find the process with: ss -ltnp 'sport = :{port}'"
                ) from exc


def _raise_stop_requested(signal_number: int, _frame: FrameType | None) -> None:
    # Python turns SIGINT into KeyboardInterrupt the same way. Raising here also ends a
    # start-up wait at once, which a flag checked by the main loop would not.
    raise StopRequested(signal.Signals(signal_number).name)


def supervise(start_all: Callable[[StartChild], None]) -> int:
    """Run the children that start_all starts until one exits or a stop arrives; stop all.

    Return 1 when a child exited by itself, and 0 after Ctrl-C, SIGTERM or SIGHUP.
    """
    children: list[subprocess.Popen[bytes]] = []

    def start(*args: str, log_file: Path | None = None) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", *args]
        if log_file is None:
            child = subprocess.Popen(command, cwd=ROOT)
        else:
            with log_file.open("wb") as log:
                child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        children.append(child)
        return child

    for signal_number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signal_number, _raise_stop_requested)
    try:
        start_all(start)
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        return 1
    except (KeyboardInterrupt, StopRequested):
        return 0
    finally:
        # A second signal must not cut the cleanup short and leave children behind.
        for signal_number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signal_number, signal.SIG_IGN)
        stop_children(children)


def stop_children(children: list[subprocess.Popen[bytes]]) -> None:
    """Send SIGTERM to every child that runs, in reverse start order, and wait for each."""
    for child in reversed(children):
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in reversed(children):
        try:
            child.wait(timeout=CHILD_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main() -> int:
    config = load_config(CONFIG)
    connection_string_file = config.credentials.connection_string_file
    assert connection_string_file is not None  # demo.toml runs in azure mode
    write_connection_string(connection_string_file, HUB_HOST)
    workdir = ROOT / "var" / "demo"
    registry_file = workdir / "hub-registry.toml"
    faults_file = workdir / "hub-faults.json"
    emulator_log = workdir / "hub_emulator.log"
    write_registry(connection_string_file, registry_file)
    check_ports_free([config.plc.port, BROKER_PORT, config.uplink.port, DATE_PORT])
    python = sys.executable

    def start_all(start: StartChild) -> None:
        start("devstack.plc_simulator", "--host", "127.0.0.1", "--port", str(config.plc.port))
        start("devstack.mosquitto", "--port", str(BROKER_PORT), "--certs", str(CERTS),
              "--workdir", str(workdir / "mosquitto"))
        wait_for_port(config.plc.port, 15)
        wait_for_port(BROKER_PORT, 15)
        emulator = start(*hub_emulator_args(registry_file, faults_file, config.uplink.port),
                         log_file=emulator_log)
        wait_for_ready(emulator_log, emulator, 15)
        start("cli.main", "run", "--config", str(CONFIG))

        print(f"""
plcbridge demo is running. Ctrl-C (or SIGTERM) stops it.

The gateway sends to the IoT Hub emulator on 127.0.0.1:{config.uplink.port}, which checks
its SAS tokens and passes the pages to mosquitto. Watch them arrive there:
  mosquitto_sub -h localhost -p {BROKER_PORT} --cafile {CERTS}/ca.pem \\
      -t 'devices/+/messages/events/#' -v

Break the hub on purpose (docs/hub-emulator.md lists the faults), for example:
  echo '{{"refuse": true}}' > {faults_file}     # every CONNECT gets CONNACK 5
  rm {faults_file}                              # back to normal

Emulator log, one line per decision: {emulator_log}

Tap a process live (plc_reader, buffer, uplink, credential_watcher):
  {python} -m cli.main tap --config {CONFIG} uplink

Restart one program:
  {python} -m cli.main ctl --config {CONFIG} restart plcbridge:uplink

Logs: {config.gateway.log_dir}
""", flush=True)

    return supervise(start_all)


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
