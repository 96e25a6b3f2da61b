"""The PLC simulator (devstack.plc_simulator) as a subprocess on a loopback port, for tests.

    with PlcSimulator(workdir) as plc:
        ...  # plc.port accepts Modbus TCP connections here

kill() sends SIGKILL, as a power cut would, and start() again listens on the same port.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class PlcSimulator:
    """One devstack.plc_simulator process; its output goes to plc-simulator.log in workdir."""

    def __init__(self, workdir: Path, port: int | None = None, bench_registers: int = 1000,
                 serial_file: Path | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.bench_registers = bench_registers
        # Where the simulator reads its serial number; writing it swaps the simulated PLC.
        self.serial_file = serial_file
        self.log_file = workdir / "plc-simulator.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the simulator and wait until it accepts TCP connections."""
        command = [
            sys.executable, "-m", "devstack.plc_simulator",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--bench-registers", str(self.bench_registers),
        ]
        if self.serial_file is not None:
            command += ["--serial-file", str(self.serial_file)]
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        deadline = time.monotonic() + timeout_s
        while not accepts_connections(self.port):
            if self.process.poll() is not None:
                raise AssertionError(
                    f"PLC simulator exited with {self.process.returncode}: {self.log()}"
                )
            if time.monotonic() >= deadline:
                self.kill()
                raise AssertionError(
                    f"PLC simulator not accepting connections on port {self.port} after "
                    f"{timeout_s:g} s: {self.log()}"
                )
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the simulator and reap it."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout_s: float = 5.0) -> int | None:
        """SIGTERM the simulator and return its exit code; SIGKILL it if it does not stop."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def __enter__(self) -> PlcSimulator:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
