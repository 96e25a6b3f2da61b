"""End-to-end benchmark of the whole gateway under supervisord.

Measures, against the PLC simulator and mosquitto over TLS on loopback:
- end-to-end samples/s from the simulator to PUBACK, with the buffer's backlog steady;
- the drain rate of a backlog of about 1,000,000 samples, from the buffer to PUBACKs;
- the resident memory of each process.

Run: .venv/bin/python bench/bench_gateway.py [--runs 3] [--tags 1000] [--interval-ms 10]
Figures are medians over the runs; docs/benchmarks.md records them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lmdb
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_paho import make_page, run_once  # noqa: E402

from common import wire  # noqa: E402
from devstack.gateway_toml import gateway_dirs, gateway_toml  # noqa: E402
from tests.support.gateway import Gateway, wait_until  # noqa: E402

PAGE_SAMPLES = 1000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def bench_config(base: Path, plc_port: int, broker_port: int, ca: Path, tags: int,
                 interval_ms: int) -> str:
    return gateway_toml(
        gateway={**gateway_dirs(base), "log_level": "INFO"},
        plc={"host": "127.0.0.1", "port": plc_port, "timeout_s": 1.0},
        tag_groups=[{"name": "bench", "poll_interval_ms": interval_ms}],
        tags=[{"name": f"bench.r{i:04d}", "group": "bench", "table": "holding_register",
               "address": 100 + i, "type": "uint16"} for i in range(tags)],
        buffer={"max_bytes": 1073741824, "page_max_samples": PAGE_SAMPLES,
                "page_max_bytes": 131072, "page_max_age_ms": 200, "sync": True},
        uplink={"mode": "azure", "port": broker_port},
        credentials={"connection_string_file": f"{base}/connection-string.txt",
                     "ca_file": str(ca)},
    )


class TapReader:
    """Follows one process's tap and keeps its latest counters."""

    def __init__(self, runtime_dir: Path, process: str) -> None:
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.connect(wire.tap_endpoint(runtime_dir, process))
        self.counters: dict[str, Any] = {}

    def latest(self, timeout_s: float = 3.0) -> dict[str, Any]:
        """Wait for the next counters message and return it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.socket.poll(100):
                _topic, body = self.socket.recv_multipart()
                message = json.loads(body)
                if message.get("kind") == "counters":
                    self.counters = message
                    return message
        raise TimeoutError("no counters on the tap")

    def close(self) -> None:
        self.socket.close()


def stored_pages(store: lmdb.Environment, pages_db: Any) -> int:
    with store.begin() as txn:
        entries: int = txn.stat(pages_db)["entries"]
        return entries


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pss_mib(pid: int) -> float:
    """Return the proportional set size: shared pages, such as libpython's, split among
    the processes that map them, so the four figures add up to what the gateway costs."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def one_run(args: argparse.Namespace, certs: Path) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="pb-bench-", dir="/tmp"))
    plc_port, broker_port = free_port(), free_port()
    python = sys.executable
    helpers = [
        subprocess.Popen([python, "-m", "devstack.plc_simulator", "--host", "127.0.0.1",
                          "--port", str(plc_port), "--bench-registers", str(args.tags)],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([python, "-m", "devstack.mosquitto", "--port", str(broker_port),
                          "--certs", str(certs), "--workdir", str(base / "mosquitto")],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    gateway = Gateway(base, bench_config(base, plc_port, broker_port, certs / "ca.pem",
                                         args.tags, args.interval_ms))
    result: dict[str, Any] = {}
    try:
        time.sleep(1.0)  # the simulator and mosquitto bind within a second here
        gateway.start()
        buffer_tap = TapReader(base / "run", "buffer")

        # Steady state: samples committed per second while the backlog stays flat.
        first = buffer_tap.latest()
        time.sleep(args.window_s)
        last = buffer_tap.latest()
        elapsed = (last["ts_ms"] - first["ts_ms"]) / 1000
        result["end_to_end_samples_per_s"] = (
            last["samples_committed"] - first["samples_committed"]) / elapsed
        result["backlog_pages_at_end"] = last["pages"]
        programs = ("plc_reader", "buffer", "uplink", "credential_watcher")
        result["rss_mib"] = {name: rss_mib(gateway.pid(name)) for name in programs}
        result["pss_mib"] = {name: pss_mib(gateway.pid(name)) for name in programs}

        # Drain: stop the uplink, let a backlog build, then time its delivery.
        gateway.supervisorctl("stop", "plcbridge:uplink")
        target = args.backlog_samples
        start_count = buffer_tap.latest()["samples_committed"]
        wait_until(lambda: buffer_tap.latest()["samples_committed"] - start_count >= target,
                   600, "backlog built", step_s=0.5)
        gateway.supervisorctl("stop", "plcbridge:plc_reader")
        backlog = buffer_tap.latest()

        # The drain is timed from the uplink's "connected" log line to an empty store, read
        # from LMDB every 2 ms: supervisord's startsecs and the tap's 1 s counters would
        # otherwise be most of a one-second drain.
        store = lmdb.open(str(base / "state" / "buffer"), readonly=True, lock=True, max_dbs=8)
        pages_db = store.open_db(b"pages", create=False)
        uplink_log = base / "log" / "uplink.log"
        connects_before = uplink_log.read_text().count(" connected endpoint=")
        subprocess.Popen(  # returns after startsecs; the drain is timed from the log instead
            [python, "-m", "cli.main", "ctl", "--config", str(gateway.config), "start",
             "plcbridge:uplink"], cwd=ROOT, stdout=subprocess.DEVNULL)
        wait_until(
            lambda: uplink_log.read_text().count(" connected endpoint=") > connects_before,
            30, "the uplink's connected line", step_s=0.002,
        )
        began = time.monotonic()
        wait_until(lambda: stored_pages(store, pages_db) == 0, 600, "backlog drained",
                   step_s=0.002)
        drain_s = time.monotonic() - began
        store.close()
        result["drain_samples"] = backlog["samples_committed"] - start_count
        result["drain_samples_per_s"] = result["drain_samples"] / drain_s
        buffer_tap.close()

        # paho's own ceiling against the same broker, with pages of the gateway's size, while
        # the gateway is idle: the reader is stopped and the backlog is drained.
        ceiling = run_once(broker_port, certs / "ca.pem", make_page(1, PAGE_SAMPLES), 2000, 0)
        result["paho_ceiling_samples_per_s"] = ceiling.messages_per_s * PAGE_SAMPLES
    finally:
        gateway.stop()
        for helper in helpers:
            helper.terminate()
            helper.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tags", type=int, default=1000)
    parser.add_argument("--interval-ms", type=int, default=10)
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--backlog-samples", type=int, default=1_000_000)
    args = parser.parse_args()

    certs = ROOT / "var" / "dev-certs"
    subprocess.run([sys.executable, "-m", "devstack.dev_certs", str(certs)], check=True, cwd=ROOT)
    runs = [one_run(args, certs) for _ in range(args.runs)]
    for index, run in enumerate(runs):
        print(f"run {index + 1}: {json.dumps(run)}")

    def median(key: str) -> float:
        return statistics.median(run[key] for run in runs)

    total_rss = statistics.median(sum(run["rss_mib"].values()) for run in runs)
    ceiling = median("paho_ceiling_samples_per_s")
    end_to_end = median("end_to_end_samples_per_s")
    drain = median("drain_samples_per_s")
    print(f"paho ceiling samples/s, {PAGE_SAMPLES}-sample pages (median): {ceiling:,.0f}")
    print(f"end-to-end samples/s (median): {end_to_end:,.0f}, {end_to_end / ceiling:.1%} of paho")
    print(f"drain samples/s (median): {drain:,.0f}, {drain / ceiling:.1%} of paho")
    for name in runs[0]["rss_mib"]:
        print(f"rss {name} MiB (median): "
              f"{statistics.median(run['rss_mib'][name] for run in runs):.1f}")
    print(f"rss total of the four MiB (median): {total_rss:.1f}")
    total_pss = statistics.median(sum(run["pss_mib"].values()) for run in runs)
    print(f"pss total of the four MiB (median): {total_pss:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
