"""paho-mqtt's own publish ceiling: QoS 1 over TLS to a local mosquitto, 20 in flight.

Run `python bench/bench_paho.py` from the checkout, with the project's virtualenv.

It starts mosquitto with the development certificates in a temporary folder, then for each
page size publishes pages built the way the buffer builds them. A semaphore keeps at most 20
pages unacknowledged, as the buffer's credit does for the uplink, because paho 2.2 rescans
its whole message list on every PUBACK and a long queue would measure that instead. Each
size runs several times and the medians are printed in messages and samples per second.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from common.payload import build_page
from devstack.dev_certs import ensure_dev_certs
from devstack.mosquitto import find_mosquitto, wait_for_tls, write_config

IN_FLIGHT = 20


@dataclass(frozen=True)
class RunResult:
    messages: int
    seconds: float
    cpu_seconds: float

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.seconds


def make_page(page_seq: int, samples: int) -> bytes:
    """Build a page of samples shaped like the demo's tags: a counter, a sine, a temperature
    and a running flag, about 85 bytes each in JSON."""
    batch = []
    for i in range(samples):
        tick = page_seq * samples + i
        name, value = (
            ("line1.counter", tick),
            ("line1.sine", round(math.sin(tick / 50), 6)),
            ("line1.temperature_c", round(20 + (tick % 50) / 10, 1)),
            ("line1.running", tick % 7 != 0),
        )[i % 4]
        batch.append({"name": name, "value": value, "quality": "good",
                      "ts_ms": 1764806400000 + tick * 10, "epoch": 3, "seq": tick})
    return build_page(page_seq, [json.dumps(batch, separators=(",", ":")).encode()])


def connect(port: int, ca_file: Path, client_id: str) -> mqtt.Client:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cafile=str(ca_file))

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=False,
        protocol=mqtt.MQTTv311,
    )
    client.tls_set_context(context)
    client.max_inflight_messages_set(IN_FLIGHT)
    connected = threading.Event()
    client.on_connect = lambda *_args: connected.set()
    client.connect("localhost", port, keepalive=60)
    client.loop_start()
    if not connected.wait(10):
        raise RuntimeError(f"no CONNACK from localhost:{port} within 10 s")
    return client


def run_once(port: int, ca_file: Path, payload: bytes, count: int, run: int) -> RunResult:
    client = connect(port, ca_file, f"bench-{len(payload)}-{run}")
    window = threading.BoundedSemaphore(IN_FLIGHT)
    done = threading.Event()
    acknowledged = 0

    def on_publish(*_args: Any) -> None:
        nonlocal acknowledged
        acknowledged += 1
        window.release()
        if acknowledged == count:
            done.set()

    client.on_publish = on_publish
    started = time.perf_counter()
    cpu_started = time.process_time()
    for page_seq in range(count):
        window.acquire()
        client.publish(f"devices/bench/messages/events/$.mid={page_seq}", payload, qos=1)
    if not done.wait(120):
        raise RuntimeError(f"only {acknowledged} of {count} PUBACKs within 120 s")
    result = RunResult(count, time.perf_counter() - started, time.process_time() - cpu_started)

    client.disconnect()
    client.loop_stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per page size (default 3)")
    # 650 samples of about 100 bytes fill the buffer's default page_max_bytes of 64 KiB;
    # 1000 is its default page_max_samples, reached when buffer.page_max_bytes is raised.
    parser.add_argument("--samples", type=int, nargs="+", default=[100, 650, 1000],
                        help="samples per page (default 100 650 1000)")
    parser.add_argument("--messages", type=int, default=0,
                        help="pages per run (default: 200 MB of pages, at least 2,000)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="pb-bench-", dir="/tmp"))
    certs = workdir / "certs"
    ensure_dev_certs(certs)
    port = _free_port()
    config = write_config(port, certs, workdir / "mosquitto")
    broker = subprocess.Popen([find_mosquitto(), "-c", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_tls(port, certs / "ca.pem", 10, broker)
        print(f"paho-mqtt {version('paho-mqtt')}, QoS 1 over TLS to mosquitto on "
              f"127.0.0.1:{port}, {IN_FLIGHT} in flight, medians of {args.runs} runs")
        for samples in args.samples:
            _bench_size(port, certs / "ca.pem", samples, args.runs, args.messages)
    finally:
        broker.terminate()
        broker.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _bench_size(port: int, ca_file: Path, samples: int, runs: int, messages: int) -> None:
    payload = make_page(1, samples)

    # About 200 MB per run, and at least 2,000 messages, so each run lasts a second or more.
    count = messages or max(2000, 200_000_000 // len(payload))
    results = [run_once(port, ca_file, payload, count, run) for run in range(runs)]

    rates = [result.messages_per_s for result in results]
    rate = statistics.median(rates)
    cpu_ms = statistics.median(1000 * r.cpu_seconds / r.messages for r in results)
    print(
        f"{samples:>5} samples, {len(payload):>6} bytes: {rate:>8,.0f} msg/s, "
        f"{rate * samples:>11,.0f} samples/s, {rate * len(payload) / 1e6:6.1f} MB/s, "
        f"{cpu_ms:.3f} ms CPU/msg in this process; runs: "
        + ", ".join(f"{r:,.0f}" for r in rates)
        + f" msg/s over {count} messages each"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


if __name__ == "__main__":
    sys.exit(main())
