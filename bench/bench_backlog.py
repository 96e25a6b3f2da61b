"""The buffer with a large backlog: durable ingest, bytes per sample, reopen time and drain.

Run `python bench/bench_backlog.py` from the checkout, with the project's virtualenv. The
default backlog is 10,000,000 samples of about 106 bytes of JSON each, sent as batches of
1,000 samples. The script keeps the backlog in memory (about 1.1 GB), and each run takes a
fresh folder in /tmp with about 1.2 GB of disk at its peak.

Every figure is printed beside the ceiling it is compared with, measured in the same run:

- durable ingest: a DEALER in this script plays the reader, with at most 16 batches
  unacknowledged (the reader's default plc.max_unacked_batches). The buffer,
  `python -m processes.buffer`, runs with the default [buffer] settings: sync on, commit
  grouping of up to 64 batches, pages of at most 65,536 bytes. Only buffer.max_bytes is
  raised, to 4 GiB, to hold the backlog. The clock runs from the first send to the ack of
  the last batch. The LMDB ceiling writes the same batches into a bare LMDB environment
  from this process, one durable transaction per 16 batches, the most the reader's window
  lets the buffer group, and per 64.
- bytes per sample: the buffer's data.mdb size and LMDB's used pages, over the samples held.
  The ceilings are the JSON bytes per sample and the bare LMDB file of the same batches.
- reopen: from starting `python -m processes.buffer` on the full store to its
  buffer_ready log line. The ceiling is a bare Python process that imports lmdb and zmq,
  opens the same store and reads its page count.
- drain: `python -m processes.uplink` in mqtt mode over TLS to mosquitto on loopback, 20
  pages in flight (the default), from its "connected" log line to an empty store, read from
  the LMDB file every 2 ms. The paho ceiling publishes a page taken from the same store,
  QoS 1 over TLS to the same broker with 20 in flight, from one paho client in this process
  (bench/bench_paho.py's method).

Each disk-bound step starts after os.sync(), so that it does not pay for the dirty pages of
the step before. The page cache is warm in every figure: nothing here drops the machine's
caches.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_buffer import measure_ingest, wait_until_sealed  # noqa: E402
from bench_drain import (  # noqa: E402
    free_port,
    start_process,
    stop_process,
    stored_pages,
    wait_connected,
    wait_for_log,
)
from bench_paho import run_once as paho_run_once  # noqa: E402

from devstack.dev_certs import ensure_dev_certs  # noqa: E402
from devstack.gateway_toml import gateway_dirs, gateway_toml  # noqa: E402
from devstack.mosquitto import find_mosquitto, wait_for_tls, write_config  # noqa: E402

BATCH_SAMPLES = 1000
READER_WINDOW = 16
MAX_BYTES = 4 << 30
PAHO_PAGES = 4000
TIMEOUT_S = 600.0


SAMPLE = b'{"name":"%s","value":%s,"quality":"good","ts_ms":%d,"epoch":1,"seq":%d}'
NAMES = (b"line1.counter", b"line1.sine", b"line1.temperature_c", b"line1.running")


@dataclass(frozen=True)
class RunResult:
    ingest_samples_per_s: float
    lmdb_16_samples_per_s: float
    lmdb_64_samples_per_s: float
    file_bytes_per_sample: float
    used_bytes_per_sample: float
    lmdb_file_bytes_per_sample: float
    reopen_s: float
    bare_open_s: float
    drain_samples_per_s: float
    paho_samples_per_s: float
    page_samples: int
    page_bytes: int


def make_batches(total_samples: int) -> list[tuple[int, bytes]]:
    """Encode the backlog as (count, JSON array) batches, with the bytes formatted directly
    because json.dumps of 10,000,000 dictionaries takes half a minute."""
    batches = []
    for first in range(0, total_samples, BATCH_SAMPLES):
        samples = [
            SAMPLE % (NAMES[seq % 4], repr(round(math.sin(seq / 50), 6)).encode(),
                      1_764_806_400_000 + seq, seq)
            for seq in range(first, min(first + BATCH_SAMPLES, total_samples))
        ]
        batches.append((len(samples), b"[" + b",".join(samples) + b"]"))
    return batches


# -- ceilings -----------------------------------------------------------------------------


def lmdb_ceiling(folder: Path, batches: list[tuple[int, bytes]], group: int
                 ) -> tuple[float, int]:
    """Append every batch to a bare LMDB environment, with one durable commit per group.

    Return samples per second and the data file's size in bytes.
    """
    env = lmdb.open(str(folder), map_size=2 * MAX_BYTES, sync=True, metasync=True)
    os.sync()  # so that no earlier step's dirty pages are flushed during this one
    try:
        started = time.perf_counter()
        for start in range(0, len(batches), group):
            with env.begin(write=True) as txn:
                for key, (_count, array) in enumerate(batches[start:start + group], start):
                    txn.put(struct.pack(">Q", key), array, append=True)
        elapsed = time.perf_counter() - started
    finally:
        env.close()
    size = (folder / "data.mdb").stat().st_size
    shutil.rmtree(folder)
    return sum(count for count, _array in batches) / elapsed, size


def bare_open_s(store_dir: Path) -> float:
    """Time a bare Python process that imports lmdb and zmq and opens the store."""
    code = ("import lmdb, zmq, sys; env = lmdb.open(sys.argv[1], max_dbs=4, max_readers=16); "
            "txn = env.begin(); txn.stat(env.open_db(b'pages', txn=txn)); txn.abort()")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(store_dir)], check=True)
    return time.perf_counter() - started


def paho_ceiling(port: int, ca_file: Path, page: bytes, page_samples: int) -> float:
    result = paho_run_once(port, ca_file, page, PAHO_PAGES, 0)
    return result.messages_per_s * page_samples


# -- the buffer and the uplink ------------------------------------------------------------


def store_usage(store_dir: Path) -> tuple[int, int, int, bytes]:
    """Return the data file's size, LMDB's used bytes, the first page's sample count and
    the first page, read from the stopped buffer's store."""
    env = lmdb.open(str(store_dir), readonly=True, max_dbs=4, max_readers=16)
    try:
        used = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        with env.begin() as txn:
            cursor = txn.cursor(db=env.open_db(b"pages", txn=txn))
            cursor.first()
            first_page = bytes(cursor.value())
    finally:
        env.close()
    page_samples = len(json.loads(first_page)["samples"])
    return (store_dir / "data.mdb").stat().st_size, used, page_samples, first_page


def time_reopen(config: Path, root: Path) -> tuple[subprocess.Popen[bytes], float]:
    """Start the buffer on the full store and return it with the seconds to buffer_ready."""
    log_path = root / "buffer-reopen.log"
    started = time.perf_counter()
    buffer = start_process("processes.buffer", config, log_path)
    deadline = time.monotonic() + 60
    while "buffer_ready" not in log_path.read_text():
        if buffer.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the buffer did not reopen:\n{log_path.read_text()}")
        time.sleep(0.001)
    return buffer, time.perf_counter() - started


def time_drain(config: Path, root: Path, samples: int) -> float:
    """Start the uplink and return samples per second from its connect to an empty store."""
    env = lmdb.open(str(root / "state" / "buffer"), readonly=True, max_dbs=4, max_readers=16)
    pages_db = env.open_db(b"pages", create=False)
    log_path = root / "uplink.log"
    uplink = start_process("processes.uplink", config, log_path)
    try:
        connected = wait_connected(log_path, uplink)
        deadline = connected + TIMEOUT_S
        while stored_pages(env, pages_db) > 0:
            if time.monotonic() > deadline or uplink.poll() is not None:
                raise RuntimeError(f"the backlog did not drain:\n{log_path.read_text()}")
            time.sleep(0.002)
        return samples / (time.monotonic() - connected)
    finally:
        stop_process(uplink)
        env.close()


def run_once(batches: list[tuple[int, bytes]], certs: Path) -> RunResult:
    samples = sum(count for count, _array in batches)
    root = Path(tempfile.mkdtemp(prefix="pb-backlog-", dir="/tmp"))
    broker_port = free_port()
    config = root / "gateway.toml"
    config.write_text(gateway_toml(
        gateway={**gateway_dirs(root), "log_level": "INFO"},
        buffer={"max_bytes": MAX_BYTES},
        uplink={"mode": "mqtt", "port": broker_port},
        broker={"host": "localhost", "client_id": "backlog-bench"},
        credentials={"ca_file": str(certs / "ca.pem")},
    ))
    store_dir = root / "state" / "buffer"
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    broker = subprocess.Popen(
        [find_mosquitto(), "-c", str(write_config(broker_port, certs, root / "mosquitto"))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    buffer: subprocess.Popen[bytes] | None = None
    try:
        lmdb_16, lmdb_file_bytes = lmdb_ceiling(root / "lmdb-16", batches, READER_WINDOW)
        lmdb_64, _size = lmdb_ceiling(root / "lmdb-64", batches, 64)

        # Ingest, then the bytes held, with the buffer stopped so the file is settled.
        buffer = start_process("processes.buffer", config, root / "buffer.log")
        wait_for_log(root / "buffer.log", "buffer_ready", buffer)
        os.sync()
        ingest = measure_ingest(context, root / "run", batches)
        wait_until_sealed(context, root / "run", pages=0)
        stop_process(buffer)
        file_bytes, used_bytes, page_samples, page = store_usage(store_dir)

        # Reopen, then the paho ceiling and the drain against the same broker.
        bare_s = bare_open_s(store_dir)
        buffer, reopen_s = time_reopen(config, root)
        wait_for_tls(broker_port, certs / "ca.pem", 10, broker)
        paho = paho_ceiling(broker_port, certs / "ca.pem", page, page_samples)
        drain = time_drain(config, root, samples)
    finally:
        if buffer is not None:
            stop_process(buffer)
        stop_process(broker)
        context.destroy(linger=0)
        shutil.rmtree(root, ignore_errors=True)
    return RunResult(ingest, lmdb_16, lmdb_64, file_bytes / samples, used_bytes / samples,
                     lmdb_file_bytes / samples, reopen_s, bare_s, drain, paho, page_samples,
                     len(page))


def print_run(label: str, result: RunResult) -> None:
    ingest_ratio = result.ingest_samples_per_s / result.lmdb_16_samples_per_s
    drain_factor = result.paho_samples_per_s / result.drain_samples_per_s
    print(f"{label}: ingest {result.ingest_samples_per_s:,.0f} samples/s "
          f"(LMDB ceiling {result.lmdb_16_samples_per_s:,.0f} per 16 batches, "
          f"{result.lmdb_64_samples_per_s:,.0f} per 64; ingest is {ingest_ratio:.0%} of the "
          f"first); bytes/sample: file {result.file_bytes_per_sample:.1f}, "
          f"used {result.used_bytes_per_sample:.1f} "
          f"(bare LMDB file {result.lmdb_file_bytes_per_sample:.1f}); "
          f"reopen {result.reopen_s * 1000:.0f} ms (bare open {result.bare_open_s * 1000:.0f} ms);"
          f" drain {result.drain_samples_per_s:,.0f} samples/s "
          f"(paho ceiling {result.paho_samples_per_s:,.0f}, {drain_factor:.2f} times the drain);"
          f" pages of {result.page_samples} samples, {result.page_bytes} bytes", flush=True)


def median_result(results: list[RunResult]) -> RunResult:
    fields = RunResult.__dataclass_fields__
    return RunResult(**{name: statistics.median(getattr(result, name) for result in results)
                        for name in fields})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000_000, help="backlog in samples")
    parser.add_argument("--runs", type=int, default=3, help="runs to take the medians of")
    args = parser.parse_args()

    certs = ROOT / "var" / "dev-certs"
    ensure_dev_certs(certs)
    batches = make_batches(args.samples)
    json_bytes = sum(len(array) for _count, array in batches)
    print(f"backlog: {args.samples:,} samples in {len(batches):,} batches, "
          f"{json_bytes / 1e6:,.0f} MB of JSON, {json_bytes / args.samples:.1f} bytes/sample; "
          f"{os.cpu_count()} CPUs", flush=True)

    results = []
    for run in range(1, args.runs + 1):
        results.append(run_once(batches, certs))
        print_run(f"run {run}", results[-1])
    print_run(f"median of {args.runs}", median_result(results))
    ingest_ratios = [r.ingest_samples_per_s / r.lmdb_16_samples_per_s for r in results]
    drain_factors = [r.paho_samples_per_s / r.drain_samples_per_s for r in results]
    print(f"medians of the per-run ratios: ingest {statistics.median(ingest_ratios):.0%} of the "
          f"LMDB ceiling per 16 batches; paho ceiling {statistics.median(drain_factors):.2f} "
          "times the drain")
    return 0


if __name__ == "__main__":
    sys.exit(main())
