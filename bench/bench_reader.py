"""Benchmark of the PLC reader process alone, against PLC simulators on loopback.

Measures, with a stand-in buffer that acknowledges every batch at once:
- tags per second from one simulated PLC and from ten, with the poll interval at 1 ms so
  that the reader runs as fast as it can;
- the reader's CPU per 1,000 tags/s, at fixed offered loads;
- the poll-cadence lateness p50 and p99 at 1,000 and 10,000 tags/s, from the reader's tap
  (how long after its due time each poll started, over the last 2,048 polls per device).

Run: .venv/bin/python bench/bench_reader.py [--runs 3] [--seconds 5]
Figures are medians over the runs; docs/benchmarks.md records them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import wire  # noqa: E402
from devstack.gateway_toml import bench_plc_tables, gateway_dirs, gateway_toml  # noqa: E402
from tests.support.plc import PlcSimulator  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# (name, simulators, tags per simulator, poll interval in ms)
SCENARIOS = [
    ("max, 1 PLC", 1, 2000, 1),
    ("max, 10 PLCs", 10, 200, 1),
    ("1,000 tags/s", 1, 100, 100),
    ("10,000 tags/s", 1, 1000, 100),
    ("10,000 tags/s, 10 PLCs", 10, 100, 100),
]


class AckingBuffer:
    """The buffer's ingest ROUTER on a thread: counts samples and acknowledges every batch."""

    def __init__(self, endpoint: str) -> None:
        self.samples = 0
        self._endpoint = endpoint
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._run, name="acking-buffer", daemon=True)
        self._thread.start()
        if not self._bound.wait(5):
            raise RuntimeError(f"cannot bind {endpoint}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = wire.make_socket(context, zmq.ROUTER, wire.DATA_HWM, linger_ms=0)
        sock.bind(self._endpoint)
        self._bound.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(20):
                    continue
                frames = sock.recv_multipart()
                message = wire.decode(frames[1:])
                self.samples += message.header["count"]
                header = {"epoch": message.header["epoch"],
                          "batch_seq": message.header["batch_seq"]}
                sock.send_multipart([frames[0], *wire.encode(wire.ACK, header)])
        finally:
            sock.close(linger=0)


def latest_counters(runtime_dir: Path, timeout_s: float = 3.0) -> dict[str, Any]:
    """Wait for the next counters message on the reader's tap and return it."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(wire.tap_endpoint(runtime_dir, "plc_reader"))
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sock.poll(100):
                _topic, body = sock.recv_multipart()
                message: dict[str, Any] = json.loads(body)
                if message.get("kind") == "counters":
                    return message
    finally:
        sock.close()
    raise TimeoutError("no counters on the reader's tap")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def reader_config(base: Path, ports: list[int], tags: int, interval_ms: int) -> Path:
    path = base / "reader.toml"
    devices, tag_tables = bench_plc_tables(ports, tags, "bench")
    path.write_text(gateway_toml(
        gateway=gateway_dirs(base),
        plc={"timeout_s": 1.0, "queue_max_samples": 1000000},
        devices=devices,
        tag_groups=[{"name": "bench", "poll_interval_ms": interval_ms}],
        tags=tag_tables,
        uplink={"mode": "mqtt"},
        broker={"host": "127.0.0.1", "client_id": "bench-reader"},
        credentials={"ca_file": f"{base}/ca.pem"},
    ))
    return path


def one_run(plcs: int, tags: int, interval_ms: int, seconds: float) -> dict[str, float]:
    base = Path(tempfile.mkdtemp(prefix="pb-bench-", dir="/tmp"))
    (base / "run").mkdir()
    simulators = [PlcSimulator(base, bench_registers=tags) for _ in range(plcs)]
    reader: subprocess.Popen[bytes] | None = None
    buffer = AckingBuffer(wire.endpoint(base / "run", wire.INGEST))
    try:
        for simulator in simulators:
            simulator.start()
        config = reader_config(base, [simulator.port for simulator in simulators], tags,
                               interval_ms)
        with (base / "reader.log").open("wb") as log:
            reader = subprocess.Popen(
                [sys.executable, "-m", "processes.plc_reader", "--config", str(config)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            )

        # Warm up until every device responds, then measure a window.
        deadline = time.monotonic() + 15
        while latest_counters(base / "run", 10.0).get("devices_connected") != plcs:
            if time.monotonic() > deadline:
                raise RuntimeError(f"devices not connected: {(base / 'reader.log').read_text()}")
        time.sleep(1.0)
        samples_before, cpu_before = buffer.samples, cpu_seconds(reader.pid)
        started = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - started
        samples, cpu = buffer.samples - samples_before, cpu_seconds(reader.pid) - cpu_before
        counters = latest_counters(base / "run")

        rate = samples / elapsed
        cpu_percent = 100 * cpu / elapsed
        return {
            "tags_per_s": rate,
            "cpu_percent": cpu_percent,
            "cpu_percent_per_1000": cpu_percent / (rate / 1000) if rate else 0.0,
            "lateness_ms_p50": counters["lateness_ms_p50"],
            "lateness_ms_p99": counters["lateness_ms_p99"],
            "overruns": counters["overruns"],
        }
    finally:
        if reader is not None:
            reader.terminate()
            reader.wait(timeout=10)
        buffer.stop()
        for simulator in simulators:
            simulator.stop()
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario; default 3")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="measured window of each run in seconds; default 5")
    parser.add_argument("--only", help="run only the scenario whose name contains this text")
    args = parser.parse_args()

    for name, plcs, tags, interval_ms in SCENARIOS:
        if args.only and args.only not in name:
            continue
        runs = [one_run(plcs, tags, interval_ms, args.seconds) for _ in range(args.runs)]
        medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(json.dumps({"scenario": name, "plcs": plcs, "tags_per_plc": tags,
                          "interval_ms": interval_ms, "median": medians, "runs": runs}))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
