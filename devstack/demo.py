"""Run the demo in the foreground: PLC simulator, mosquitto over TLS and the gateway.

`make run` calls this after it has installed the project and generated the development
certificates. Ctrl-C stops everything.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from common.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "devstack" / "demo.toml"
CERTS = ROOT / "var" / "dev-certs"


def write_connection_string(path: Path, host: str) -> None:
    """Create the demo device's connection string with a fresh random key, once."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    path.write_text(f"HostName={host};DeviceId=demo-gateway;SharedAccessKey={key}\n")
    path.chmod(0o600)


def wait_for_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"demo: nothing listens on 127.0.0.1:{port} after {timeout_s:g} s")


def main() -> int:
    config = load_config(CONFIG)
    write_connection_string(config.credentials.connection_string_file, "localhost")  # type: ignore[arg-type]
    workdir = ROOT / "var" / "demo"
    python = sys.executable
    children: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> None:
        children.append(subprocess.Popen([python, "-m", *args], cwd=ROOT))

    try:
        start("devstack.plc_simulator", "--host", "127.0.0.1", "--port", str(config.plc.port))
        start("devstack.mosquitto", "--port", str(config.uplink.port), "--certs", str(CERTS),
              "--workdir", str(workdir / "mosquitto"))
        wait_for_port(config.plc.port, 15)
        wait_for_port(config.uplink.port, 15)
        start("cli.main", "run", "--config", str(CONFIG))

        print(f"""
plcbridge demo is running. Ctrl-C stops it.

Watch the pages arrive at the broker:
  mosquitto_sub -h localhost -p {config.uplink.port} --cafile {CERTS}/ca.pem \\
      -t 'devices/+/messages/events/#' -v

Tap a process live (plc_reader, buffer, uplink, credential_watcher):
  {python} -m cli.main tap --config {CONFIG} uplink

Restart one program:
  {python} -m cli.main ctl --config {CONFIG} restart plcbridge:uplink

Logs: {config.gateway.log_dir}
""", flush=True)
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in reversed(children):
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
