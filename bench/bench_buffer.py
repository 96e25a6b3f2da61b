"""The buffer's ingest and drain rates, with a real buffer process and a durable LMDB store.

Run `python bench/bench_buffer.py` from the checkout, with the project's virtualenv.

Each run starts `python -m processes.buffer` on a fresh store in a temporary folder, with
1,000-sample pages of at most 262,144 bytes and buffer.sync as given. Two DEALER sockets in
this script play the other processes:

- ingest: a reader sends the backlog in batches, at most 16 unacknowledged as the reader's
  default plc.max_unacked_batches allows, and the clock runs from the first send to the ack
  of the last batch. The rate is samples committed per second.
- drain: once the whole backlog is sealed into pages, an uplink reports its link up with 20
  pages of credit, the uplink's default, and acknowledges every page as soon as it arrives.
  The clock runs from the link message to the last page. The rate is samples per second.

With `--tap stalled`, a tap subscriber that subscribes to every event and to the buffer's
data copies, and never reads, connects before the ingest. The buffer then copies every
page it hands out to its tap, so the drain shows the cost of the copies and whether a
subscriber that reads nothing holds the buffer back.

Runs are repeated and the medians printed. The script and the buffer share the machine's
cores, so the figures include the cost of the test-side peers.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import zmq

from common import payload, wire
from common.tap import data_topic
from devstack.gateway_toml import gateway_dirs, gateway_toml

REPO = Path(__file__).resolve().parent.parent
WINDOW_BATCHES = 16
UPLINK_CREDIT = 20
PAGE_SAMPLES = 1000
TIMEOUT_S = 300.0



@dataclass(frozen=True)
class RunResult:
    ingest_samples_per_s: float
    drain_samples_per_s: float


def make_batches(total_samples: int, batch_samples: int) -> list[tuple[int, bytes]]:
    """Encode the backlog as (count, JSON array) batches of samples shaped like the demo's
    tags, about 105 bytes each in JSON."""
    names = ("line1.counter", "line1.sine", "line1.temperature_c", "line1.running")
    batches = []
    for first in range(0, total_samples, batch_samples):
        samples = []
        for seq in range(first, min(first + batch_samples, total_samples)):
            value = round(math.sin(seq / 50), 6)
            samples.append({"name": names[seq % 4], "value": value, "quality": "good",
                            "ts_ms": 1_764_806_400_000 + seq, "epoch": 1, "seq": seq})
        batches.append((len(samples), payload.encode_samples(samples)))
    return batches


class BufferUnderTest:
    """A buffer process on a fresh store in a temporary folder."""

    def __init__(self, sync: bool) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pb-bench-", dir="/tmp"))
        self.runtime_dir = self.root / "run"
        config = self.root / "gateway.toml"
        config.write_text(gateway_toml(
            gateway=gateway_dirs(self.root),
            buffer={"max_bytes": 1073741824, "page_max_samples": PAGE_SAMPLES,
                    "page_max_bytes": 262144, "page_max_age_ms": 200, "commit_max_batches": 64,
                    "sync": sync},
            uplink={"mode": "mqtt"},
            broker={"host": "127.0.0.1", "client_id": "bench"},
            credentials={"ca_file": f"{self.root}/ca.pem"},
        ))
        self.log_path = self.root / "buffer.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "processes.buffer", "--config", str(config)],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while "buffer_ready" not in self.log_path.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"buffer did not start:\n{self.log_path.read_text()}")
            time.sleep(0.01)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def measure_ingest(context: zmq.Context[zmq.Socket[bytes]], runtime_dir: Path,
                   batches: list[tuple[int, bytes]]) -> float:
    """Send every batch with a window of unacknowledged ones, and return samples per second."""
    reader = wire.make_socket(context, zmq.DEALER, wire.DATA_HWM, linger_ms=0)
    reader.connect(wire.endpoint(runtime_dir, wire.INGEST))
    unacked: deque[int] = deque()
    next_batch = 0
    started = time.perf_counter()
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while next_batch < len(batches) or unacked:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ingest timed out at batch {next_batch}")
            while next_batch < len(batches) and len(unacked) < WINDOW_BATCHES:
                count, array = batches[next_batch]
                header = {"epoch": 1, "batch_seq": next_batch, "count": count}
                reader.send_multipart(wire.encode(wire.BATCH, header, array))
                unacked.append(next_batch)
                next_batch += 1
            if reader.poll(1000):
                acked = wire.decode(reader.recv_multipart()).header["batch_seq"]
                while unacked and unacked[0] <= acked:
                    unacked.popleft()
        elapsed = time.perf_counter() - started
    finally:
        reader.close(linger=0)
    return sum(count for count, _array in batches) / elapsed


def wait_until_sealed(context: zmq.Context[zmq.Socket[bytes]], runtime_dir: Path,
                      pages: int) -> None:
    """Wait on the buffer's tap until every sample is in a sealed page.

    The buffer's pages counter must also reach pages. With pages=0, only the open page counts.
    """
    tap = wire.make_socket(context, zmq.SUB, wire.TAP_HWM, linger_ms=0)
    tap.setsockopt(zmq.SUBSCRIBE, b"buffer")
    tap.connect(wire.tap_endpoint(runtime_dir, "buffer"))
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if not tap.poll(1000):
                continue
            message = json.loads(tap.recv_multipart()[1])
            if message["kind"] == "counters" and message["open_samples"] == 0 \
                    and message["pages"] >= pages:
                return
        raise RuntimeError("the backlog was not sealed into pages within 30 s")
    finally:
        tap.close(linger=0)


def measure_drain(context: zmq.Context[zmq.Socket[bytes]], runtime_dir: Path,
                  total_samples: int) -> float:
    """Take every page and acknowledge it at once, and return samples per second."""
    uplink = wire.make_socket(context, zmq.DEALER, wire.DATA_HWM, linger_ms=0)
    uplink.connect(wire.endpoint(runtime_dir, wire.DELIVERY))
    received = 0
    deadline = time.monotonic() + TIMEOUT_S
    started = time.perf_counter()
    try:
        uplink.send_multipart(wire.encode(
            wire.LINK, {"session": "bench", "state": "up", "free": UPLINK_CREDIT}))
        while received < total_samples:
            if time.monotonic() > deadline:
                raise RuntimeError(f"drain timed out after {received} samples")
            if not uplink.poll(1000):
                continue
            header = wire.decode(uplink.recv_multipart()).header
            uplink.send_multipart(wire.encode(
                wire.PUBACK, {"session": "bench", "page_seq": header["page_seq"]}))
            received += header["count"]
        elapsed = time.perf_counter() - started
    finally:
        uplink.close(linger=0)
    return total_samples / elapsed


def connect_stalled_subscriber(context: zmq.Context[zmq.Socket[bytes]],
                               runtime_dir: Path) -> zmq.Socket[bytes]:
    """Subscribe to the buffer's events and data copies with the smallest queues, and never
    read."""
    subscriber = context.socket(zmq.SUB)
    subscriber.setsockopt(zmq.LINGER, 0)
    subscriber.setsockopt(zmq.RCVHWM, 1)
    subscriber.setsockopt(zmq.RCVBUF, 4096)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"")
    subscriber.setsockopt(zmq.SUBSCRIBE, data_topic("buffer"))
    subscriber.connect(wire.tap_endpoint(runtime_dir, "buffer"))
    return subscriber


def run_once(batches: list[tuple[int, bytes]], total_samples: int, sync: bool,
             tap: str) -> RunResult:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    buffer = BufferUnderTest(sync)
    try:
        # The buffer reads subscriptions once a second, and the ingest and the sealing take
        # longer, so it copies every page of the drain.
        if tap == "stalled":
            connect_stalled_subscriber(context, buffer.runtime_dir)
        ingest = measure_ingest(context, buffer.runtime_dir, batches)
        wait_until_sealed(context, buffer.runtime_dir, math.ceil(total_samples / PAGE_SAMPLES))
        drain = measure_drain(context, buffer.runtime_dir, total_samples)
    finally:
        buffer.close()
        context.destroy(linger=0)
    return RunResult(ingest, drain)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_000_000, help="backlog in samples")
    parser.add_argument("--batch-samples", type=int, default=1000,
                        help="samples per batch; above 1000 the buffer splits batches")
    parser.add_argument("--runs", type=int, default=3, help="runs to take the median of")
    parser.add_argument("--no-sync", action="store_true", help="set buffer.sync = false")
    parser.add_argument("--tap", choices=("none", "stalled"), default="none",
                        help="stalled: a tap subscriber to the data copies that never reads")
    args = parser.parse_args()

    batches = make_batches(args.samples, args.batch_samples)
    backlog_mb = sum(len(array) for _count, array in batches) / 1e6
    print(f"backlog: {args.samples} samples, {len(batches)} batches, {backlog_mb:.1f} MB; "
          f"pages of {PAGE_SAMPLES} samples; sync={not args.no_sync}; tap={args.tap}")

    results = []
    for run in range(1, args.runs + 1):
        result = run_once(batches, args.samples, sync=not args.no_sync, tap=args.tap)
        results.append(result)
        print(f"run {run}: ingest {result.ingest_samples_per_s:,.0f} samples/s, "
              f"drain {result.drain_samples_per_s:,.0f} samples/s")

    ingest = statistics.median(result.ingest_samples_per_s for result in results)
    drain = statistics.median(result.drain_samples_per_s for result in results)
    print(f"median of {args.runs}: ingest {ingest:,.0f} samples/s, drain {drain:,.0f} samples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
