"""Real buffer and uplink processes for fault tests, and read-only views of their state.

The buffer and the uplink run as `python -m processes.<name> --config FILE`, each with its
output in a file of its own per start, so a test can wait for a log line of the current
start. The store is read with a read-only LMDB environment of the test's own, and the
processes' taps with a SUB socket.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import zmq

from common import wire
from devstack.gateway_toml import gateway_dirs, gateway_toml
from tests.support import waiting

ROOT = Path(__file__).resolve().parents[2]
POLL_S = 0.005

SPEED_TAG = {"name": "line1.speed", "group": "fast", "table": "holding_register", "address": 0}


def write_config(
    root: Path,
    name: str = "gateway.toml",
    *,
    buffer: dict[str, Any] | None = None,
    uplink: dict[str, Any] | None = None,
    broker_port: int = 8883,
    ca_file: Path | None = None,
    runtime_dir: Path | None = None,
) -> Path:
    """Write a gateway configuration in root with the given [buffer] and [uplink] keys."""
    path = root / name
    path.write_text(gateway_toml(
        gateway={**gateway_dirs(root), "runtime_dir": str(runtime_dir or root / "run"),
                 "log_level": "INFO"},
        tags=[SPEED_TAG],
        buffer=buffer or {},
        uplink=[{"mode": "mqtt", "port": broker_port, "reconnect_min_s": 0.1,
                 "reconnect_max_s": 0.5}, uplink or {}],
        broker={"host": "localhost", "client_id": "fault-test"},
        credentials={"ca_file": str(ca_file or root / "ca.pem")},
    ))
    return path



# Fault tests poll every POLL_S, faster than the suite's default step.
wait_until = functools.partial(waiting.wait_until, step_s=POLL_S)


@dataclass
class GatewayProcess:
    """One gateway program, started with a configuration file and its output in a file.

    module is what `python -m` runs, so a test-side launcher that wraps a program can take
    the program's place.
    """

    name: str
    config: Path
    log_dir: Path
    module: str = ""
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    logs: list[Path] = field(default_factory=list)

    def start(self, ready_line: str | None = None, timeout_s: float = 10.0) -> None:
        """Start the program; with ready_line, wait until its output contains that line."""
        self.starts += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{self.name}-{self.starts}.log"
        self.logs.append(log_path)
        module = self.module or f"processes.{self.name}"
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", module, "--config", str(self.config)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            )
        if ready_line is not None:
            self.wait_log(ready_line, timeout_s)

    def wait_log(self, text: str, timeout_s: float) -> None:
        """Wait until the current start's output contains text; fail early if it exited."""
        process = self.process
        assert process is not None
        wait_until(lambda: text in self.log() or process.poll() is not None, timeout_s,
                   f"{text!r} in the {self.name} output")
        assert text in self.log(), f"{self.name} exited before {text!r}:\n{self.log()}"

    def log(self) -> str:
        return self.logs[-1].read_text(errors="replace") if self.logs else ""

    def all_logs(self) -> str:
        return "".join(path.read_text(errors="replace") for path in self.logs)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the program and reap it."""
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def terminate(self, timeout_s: float = 10.0) -> int:
        """SIGTERM the program and return its exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)


# -- the store, read by the test ------------------------------------------------------------


def read_pages(store_dir: Path) -> dict[int, bytes]:
    """Return every sealed page of the buffer's store, keyed by page_seq, in one read."""
    env = lmdb.open(str(store_dir), readonly=True, max_dbs=8, max_readers=16)
    try:
        with env.begin() as txn:
            pages_db = env.open_db(b"pages", txn=txn)
            return {struct.unpack(">Q", key)[0]: bytes(value)
                    for key, value in txn.cursor(db=pages_db)}
    finally:
        env.close()


def data_file_identity(store_dir: Path) -> tuple[int, int]:
    """Return the device and inode of the store's data file, which a recreated store changes."""
    status = os.stat(store_dir / "data.mdb")
    return status.st_dev, status.st_ino


# -- taps ---------------------------------------------------------------------------------


class TapReader:
    """A SUB socket on one process's tap that keeps the latest counters and every event."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], runtime_dir: Path,
                 process: str) -> None:
        self.socket = wire.make_socket(context, zmq.SUB, wire.TAP_HWM, linger_ms=0)
        self.socket.setsockopt(zmq.SUBSCRIBE, process.encode())
        self.socket.setsockopt(zmq.RECONNECT_IVL, 20)
        self.socket.connect(wire.tap_endpoint(runtime_dir, process))
        self.process = process
        self.counters: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []

    def pump(self, timeout_s: float) -> None:
        if not self.socket.poll(int(timeout_s * 1000)):
            return
        while True:
            try:
                _topic, body = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            message = json.loads(body)
            if message["kind"] == "counters":
                self.counters = message
            else:
                self.events.append(message)

    def wait_counters(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float,
                      what: str) -> dict[str, Any]:
        """Wait for counters that satisfy predicate; fail naming what and the last counters."""
        deadline = time.monotonic() + timeout_s
        while not (self.counters and predicate(self.counters)):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}; "
                                     f"last {self.process} counters: {self.counters}")
            self.pump(min(remaining, 0.1))
        return self.counters

    def close(self) -> None:
        self.socket.close(linger=0)
