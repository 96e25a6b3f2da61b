"""The PLC reader process against the real PLC simulator and a test-side stand-in buffer.

The stand-in buffer binds the ingest ROUTER as the buffer process does, stores a batch only
when its batch_seq is one above the last it stored for the epoch, and acknowledges
cumulatively. A SUB socket on the reader's tap reads its counters.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import zmq

from common import wire
from common.config import PlcSettings, load_config
from devstack.gateway_toml import Keys, gateway_dirs, gateway_toml, simulator_tags
from processes.plc_reader.client import PlcConnection, PlcReadError
from processes.plc_reader.reader import GroupSchedule
from processes.plc_reader.resolver import Address, Resolve, literal_address
from processes.plc_reader.samples import SampleEncoder, encode_batch
from tests.support.plc import ROOT, PlcSimulator
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

SERIAL_NUMBER = 22091017

SIMULATOR_TAGS = simulator_tags(
    "line1.counter", "line1.sine", "line1.check", "line1.running", "line1.stopped",
    "line1.temperature_c", "plc.serial_number",
)

FAULTY_TAGS: list[Keys] = [
    {"name": "line1.missing", "group": "slow", "table": "holding_register", "address": 5000},
    {"name": "line1.unset", "group": "slow", "table": "holding_register", "address": 6,
     "type": "float32"},
]


def write_config(
    base: Path,
    plc_port: int,
    plc_keys: str = "",
    tags: Sequence[Keys] | str = SIMULATOR_TAGS,
    host: str = "127.0.0.1",
) -> Path:
    path = base / "plcbridge.toml"
    path.write_text(gateway_toml(
        gateway={**gateway_dirs(base), "log_level": "INFO"},
        plc=[{"host": host, "port": plc_port, "timeout_s": 0.3, "reconnect_min_s": 0.1,
              "reconnect_max_s": 0.4}, plc_keys],
        tag_groups=[{"name": "fast", "poll_interval_ms": 10},
                    {"name": "slow", "poll_interval_ms": 100}],
        tags=tags,
        uplink={"mode": "mqtt"},
        broker={"host": "127.0.0.1", "client_id": "plc-reader-test"},
        credentials={"ca_file": f"{base}/ca.pem"},
    ))
    return path


class StandInBuffer:
    """The buffer's ingest ROUTER, run by a thread: stores batches in order and acks them.

    committed maps each epoch to the last batch_seq stored, and is handed to the next
    stand-in to play a buffer restart that kept its store. With acking off, batches are
    received and discarded, as by a buffer that dies before it commits.
    """

    def __init__(self, endpoint: str, committed: dict[int, int] | None = None) -> None:
        self.endpoint = endpoint
        self.committed: dict[int, int] = committed if committed is not None else {}
        self.samples: list[dict[str, Any]] = []
        self.stored_batches: list[tuple[int, int]] = []
        self.acking = True
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stand-in-buffer", daemon=True)

    def start(self) -> StandInBuffer:
        self._thread.start()
        assert self._bound.wait(5), f"stand-in buffer did not bind {self.endpoint}"
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.samples)

    def _run(self) -> None:
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = wire.make_socket(context, zmq.ROUTER, wire.DATA_HWM, linger_ms=0)
        sock.bind(self.endpoint)
        self._bound.set()
        try:
            while not self._stop.is_set():
                if sock.poll(20):
                    self._handle(sock, sock.recv_multipart())
        finally:
            sock.close(linger=0)

    def _handle(self, sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
        routing_id, message = frames[0], wire.decode(frames[1:])
        assert message.kind == wire.BATCH
        if not self.acking:
            return
        epoch = message.header["epoch"]
        batch_seq = message.header["batch_seq"]
        last = self.committed.get(epoch, -1)
        if batch_seq == last + 1:
            samples = json.loads(message.payload or b"[]")
            assert len(samples) == message.header["count"]
            with self._lock:
                self.samples.extend(samples)
                self.stored_batches.append((epoch, batch_seq))
            self.committed[epoch] = batch_seq
        elif batch_seq > last + 1:
            return  # an earlier batch is missing; the reader resends from it
        header = {"epoch": epoch, "batch_seq": self.committed[epoch]}
        sock.send_multipart([routing_id, *wire.encode(wire.ACK, header)])


class TapWatcher:
    """Subscribes to the reader's tap and keeps every counters message and every event."""

    def __init__(self, runtime_dir: Path) -> None:
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket = context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"plc_reader")
        self._socket.connect(wire.tap_endpoint(runtime_dir, "plc_reader"))
        self.counters: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    def drain(self) -> TapWatcher:
        while self._socket.poll(0):
            _topic, body = self._socket.recv_multipart()
            message = json.loads(body)
            if message["kind"] == "counters":
                self.counters = message
                self.history.append(message)
            else:
                self.events.append(message)
        return self

    def counter(self, name: str) -> Any:
        return self.drain().counters.get(name)

    def close(self) -> None:
        self._socket.close(linger=0)


class SilentPlc:
    """A TCP server that accepts connections and reads requests but never responds."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="silent-plc", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _address = self._listener.accept()
            except TimeoutError:
                continue
            self.connections.append(connection)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for connection in self.connections:
            connection.close()
        self._listener.close()


class ReaderProcess:
    """python -m processes.plc_reader with its output in reader.log.

    argv replaces the command line, for a reader started through a wrapper.
    """

    def __init__(self, config: Path, argv: list[str] | None = None) -> None:
        self.config = config
        self.argv = argv or [
            sys.executable, "-m", "processes.plc_reader", "--config", str(config)
        ]
        self.log_file = config.parent / "reader.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ReaderProcess:
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self, timeout_s: float = 5.0) -> tuple[int | None, float]:
        """SIGTERM the reader, and return its exit code (None if it hung) and the seconds taken."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.running():
            assert self.process is not None
            self.process.kill()
            self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


@pytest.fixture
def base() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="pb-", dir="/tmp"))
    (folder / "run").mkdir()
    return folder


@pytest.fixture
def simulator(base: Path) -> Iterator[PlcSimulator]:
    plc = PlcSimulator(base, bench_registers=10)
    plc.start()
    try:
        yield plc
    finally:
        plc.stop()


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], None]]]:
    """Collect stop functions of readers, buffers and taps, and run them even when a test fails."""
    actions: list[Callable[[], None]] = []
    try:
        yield actions
    finally:
        for action in reversed(actions):
            action()


def start_reader(
    config: Path, cleanup: list[Callable[[], None]], argv: list[str] | None = None
) -> ReaderProcess:
    reader = ReaderProcess(config, argv).start()
    cleanup.append(reader.kill)
    return reader


def start_buffer(
    base: Path, cleanup: list[Callable[[], None]], committed: dict[int, int] | None = None
) -> StandInBuffer:
    buffer = StandInBuffer(wire.endpoint(base / "run", wire.INGEST), committed).start()
    cleanup.append(buffer.stop)
    return buffer


def watch_tap(base: Path, cleanup: list[Callable[[], None]]) -> TapWatcher:
    tap = TapWatcher(base / "run")
    cleanup.append(tap.close)
    return tap


def by_name(samples: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [sample for sample in samples if sample["name"] == name]


def as_float32(value: float) -> float:
    result: float = struct.unpack(">f", struct.pack(">f", value))[0]
    return result


def caught_up(counters: dict[str, Any]) -> dict[str, Any] | None:
    if counters.get("unacked_batches") == 0 and counters.get("pending_samples", 10**9) < 60:
        return counters
    return None


def seqs_of(samples: list[dict[str, Any]]) -> list[int]:
    return [sample["seq"] for sample in samples]


def dumps(sample: dict[str, Any]) -> bytes:
    return json.dumps(sample, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    "value",
    [True, False, 0, -5, 65535, 2**63 - 1, -(2**63), 1.5, -0.0, 1e-7, 1e22, 21.900000000000002,
     -1234.5625, 3.4028234663852886e38],
)
def test_sample_encoder_good_matches_json_dumps(value: bool | int | float) -> None:
    encoded = SampleEncoder(7).good("line1.speed", value, 1764806400123, 41)

    expected = {"name": "line1.speed", "value": value, "quality": "good",
                "ts_ms": 1764806400123, "epoch": 7, "seq": 41}
    assert encoded == dumps(expected)


def test_sample_encoder_bad_matches_json_dumps() -> None:
    encoded = SampleEncoder(2).bad('tank "A"/level °C', "modbus exception 2", 1, 0)

    expected = {"name": 'tank "A"/level °C', "value": None, "quality": "bad",
                "reason": "modbus exception 2", "ts_ms": 1, "epoch": 2, "seq": 0}
    assert encoded == dumps(expected)


def test_sample_encoder_batch_is_json_array() -> None:
    encoder = SampleEncoder(1)
    samples = [encoder.good("a", 1, 10, 0), encoder.bad("b", "timeout", 10, 1)]

    decoded = json.loads(encode_batch(samples))

    assert [sample["seq"] for sample in decoded] == [0, 1]
    assert json.loads(encode_batch([])) == []


def test_group_schedule_on_time_advances_one_interval() -> None:
    schedule = GroupSchedule("fast", 0.01, 100.0, [])

    assert schedule.advance(100.004) == 0
    assert schedule.next_due == pytest.approx(100.01)


def test_group_schedule_late_poll_skips_missed_cycles() -> None:
    schedule = GroupSchedule("fast", 0.01, 100.0, [])

    # A poll that ended 0.305 s after it was due missed the cycles due at 100.01 to 100.30.
    assert schedule.advance(100.305) == 30
    assert schedule.next_due == pytest.approx(100.31)
    assert schedule.advance(100.311) == 0
    assert schedule.next_due == pytest.approx(100.32)


def test_plc_reader_values_match_simulator(
    base: Path, simulator: PlcSimulator, cleanup: list[Callable[[], None]]
) -> None:
    buffer = start_buffer(base, cleanup)
    reader = start_reader(write_config(base, simulator.port, tags=SIMULATOR_TAGS + FAULTY_TAGS),
                          cleanup)

    wait_until(
        lambda: len(by_name(buffer.snapshot(), "line1.counter")) >= 50
        and len(by_name(buffer.snapshot(), "line1.missing")) >= 2,
        10,
        "50 counter samples and 2 samples of the missing tag",
    )
    samples = buffer.snapshot()
    by_seq = {sample["seq"]: sample for sample in samples}

    # line1.counter, line1.sine and line1.check come from one read, in address order.
    counters = [s for s in by_name(samples, "line1.counter") if s["quality"] == "good"]
    assert len(counters) >= 50
    for counter in counters:
        sine = by_seq[counter["seq"] + 1]
        check = by_seq[counter["seq"] + 2]
        assert sine["name"] == "line1.sine"
        assert check["name"] == "line1.check"
        assert sine["ts_ms"] == counter["ts_ms"]
        assert isinstance(counter["value"], int)
        assert sine["value"] == as_float32(math.sin(counter["value"] / 100))
        assert check["value"] == (counter["value"] & 0xFFFF) ^ 0xA5A5

    values = [counter["value"] for counter in counters]
    assert values == sorted(values)
    assert values[-1] > values[0]

    serials = by_name(samples, "plc.serial_number")
    assert serials
    assert all(sample["value"] == SERIAL_NUMBER for sample in serials)
    temperatures = by_name(samples, "line1.temperature_c")
    assert temperatures
    assert all(15.0 <= sample["value"] <= 25.0 for sample in temperatures)
    assert all(isinstance(s["value"], bool) for s in by_name(samples, "line1.running"))
    assert all(isinstance(s["value"], bool) for s in by_name(samples, "line1.stopped"))

    missing = by_name(samples, "line1.missing")
    assert all(sample["quality"] == "bad" for sample in missing)
    assert all(sample["reason"] == "modbus exception 2" for sample in missing)
    assert all(sample["value"] is None for sample in missing)
    log = reader.log()
    assert "address 5000" in log
    assert log.count("read_failed") == 1, log

    unset = by_name(samples, "line1.unset")
    assert unset
    assert all(sample["quality"] == "bad" for sample in unset)
    assert all(sample["reason"] == "value is nan" for sample in unset)
    assert log.count("value_invalid") == 1, log


def test_plc_reader_seq_gapless_and_epoch_grows(
    base: Path, simulator: PlcSimulator, cleanup: list[Callable[[], None]]
) -> None:
    config = write_config(base, simulator.port)
    buffer = start_buffer(base, cleanup)
    reader = start_reader(config, cleanup)
    wait_until(lambda: len(buffer.snapshot()) >= 500, 10, "500 stored samples")

    code, elapsed_s = reader.terminate()
    assert code == 0, reader.log()
    assert elapsed_s < 5
    first_run = buffer.snapshot()
    first_epoch = first_run[0]["epoch"]
    assert {sample["epoch"] for sample in first_run} == {first_epoch}
    assert seqs_of(first_run) == list(range(len(first_run)))
    assert all(sample["quality"] == "good" for sample in first_run)

    start_reader(config, cleanup)
    wait_until(
        lambda: len(buffer.snapshot()) >= len(first_run) + 100, 10, "100 samples after restart"
    )
    second_run = buffer.snapshot()[len(first_run):]
    second_epoch = second_run[0]["epoch"]
    assert second_epoch > first_epoch
    assert {sample["epoch"] for sample in second_run} == {second_epoch}
    assert seqs_of(second_run) == list(range(len(second_run)))
    assert (base / "state" / "reader-epoch").read_text().strip() == str(second_epoch)


def test_plc_reader_lateness_buckets_count_every_poll(
    base: Path, simulator: PlcSimulator, cleanup: list[Callable[[], None]]
) -> None:
    start_buffer(base, cleanup)
    start_reader(write_config(base, simulator.port), cleanup)
    tap = watch_tap(base, cleanup)

    counters = wait_until(lambda: (tap.drain().counters.get("polls") or 0) >= 50 and
                          tap.counters, 10, "50 polls on the tap")
    buckets = counters["lateness_ms_buckets"]
    assert list(buckets)[:3] == ["0.5", "1", "2"]
    assert list(buckets)[-2:] == ["5000", "inf"]
    # A poll's lateness is counted just before the poll itself, so one device may be one
    # ahead.
    assert counters["polls"] <= sum(buckets.values()) <= counters["polls"] + 1
    later = wait_until(lambda: tap.drain().counters["polls"] >= counters["polls"] + 20 and
                       tap.counters, 10, "20 more polls")
    assert all(later["lateness_ms_buckets"][name] >= count for name, count in buckets.items())


def test_plc_reader_buffer_away_drops_oldest_then_resends(
    base: Path, simulator: PlcSimulator, cleanup: list[Callable[[], None]]
) -> None:
    queue_max = 300
    max_unacked = 4
    config = write_config(
        base,
        simulator.port,
        plc_keys=f"""
batch_max_samples = 20
queue_max_samples = {queue_max}
max_unacked_batches = {max_unacked}
ack_timeout_s = 0.3
""",
    )
    buffer = start_buffer(base, cleanup)
    reader = start_reader(config, cleanup)
    tap = watch_tap(base, cleanup)
    wait_until(lambda: len(buffer.snapshot()) >= 100, 10, "100 stored samples")

    # The buffer takes batches but never commits them, then goes away with them.
    buffer.acking = False
    wait_until(
        lambda: tap.counter("unacked_batches") == max_unacked, 10, "a full unacked window"
    )
    buffer.stop()
    stored_before = buffer.snapshot()
    wait_until(lambda: (tap.counter("dropped_samples") or 0) > 0, 10, "dropped samples")

    # Polling goes on with the queue bounded while the buffer is away.
    polls = tap.counter("polls")
    wait_until(lambda: tap.counter("polls") > polls + 50, 10, "50 more polls")
    assert tap.counter("pending_samples") <= queue_max
    assert reader.running()

    # Drops happen only while the queue is full, so once a counters message shows a short
    # queue, its dropped_samples is final.
    returned = start_buffer(base, cleanup, committed=buffer.committed)
    counters = wait_until(
        lambda: caught_up(tap.drain().counters), 10, "the backlog delivered to the buffer"
    )
    dropped = counters["dropped_samples"]
    code, _elapsed_s = reader.terminate()
    assert code == 0, reader.log()

    stored = stored_before + returned.snapshot()
    seqs = seqs_of(stored)
    assert seqs == sorted(set(seqs))
    gaps = [(before, after) for before, after in itertools.pairwise(seqs) if after != before + 1]
    assert seqs[0] == 0
    assert len(gaps) == 1, gaps
    drop_start, drop_end = gaps[0]
    assert drop_start >= stored_before[-1]["seq"] + max_unacked
    assert drop_end - drop_start - 1 == dropped
    batch_seqs = [batch_seq for _epoch, batch_seq in buffer.stored_batches
                  + returned.stored_batches]
    assert batch_seqs == list(range(len(batch_seqs)))
    assert "queue_full_dropped_oldest" in reader.log()
    assert "ingest_resend" in reader.log()


def test_plc_reader_plc_killed_reads_bad_then_recovers(
    base: Path, simulator: PlcSimulator, cleanup: list[Callable[[], None]]
) -> None:
    buffer = start_buffer(base, cleanup)
    reader = start_reader(write_config(base, simulator.port), cleanup)
    tap = watch_tap(base, cleanup)
    wait_until(lambda: len(buffer.snapshot()) >= 100, 10, "100 stored samples")

    simulator.kill()
    killed_at = len(buffer.snapshot())
    wait_until(
        lambda: sum(s["quality"] == "bad" for s in buffer.snapshot()[killed_at:]) >= 50,
        10,
        "50 bad samples after the PLC was killed",
    )
    assert reader.running()
    bad = [s for s in buffer.snapshot()[killed_at:] if s["quality"] == "bad"]
    assert {s["reason"] for s in bad} <= {"connection failed", "timeout"}
    assert all(s["value"] is None for s in bad)

    simulator.start()
    recovered_at = len(buffer.snapshot())
    wait_until(
        lambda: sum(s["quality"] == "good" for s in buffer.snapshot()[recovered_at:]) >= 50,
        10,
        "50 good samples after the PLC came back",
    )
    assert reader.running()
    assert seqs_of(buffer.snapshot()) == list(range(len(buffer.snapshot())))
    kinds = [event["kind"] for event in tap.drain().events]
    assert "plc_disconnected" in kinds
    assert "plc_connected" in kinds
    log = reader.log()
    assert log.count("plc_disconnected") == 1, log
    assert "plc_reconnected" in log


def test_plc_reader_silent_plc_reads_timeout(
    base: Path, cleanup: list[Callable[[], None]]
) -> None:
    plc = SilentPlc()
    cleanup.append(plc.close)
    buffer = start_buffer(base, cleanup)
    reader = start_reader(write_config(base, plc.port), cleanup)
    tap = watch_tap(base, cleanup)

    wait_until(lambda: len(plc.connections) >= 3, 10, "3 connect attempts")
    wait_until(
        lambda: sum(s["reason"] == "timeout" for s in buffer.snapshot()) >= 8,
        10,
        "8 samples that timed out",
    )
    wait_until(lambda: (tap.counter("overruns") or 0) > 0, 5, "overruns counted")
    assert reader.running()

    samples = buffer.snapshot()
    assert all(sample["quality"] == "bad" for sample in samples)
    assert {sample["reason"] for sample in samples} <= {"timeout", "connection failed"}
    log = reader.log()
    assert "timed out after 0.3 s" in log
    assert log.count("plc_unreachable") == 1, log
    assert "plc_disconnected" not in log
    assert "plc_connected" not in log


def test_plc_reader_sigterm_with_buffer_away_exits_zero(
    base: Path, simulator: PlcSimulator, cleanup: list[Callable[[], None]]
) -> None:
    reader = start_reader(write_config(base, simulator.port), cleanup)
    tap = watch_tap(base, cleanup)
    wait_until(lambda: (tap.counter("pending_samples") or 0) > 100, 10, "pending samples")

    code, elapsed_s = reader.terminate()

    assert code == 0, reader.log()
    assert elapsed_s < 5
    assert "ingest_flush_incomplete" in reader.log()


def test_plc_reader_bad_config_exits_two(base: Path) -> None:
    config = write_config(base, 1502, plc_keys="poll_interval_s = 1")
    result = subprocess.run(
        [sys.executable, "-m", "processes.plc_reader", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "plc.poll_interval_s" in result.stderr


def test_plc_reader_imports_no_heavy_modules() -> None:
    # The reader needs none of these: importlib.metadata alone adds about 3 MiB of resident
    # memory, and the others belong to the CLI or to other processes.
    script = (
        "import sys, processes.plc_reader.reader\n"
        "heavy = ('importlib.metadata', 'cryptography', 'supervisor', 'paho', 'lmdb')\n"
        "print(sorted(name for name in sys.modules if name.startswith(heavy)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=30, check=True)

    assert result.stdout.strip() == "[]"


# Name resolution, tested at the PlcConnection level with a resolve function that the test
# controls, against a real loopback listener, so the machine's resolver is never touched.

RESOLVER_LOGGER = "plcbridge.test_plc_reader.resolver"


@pytest.fixture
def listener() -> Iterator[int]:
    """A loopback TCP listener that takes connections into its backlog; yields its port."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        port: int = server.getsockname()[1]
        yield port
    finally:
        server.close()


def plc_settings(base: Path, host: str, port: int, timeout_s: float = 0.2) -> PlcSettings:
    config = load_config(write_config(base, port, host=host))
    return dataclasses.replace(config.plc, timeout_s=timeout_s)


def open_connection(
    base: Path, host: str, port: int, resolve: Resolve, cleanup: list[Callable[[], None]]
) -> PlcConnection:
    connection = PlcConnection(
        plc_settings(base, host, port), logging.getLogger(RESOLVER_LOGGER), resolve
    )
    cleanup.append(connection.close)
    return connection


def timed_connect(connection: PlcConnection) -> tuple[PlcReadError | None, float]:
    """Connect, and return the PlcReadError raised (None on success) and the seconds taken."""
    started = time.monotonic()
    try:
        connection.connect()
    except PlcReadError as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


def connects(connection: PlcConnection) -> bool:
    return timed_connect(connection)[0] is None


def log_lines(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.getMessage().startswith(event)]


def test_plc_connection_hung_lookup_bounded_by_timeout(
    base: Path, listener: int, caplog: pytest.LogCaptureFixture,
    cleanup: list[Callable[[], None]],
) -> None:
    caplog.set_level(logging.INFO, logger=RESOLVER_LOGGER)
    release = threading.Event()
    cleanup.append(release.set)
    calls: list[str] = []

    def resolve(host: str, port: int) -> list[Address]:
        calls.append(host)
        release.wait(10)
        return [(socket.AF_INET, ("127.0.0.1", port))]

    connection = open_connection(base, "plc.site.lan", listener, resolve, cleanup)

    # The attempt that starts the lookup waits for it for timeout_s (0.2 s), no longer.
    error, elapsed_s = timed_connect(connection)
    assert error is not None
    assert error.reason == "name resolution failed"
    assert "plc.site.lan" in str(error)
    assert 0.15 <= elapsed_s < 1.0

    # While that lookup runs, an attempt neither waits nor starts another lookup.
    error, elapsed_s = timed_connect(connection)
    assert error is not None
    assert error.reason == "name resolution failed"
    assert elapsed_s < 0.05
    assert calls == ["plc.site.lan"]

    release.set()
    wait_until(lambda: connects(connection), 5, "a connect after the lookup returned")
    assert connection.connected
    assert calls == ["plc.site.lan"]
    assert len(log_lines(caplog, "name_resolution_failed")) == 1
    assert len(log_lines(caplog, "name_resolution_recovered")) == 1


def test_plc_connection_reuses_last_good_address(
    base: Path, listener: int, caplog: pytest.LogCaptureFixture,
    cleanup: list[Callable[[], None]],
) -> None:
    caplog.set_level(logging.INFO, logger=RESOLVER_LOGGER)
    release = threading.Event()
    cleanup.append(release.set)
    calls: list[str] = []

    def resolve(host: str, port: int) -> list[Address]:
        # The first lookup returns at once, and every later one hangs until the test ends.
        calls.append(host)
        if len(calls) > 1:
            release.wait(10)
        return [(socket.AF_INET, ("127.0.0.1", port))]

    connection = open_connection(base, "plc.site.lan", listener, resolve, cleanup)
    assert timed_connect(connection)[0] is None

    connection.close()
    error, elapsed_s = timed_connect(connection)
    assert error is None
    assert connection.connected
    assert elapsed_s < 1.0

    connection.close()
    error, elapsed_s = timed_connect(connection)
    assert error is None
    assert elapsed_s < 0.05
    assert len(calls) == 2

    warnings = log_lines(caplog, "name_resolution_failed")
    assert len(warnings) == 1
    assert "fallback=127.0.0.1" in warnings[0].getMessage()
    assert warnings[0].levelno == logging.WARNING


def test_plc_connection_failed_lookup_logged_once(
    base: Path, listener: int, caplog: pytest.LogCaptureFixture,
    cleanup: list[Callable[[], None]],
) -> None:
    caplog.set_level(logging.INFO, logger=RESOLVER_LOGGER)
    failing = True
    calls: list[str] = []

    def resolve(host: str, port: int) -> list[Address]:
        calls.append(host)
        if failing:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, ("127.0.0.1", port))]

    connection = open_connection(base, "plc.site.lan", listener, resolve, cleanup)
    for _attempt in range(3):
        error, _elapsed_s = timed_connect(connection)
        assert error is not None
        assert error.reason == "name resolution failed"
        assert "Name or service not known" in str(error)
    assert len(calls) == 3

    failing = False
    assert timed_connect(connection)[0] is None
    assert len(log_lines(caplog, "name_resolution_failed")) == 1
    assert len(log_lines(caplog, "name_resolution_recovered")) == 1


def test_plc_connection_ip_literal_skips_resolver(
    base: Path, listener: int, cleanup: list[Callable[[], None]]
) -> None:
    calls: list[str] = []

    def resolve(host: str, port: int) -> list[Address]:
        calls.append(host)
        return []

    connection = open_connection(base, "127.0.0.1", listener, resolve, cleanup)
    assert timed_connect(connection)[0] is None
    assert calls == []
    assert literal_address("::1", 502) == (socket.AF_INET6, ("::1", 502))
    assert literal_address("plc.site.lan", 502) is None


@pytest.mark.parametrize("host", ["a..b", "x" * 64 + ".site.lan", ".plc"])
def test_plc_connection_invalid_host_reads_bad(
    base: Path, host: str, listener: int, caplog: pytest.LogCaptureFixture,
    cleanup: list[Callable[[], None]],
) -> None:
    caplog.set_level(logging.INFO, logger=RESOLVER_LOGGER)
    calls: list[str] = []

    def resolve(name: str, port: int) -> list[Address]:
        calls.append(name)
        return []

    connection = open_connection(base, host, listener, resolve, cleanup)
    for _attempt in range(2):
        error, _elapsed_s = timed_connect(connection)
        assert error is not None
        assert error.reason == "invalid host name"
        assert "plc.host" in str(error)
    assert calls == []

    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "plc.host" in errors[0].getMessage()
    assert host in errors[0].getMessage()


def test_plc_reader_invalid_host_runs_with_bad_samples(
    base: Path, cleanup: list[Callable[[], None]]
) -> None:
    buffer = start_buffer(base, cleanup)
    reader = start_reader(write_config(base, 1502, host="a..b"), cleanup)

    wait_until(lambda: len(buffer.snapshot()) >= 50, 10, "50 stored samples")
    assert reader.running()
    assert {s["reason"] for s in buffer.snapshot()} == {"invalid host name"}
    code, _elapsed_s = reader.terminate()
    assert code == 0, reader.log()

    log = reader.log()
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1, log
    assert "plc.host" in errors[0]
    assert "a..b" in errors[0]
    assert "Traceback" not in log


def namespace_support() -> str | None:
    """Return why a private network and mount namespace cannot be used here, or None."""
    if os.geteuid() != 0:
        return "needs root for unshare --net --mount"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip"
    probe = subprocess.run(
        ["unshare", "--mount", "--net", "sh", "-c", "ip link set lo up"],
        capture_output=True, text=True, timeout=10,
    )
    if probe.returncode != 0:
        return f"unshare failed: {probe.stderr.strip()}"
    return None


# Binds the silent DNS server's UDP socket, keeps it open across exec, then becomes the reader.
# Nothing ever reads the socket, so every query waits for the resolver's timeout.
SILENT_DNS_THEN_READER = """
import os, socket, sys
dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dns.bind(("127.0.0.1", 53))
dns.set_inheritable(True)
os.execv(sys.executable, [sys.executable, "-m", "processes.plc_reader", "--config", sys.argv[1]])
"""


def test_plc_reader_hung_dns_keeps_polling(base: Path, cleanup: list[Callable[[], None]]) -> None:
    reason = namespace_support()
    if reason is not None:
        pytest.skip(reason)

    # The reader runs in its own network namespace, where only lo exists, and its own mount
    # namespace, where resolv.conf names the silent server. Both vanish with the reader.
    # The ipc:// sockets are files, so the stand-in buffer and the tap still reach it.
    resolv_conf = base / "resolv.conf"
    resolv_conf.write_text("nameserver 127.0.0.1\noptions timeout:30 attempts:1\n")
    config = write_config(base, 1502, host="plc.site.lan")
    argv = [
        "unshare", "--mount", "--net", "sh", "-c",
        'ip link set lo up && mount --bind "$0" /etc/resolv.conf && exec "$1" -c "$2" "$3"',
        str(resolv_conf), sys.executable, SILENT_DNS_THEN_READER, str(config),
    ]
    buffer = start_buffer(base, cleanup)
    reader = start_reader(config, cleanup, argv)
    tap = watch_tap(base, cleanup)

    # With the lookup on the poll loop, a connect attempt would wait for the resolver's 30 s
    # timeout, and 100 polls could not happen within 10 s.
    wait_until(lambda: (tap.counter("polls") or 0) >= 100, 10, "100 polls")
    wait_until(lambda: len(buffer.snapshot()) >= 200, 10, "200 stored samples")
    assert reader.running()
    assert {s["reason"] for s in buffer.snapshot()} == {"name resolution failed"}

    # SIGTERM stops the reader while the lookup thread still waits for the silent server.
    code, elapsed_s = reader.terminate()
    assert code == 0, reader.log()
    assert elapsed_s < 4
    log = reader.log()
    assert log.count("name_resolution_failed") == 1, log
    assert "failed: timed out after 0.3 s" in log


def test_plc_reader_second_instance_exits_one(
    base: Path, simulator: PlcSimulator, cleanup: list[Callable[[], None]]
) -> None:
    config = write_config(base, simulator.port)
    buffer = start_buffer(base, cleanup)
    first = start_reader(config, cleanup)
    wait_until(lambda: len(buffer.snapshot()) >= 100, 10, "100 stored samples")
    epoch_file = base / "state" / "reader-epoch"
    epoch = epoch_file.read_text().strip()

    started = time.monotonic()
    second = subprocess.run(
        [sys.executable, "-m", "processes.plc_reader", "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert second.returncode == 1, second.stdout + second.stderr
    assert time.monotonic() - started < 10
    assert str(base / "state" / "reader.lock") in second.stdout
    assert first.process is not None
    assert f"pid {first.process.pid}" in second.stdout
    assert epoch_file.read_text().strip() == epoch

    # The first reader keeps its epoch, its tap and its place in the buffer.
    tap = watch_tap(base, cleanup)
    stored = len(buffer.snapshot())
    wait_until(lambda: len(buffer.snapshot()) >= stored + 100, 10, "100 more stored samples")
    assert {s["epoch"] for s in buffer.snapshot()} == {int(epoch)}
    assert wait_until(lambda: tap.counter("epoch"), 5, "counters on the tap") == int(epoch)
    assert first.running()


def first_line(log: str, event: str) -> str:
    return next(line for line in log.splitlines() if f" {event} " in line)


def test_plc_reader_buffer_unreachable_warns_then_recovers(
    base: Path, simulator: PlcSimulator, cleanup: list[Callable[[], None]]
) -> None:
    # With ack_timeout_s = 2 the warning comes after max(2 * 2 s, 5 s) without an ack.
    reader = start_reader(write_config(base, simulator.port, "ack_timeout_s = 2.0"), cleanup)
    tap = watch_tap(base, cleanup)
    events: dict[str, dict[str, Any]] = {}

    def on_tap(kind: str) -> bool:
        # The tap message can arrive a little after the log line, on a busy machine.
        events.update({event["kind"]: event for event in tap.drain().events})
        return kind in events

    wait_until(lambda: "buffer_unreachable" in reader.log(), 10, "buffer_unreachable logged")
    warning = first_line(reader.log(), "buffer_unreachable")
    assert " WARNING " in warning
    assert "pending_samples=" in warning
    wait_until(lambda: on_tap("buffer_unreachable"), 5, "buffer_unreachable on the tap")
    assert events["buffer_unreachable"]["pending_samples"] > 0
    assert events["buffer_unreachable"]["no_ack_s"] >= 5

    start_buffer(base, cleanup)
    wait_until(lambda: "buffer_reachable" in reader.log(), 10, "buffer_reachable logged")
    recovered = first_line(reader.log(), "buffer_reachable")
    assert " INFO " in recovered
    wait_until(lambda: on_tap("buffer_reachable"), 5, "buffer_reachable on the tap")
    assert reader.log().count("buffer_unreachable") == 1
