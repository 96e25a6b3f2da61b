"""A whole gateway under supervisord, started the way an operator starts it, for tests."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import xmlrpc.client
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

from devstack.gateway_toml import Keys, gateway_dirs, gateway_toml, simulator_tags
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
PROGRAMS = ("buffer", "plc_reader", "uplink", "credential_watcher")
DEVICE_KEY = base64.b64encode(b"plcbridge-test-device-key-32byte").decode()



def gateway_config(
    base: Path,
    plc_port: int,
    broker_port: int,
    ca_file: Path,
    *,
    poll_interval_ms: int = 20,
    extra_uplink: str = "",
    extra_buffer: str = "",
    extra_tags: Sequence[Keys] = (),
) -> str:
    """Return a configuration for the test stack: simulator tags, azure mode on loopback."""
    return gateway_toml(
        gateway={**gateway_dirs(base), "log_level": "INFO"},
        plc={"host": "127.0.0.1", "port": plc_port, "timeout_s": 0.5, "reconnect_min_s": 0.1,
             "reconnect_max_s": 1.0, "ack_timeout_s": 1.0},
        tag_groups=[{"name": "fast", "poll_interval_ms": poll_interval_ms},
                    {"name": "slow", "poll_interval_ms": 200}],
        tags=simulator_tags("line1.counter", "line1.sine", "line1.check", "line1.temperature_c",
                            "plc.serial_number", "line1.running") + list(extra_tags),
        buffer=[{"max_bytes": 67108864, "page_max_samples": 200, "page_max_age_ms": 100},
                extra_buffer],
        uplink=[{"mode": "azure", "port": broker_port, "connect_timeout_s": 2.0,
                 "reconnect_min_s": 0.2, "reconnect_max_s": 2.0}, extra_uplink],
        credentials={"connection_string_file": f"{base}/connection-string.txt",
                     "ca_file": str(ca_file), "check_interval_s": 0.2},
    )


class Gateway:
    """The four processes under a real supervisord, launched with `plcbridge run`."""

    def __init__(self, base: Path, config_text: str, device_id: str = "e2e-device") -> None:
        self.base = base
        self.device_id = device_id
        self.config = base / "plcbridge.toml"
        self.config.write_text(config_text)
        self.connection_string = base / "connection-string.txt"
        self.connection_string.write_text(
            f"HostName=localhost;DeviceId={device_id};SharedAccessKey={DEVICE_KEY}\n"
        )
        self.socket = base / "run" / "supervisord.sock"
        self.log_dir = base / "log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "run", "--config", str(self.config)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until(
            lambda: all(self.state(name) == "RUNNING" for name in PROGRAMS),
            timeout_s,
            "all four programs RUNNING under supervisord",
            step_s=0.2,
        )

    def rpc(self) -> Any:
        transport = SupervisorTransport(None, None, f"unix://{self.socket}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def info(self, program: str) -> dict[str, Any]:
        info: dict[str, Any] = self.rpc().supervisor.getProcessInfo(f"plcbridge:{program}")
        return info

    def state(self, program: str) -> str | None:
        try:
            return str(self.info(program)["statename"])
        except (OSError, xmlrpc.client.Fault):
            return None

    def pid(self, program: str) -> int:
        return int(self.info(program)["pid"])

    def supervisorctl(
        self, *args: str, timeout_s: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run supervisorctl through `plcbridge ctl`, the command the README gives operators."""
        return subprocess.run(
            [sys.executable, "-m", "cli.main", "ctl", "--config", str(self.config), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def kill9(self, program: str, timeout_s: float = 30.0) -> None:
        """SIGKILL a program and wait until supervisord has it running again."""
        # supervisord reports pid 0 for a program between runs, and kill(0) would signal
        # this test's own process group, so wait for a real pid first.
        old_pid = wait_until(lambda: self.pid(program), timeout_s, f"{program} running")
        os.kill(old_pid, signal.SIGKILL)
        wait_until(
            lambda: self.state(program) == "RUNNING" and self.pid(program) != old_pid,
            timeout_s,
            f"{program} restarted by supervisord after SIGKILL",
            step_s=0.1,
        )

    def wait_started(self, timeout_s: float = 60.0) -> None:
        """Wait until every program has logged its start, so its signal handlers are set.

        supervisord calls a program RUNNING after startsecs, which a loaded machine can
        reach while the program is still importing its libraries.
        """
        wait_until(
            lambda: all(" start version=" in self.log(name) for name in PROGRAMS),
            timeout_s,
            "every program to log its start",
            step_s=0.2,
        )

    def log(self, program: str) -> str:
        path = self.log_dir / f"{program}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
