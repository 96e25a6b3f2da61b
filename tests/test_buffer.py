"""Tests of the buffer process: a real process on real LMDB files, driven over ZeroMQ.

A test-side DEALER plays the reader and another plays the uplink. The store is read from
the test with its own read-only LMDB environment while the buffer runs.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import pytest
import zmq

from common import payload, wire
from common.config import BufferSettings
from devstack.gateway_toml import gateway_dirs, gateway_toml
from processes.buffer import PUBACK_COMMIT_DELAY_S, Batch, BufferCore, PageStore
from tests.support.waiting import wait_until
from tests.support.zmq_peers import ReaderPeer, UplinkPeer, make_samples

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 10.0

# The buffer ignores the tags, but a configuration needs one.
SPEED_TAG = {"name": "line1.speed", "group": "fast", "table": "holding_register", "address": 0}


def buffer_config(root: Path, buffer_keys: dict[str, Any]) -> str:
    """Return a configuration with the folders below root and these [buffer] keys."""
    return gateway_toml(
        gateway={**gateway_dirs(root), "log_level": "INFO"},
        tags=[SPEED_TAG],
        buffer=buffer_keys,
        uplink={"mode": "mqtt"},
        broker={"host": "127.0.0.1", "client_id": "buffer-test"},
        credentials={"ca_file": f"{root}/ca.pem"},
    )


# -- the buffer process and its store ----------------------------------------------------


@dataclass
class BufferRun:
    """One buffer's runtime folder and configuration, started and stopped by the test."""

    root: Path
    config_path: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    logs: list[Path] = field(default_factory=list)

    @property
    def runtime_dir(self) -> Path:
        return self.root / "run"

    @property
    def store_dir(self) -> Path:
        return self.root / "state" / "buffer"

    def start(self) -> None:
        """Start the buffer and wait until it logs that its sockets are bound."""
        self.starts += 1
        log_path = self.root / "log" / f"buffer-{self.starts}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.logs.append(log_path)
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "processes.buffer", "--config", str(self.config_path)],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            )
        self.process = process
        wait_until(lambda: "buffer_ready" in self.log() or process.poll() is not None,
                   START_TIMEOUT_S, "buffer_ready in the log")
        assert process.poll() is None, f"buffer exited at start:\n{self.log()}"

    def log(self) -> str:
        return self.logs[-1].read_text() if self.logs else ""

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=5)

    def terminate(self, timeout_s: float = 5.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def assert_running(self) -> None:
        assert self.process is not None and self.process.poll() is None, self.log()


@dataclass
class StoreView:
    """The contents of the store, read by the test."""

    pages: dict[int, bytes]
    open_arrays: list[bytes]
    meta: dict[bytes, bytes]

    @property
    def stored_bytes(self) -> int:
        return sum(len(page) for page in self.pages.values()) + sum(
            len(array) for array in self.open_arrays)

    def meta_ints(self, key: bytes) -> tuple[int, ...]:
        value = self.meta[key]
        return struct.unpack(f">{len(value) // 8}q", value)


def read_store(store_dir: Path) -> StoreView:
    """Read every page, open batch and meta value in one read-only transaction."""
    env = lmdb.open(str(store_dir), readonly=True, max_dbs=4, max_readers=16)
    try:
        with env.begin() as txn:
            cursors = {name: txn.cursor(db=env.open_db(name.encode(), txn=txn))
                       for name in ("pages", "open", "meta")}
            pages = {struct.unpack(">Q", key)[0]: value for key, value in cursors["pages"]}
            open_arrays = [value[4:] for _key, value in cursors["open"]]
            meta = dict(cursors["meta"])
    finally:
        env.close()
    return StoreView(pages, open_arrays, meta)


@pytest.fixture
def make_buffer() -> Iterator[Callable[..., BufferRun]]:
    """Return a factory of buffers with the given [buffer] keys; stop them all afterwards."""
    runs: list[BufferRun] = []

    def factory(**buffer_keys: Any) -> BufferRun:
        root = Path(tempfile.mkdtemp(prefix="pb-", dir="/tmp"))
        config_path = root / "gateway.toml"
        config_path.write_text(buffer_config(root, buffer_keys))
        run = BufferRun(root, config_path)
        runs.append(run)
        return run

    try:
        yield factory
    finally:
        for run in runs:
            if run.process is not None and run.process.poll() is None:
                run.process.kill()
                run.process.wait(timeout=5)
            shutil.rmtree(run.root, ignore_errors=True)


# -- helpers that drive the peers --------------------------------------------------------


@dataclass
class Received:
    """Pages an uplink peer received, with the samples of each distinct page_seq."""

    pages: dict[int, bytes] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)
    duplicate_pages: int = 0

    def add(self, page_seq: int, page: bytes) -> None:
        self.order.append(page_seq)
        if page_seq in self.pages:
            # Delivery is at least once, and a redelivered page must be the same page.
            assert self.pages[page_seq] == page
            self.duplicate_pages += 1
        self.pages[page_seq] = page

    def samples(self) -> list[dict[str, Any]]:
        result = []
        for page_seq in sorted(self.pages):
            found_seq, samples = payload.parse_page(self.pages[page_seq])
            assert found_seq == page_seq
            result.extend(samples)
        return result


def drain_pages(uplink: UplinkPeer, session: str, received: Received,
                until: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Receive and acknowledge pages, repeating the link message, until the condition holds."""
    deadline = time.monotonic() + timeout_s
    next_link = 0.0
    while not until():
        now = time.monotonic()
        assert now < deadline, f"pages not drained in {timeout_s} s, got {len(received.pages)}"
        if now >= next_link:
            uplink.link(session, free=8)
            next_link = now + 0.2
        page = uplink.receive_page(0.05)
        if page is not None:
            received.add(page[0], page[2])
            uplink.puback(session, page[0])


def send_and_ack(reader: ReaderPeer, epoch: int, batches: list[list[dict[str, Any]]],
                 first_batch_seq: int = 0) -> None:
    for offset, samples in enumerate(batches):
        reader.send_batch(epoch, first_batch_seq + offset, samples)
    reader.wait_for_ack(epoch, first_batch_seq + len(batches) - 1)


def store_is_empty(run: BufferRun) -> bool:
    view = read_store(run.store_dir)
    return not view.pages and not view.open_arrays


# -- tests --------------------------------------------------------------------------------


def test_buffer_acked_batches_survive_kill(make_buffer, context) -> None:
    run = make_buffer(page_max_samples=100, page_max_age_ms=100, commit_max_batches=8)
    run.start()
    reader = ReaderPeer(context, run.runtime_dir)
    uplink = UplinkPeer(context, run.runtime_dir)
    epoch, batches, batch_size, window = 7, 300, 20, 16
    received = Received()

    next_seq = 0  # next batch_seq to send
    acked = -1
    last_progress = time.monotonic()
    killed = False
    checked_acks = 0
    next_check = 0
    deadline = time.monotonic() + 40
    next_link = 0.0
    while acked < batches - 1:
        assert time.monotonic() < deadline, f"only {acked + 1} of {batches} batches acked"

        # Like the real reader, keep a window of unacked batches and resend them in order
        # after a timeout.
        if time.monotonic() - last_progress > 0.5:
            next_seq = acked + 1
            last_progress = time.monotonic()
        while next_seq < batches and next_seq - acked <= window:
            samples = make_samples(epoch, next_seq * batch_size, batch_size)
            reader.send_batch(epoch, next_seq, samples)
            next_seq += 1

        ack = reader.receive_ack(0.02)
        if ack is not None and ack[1] > acked:
            acked = ack[1]
            last_progress = time.monotonic()
            if acked >= next_check:
                next_check = acked + 25
                # The ack arrives after the commit, so the batch's last sample is stored,
                # or already delivered.
                view = read_store(run.store_dir)
                stored = b"".join([*view.pages.values(), *view.open_arrays,
                                   *received.pages.values()])
                last_sample = f'"seq":{(acked + 1) * batch_size - 1}}}'.encode()
                assert last_sample in stored, f"acked batch {acked} is not in the store"
                checked_acks += 1

        if time.monotonic() >= next_link:
            uplink.link("session-1", free=4)
            next_link = time.monotonic() + 0.2
        page = uplink.receive_page(0)
        if page is not None:
            received.add(page[0], page[2])
            uplink.puback("session-1", page[0])

        if not killed and acked >= batches // 2:
            run.kill()
            killed = True
            acked_before_kill = acked
            run.start()

    drain_pages(uplink, "session-1", received, lambda: store_is_empty(run))

    # Batches acked before the kill were never resent, so finding them proves they were
    # committed before their ack.
    seqs = Counter(sample["seq"] for sample in received.samples())
    assert acked_before_kill >= batches // 2
    assert checked_acks > 0
    assert set(seqs) == set(range(batches * batch_size))
    assert max(seqs.values()) == 1
    print(f"duplicate pages redelivered after the kill: {received.duplicate_pages}")


def test_buffer_resent_batch_stored_once(make_buffer, context) -> None:
    run = make_buffer(page_max_age_ms=50)
    run.start()
    reader = ReaderPeer(context, run.runtime_dir)
    uplink = UplinkPeer(context, run.runtime_dir)
    batch = [make_samples(3, seq * 5, 5) for seq in range(6)]

    send_and_ack(reader, 3, batch[0:3])

    # A resent batch is acknowledged with the last committed batch_seq and not stored.
    reader.send_batch(3, 1, batch[1])
    reader.send_batch(3, 2, batch[2])
    assert reader.receive_ack(5.0) == (3, 2)

    # A batch after a gap is ignored, so the ack for batch 3 does not cover batch 4.
    reader.send_batch(3, 4, batch[4])
    reader.send_batch(3, 3, batch[3])
    acks = [reader.receive_ack(5.0)]
    while (ack := reader.receive_ack(0.2)) is not None:
        acks.append(ack)
    assert acks[-1] == (3, 3)
    assert (3, 4) not in acks

    # An older epoch is ignored, a newer one starts at batch_seq 0.
    reader.send_batch(2, 0, make_samples(2, 0, 5))
    assert reader.receive_ack(0.3) is None
    new_epoch = make_samples(4, 0, 5)
    reader.send_batch(4, 0, new_epoch)
    assert reader.receive_ack(5.0) == (4, 0)
    reader.send_batch(4, 0, new_epoch)
    assert reader.receive_ack(5.0) == (4, 0)

    received = Received()
    drain_pages(uplink, "s", received, lambda: store_is_empty(run))
    samples = [(sample["epoch"], sample["seq"]) for sample in received.samples()]
    assert samples == [(3, seq) for seq in range(20)] + [(4, seq) for seq in range(5)]
    assert "reader_epoch epoch=4 previous=3" in run.log()


def test_buffer_delivers_oldest_first_and_redelivers(make_buffer, context) -> None:
    run = make_buffer(page_max_samples=10, page_max_age_ms=60_000)
    run.start()
    reader = ReaderPeer(context, run.runtime_dir)
    uplink = UplinkPeer(context, run.runtime_dir)

    # Six batches of one page each: the sixth stays open, so pages 0 to 4 are sealed.
    send_and_ack(reader, 1, [make_samples(1, seq * 10, 10) for seq in range(6)])
    assert sorted(read_store(run.store_dir).pages) == [0, 1, 2, 3, 4]

    def next_seqs(count: int) -> list[int]:
        seqs: list[int] = []
        for _ in range(count):
            page = uplink.receive_page(5.0)
            assert page is not None, f"expected {count} pages, got {seqs}"
            assert page[1] == 10
            seqs.append(page[0])
        return seqs

    # With two pages of credit, the two oldest pages arrive and nothing more.
    uplink.link("s1", free=2)
    assert next_seqs(2) == [0, 1]
    assert uplink.receive_page(0.3) is None

    # A puback deletes that page only and returns one page of credit.
    uplink.puback("s1", 1)
    assert next_seqs(1) == [2]
    wait_until(lambda: 1 not in read_store(run.store_dir).pages, 5.0, "page 1 deleted")
    assert sorted(read_store(run.store_dir).pages) == [0, 2, 3, 4]

    # A repeated link up of the same session resets nothing, and a puback of an unknown
    # page from an old session changes nothing.
    uplink.link("s1", free=2)
    uplink.puback("old-session", 99)
    assert uplink.receive_page(0.3) is None
    run.assert_running()

    # A new session gets every unacknowledged page again, oldest first.
    uplink.link("s2", free=10)
    assert next_seqs(4) == [0, 2, 3, 4]

    # So does a link down followed by an up.
    uplink.link("s2", state="down", free=0)
    uplink.link("s3", free=10)
    assert next_seqs(4) == [0, 2, 3, 4]
    for page_seq in (0, 2, 3, 4):
        uplink.puback("s3", page_seq)
    wait_until(lambda: not read_store(run.store_dir).pages, 5.0, "all pages deleted")
    assert uplink.receive_page(0.2) is None


def test_buffer_acked_page_not_resent_before_delete(make_buffer, context) -> None:
    run = make_buffer(page_max_samples=10, page_max_age_ms=60_000)
    run.start()
    reader = ReaderPeer(context, run.runtime_dir)
    uplink = UplinkPeer(context, run.runtime_dir)
    # Pages 0 and 1 are sealed, and the third batch stays in the open page.
    send_and_ack(reader, 1, [make_samples(1, seq * 10, 10) for seq in range(3)])

    uplink.link("s1", free=2)
    first = uplink.receive_page(5.0)
    second = uplink.receive_page(5.0)
    assert first is not None and second is not None
    assert (first[0], second[0]) == (0, 1)

    # The puback and the new session arrive well within the delete's commit delay, so page
    # 0 is still stored when page 1 becomes eligible again. Page 0 must not come back.
    uplink.puback("s1", 0)
    uplink.link("s2", free=10)
    resent = []
    while (page := uplink.receive_page(0.5)) is not None:
        resent.append(page[0])
    assert resent == [1]
    wait_until(lambda: sorted(read_store(run.store_dir).pages) == [1], 5.0, "page 0 deleted")


def test_buffer_deletes_committed_after_delay(tmp_path) -> None:
    settings = BufferSettings(max_bytes=1 << 30, page_max_samples=10, page_max_bytes=65_536,
                              page_max_age_ms=60_000, commit_max_batches=64, sync="full")
    logger = logging.getLogger("test.buffer")
    store = PageStore(tmp_path / "buffer", settings, logger)
    try:
        core = BufferCore(store, logger)

        def batch(batch_seq: int, count: int) -> Batch:
            samples = make_samples(1, batch_seq * 10, count)
            return Batch(b"reader", 1, batch_seq, count, payload.encode_samples(samples))

        # Pages 0 and 1 are sealed, and the third batch stays in the open page.
        batches = [batch(batch_seq, 10) for batch_seq in range(3)]
        now = time.monotonic()
        core.commit(batches, now)
        assert store.state.page_count == 2
        commits = core.counters["commits"]

        # Pubacks alone wait for the delay, then go in one transaction.
        core.add_pubacks([0], now)
        core.add_pubacks([1], now + PUBACK_COMMIT_DELAY_S / 2)
        assert core.commit([], now + PUBACK_COMMIT_DELAY_S / 2).acked_pages == 0
        assert core.counters["commits"] == commits
        assert store.state.page_count == 2
        assert core.commit([], now + PUBACK_COMMIT_DELAY_S).acked_pages == 2
        assert core.counters["commits"] == commits + 1
        assert store.state.page_count == 0
        assert core.deletes_deadline is None

        # A batch takes pending deletes along at once, even of an unknown page, and
        # flush_deletes forces a commit.
        core.add_pubacks([7], now)
        outcome = core.commit([batch(3, 1)], now)
        assert outcome.stored_batches == 1
        assert not core.pending_deletes
        assert store.state.page_count == 1  # the batch sealed page 2 and stays open itself
        core.add_pubacks([2], now)
        assert core.commit([], now, flush_deletes=True).acked_pages == 1
        assert not core.pending_deletes
    finally:
        store.close()
    assert read_store(tmp_path / "buffer").pages == {}


def test_buffer_sigterm_commits_pending_deletes(make_buffer, context) -> None:
    run = make_buffer(page_max_samples=10, page_max_age_ms=60_000)
    run.start()
    reader = ReaderPeer(context, run.runtime_dir)
    uplink = UplinkPeer(context, run.runtime_dir)
    send_and_ack(reader, 1, [make_samples(1, seq * 10, 10) for seq in range(3)])

    uplink.link("s1", free=2)
    pages = [uplink.receive_page(5.0) for _ in range(2)]
    assert [page[0] for page in pages if page is not None] == [0, 1]
    uplink.puback("s1", 0)
    uplink.puback("s1", 1)

    # The buffer may stop before the delete's commit delay has passed, and still deletes.
    assert run.terminate() == 0
    assert read_store(run.store_dir).pages == {}


def test_buffer_page_bounds_count_and_bytes(make_buffer, context) -> None:
    run = make_buffer(page_max_samples=50, page_max_bytes=2048, page_max_age_ms=50)
    run.start()
    reader = ReaderPeer(context, run.runtime_dir)
    uplink = UplinkPeer(context, run.runtime_dir)

    # Batch sizes below, at and above a page, and a split batch whose "reason" strings
    # contain the "},{" that the fast split path cuts at.
    sent: list[dict[str, Any]] = []
    sizes = [1, 7, 49, 50, 51, 130, 3]
    for batch_seq, size in enumerate(sizes):
        samples = make_samples(1, len(sent), size, name=f"tag{batch_seq}" * (batch_seq + 1))
        sent.extend(samples)
        reader.send_batch(1, batch_seq, samples)
    tricky = make_samples(1, len(sent), 120, quality="bad", reason='timeout },{"x":1} retry')
    sent.extend(tricky)
    reader.send_batch(1, len(sizes), tricky)
    reader.wait_for_ack(1, len(sizes))

    received = Received()
    drain_pages(uplink, "s", received, lambda: store_is_empty(run))
    for page in received.pages.values():
        _seq, samples = payload.parse_page(page)
        assert len(page) <= 2048
        assert 1 <= len(samples) <= 50
    assert received.samples() == sent


def test_buffer_page_bytes_at_most_262144(make_buffer, context) -> None:
    run = make_buffer(page_max_samples=100_000, page_max_bytes=262_144, page_max_age_ms=50)
    run.start()
    reader = ReaderPeer(context, run.runtime_dir)
    uplink = UplinkPeer(context, run.runtime_dir)

    samples = make_samples(1, 0, 6000, name="plant.area4.line1.speed_rpm")
    array = payload.encode_samples(samples)
    assert len(array) > 2 * 262_144
    reader.send_array(1, 0, len(samples), array)
    reader.wait_for_ack(1, 0)

    received = Received()
    drain_pages(uplink, "s", received, lambda: store_is_empty(run))
    sizes = [len(page) for page in received.pages.values()]
    assert max(sizes) <= 262_144
    assert len(sizes) == 3  # three pages are enough only when each is filled close to the bound
    assert received.samples() == samples


def test_buffer_page_sealed_by_age(make_buffer, context) -> None:
    run = make_buffer(page_max_age_ms=300)
    run.start()
    reader = ReaderPeer(context, run.runtime_dir)
    uplink = UplinkPeer(context, run.runtime_dir)
    uplink.link("s", free=4)

    started = time.monotonic()
    reader.send_batch(1, 0, make_samples(1, 0, 3))
    page = uplink.receive_page(5.0)
    elapsed = time.monotonic() - started

    assert page is not None
    assert page[1] == 3
    assert 0.29 <= elapsed < 3.0


def test_buffer_page_seq_monotonic_across_restarts(make_buffer, context) -> None:
    run = make_buffer(page_max_age_ms=50)
    uplink = UplinkPeer(context, run.runtime_dir)
    reader = ReaderPeer(context, run.runtime_dir)
    received = Received()

    # Each round stores one page, delivers and deletes it, then stops the buffer with
    # SIGTERM or kill -9.
    for round_number, restart in enumerate(("terminate", "kill", "terminate")):
        run.start()
        epoch = round_number + 1
        send_and_ack(reader, epoch, [make_samples(epoch, 0, 4)])
        drain_pages(uplink, f"s{round_number}", received, lambda: store_is_empty(run))
        if restart == "kill":
            run.kill()
        else:
            assert run.terminate() == 0

    assert received.order == [0, 1, 2]


def test_buffer_disk_bound_drops_oldest_pages(make_buffer, context) -> None:
    max_bytes = 1 << 20
    run = make_buffer(max_bytes=max_bytes, page_max_samples=1000, page_max_bytes=65_536,
                      page_max_age_ms=60_000)
    run.start()
    reader = ReaderPeer(context, run.runtime_dir)

    # With no uplink, about 4 MiB of samples arrive, so about three quarters are dropped.
    batches, batch_size = 400, 100
    for batch_seq in range(batches):
        reader.send_batch(1, batch_seq, make_samples(1, batch_seq * batch_size, batch_size))
        if batch_seq % 16 == 15:
            reader.wait_for_ack(1, batch_seq - 8)
    reader.wait_for_ack(1, batches - 1)

    view = read_store(run.store_dir)
    dropped_pages, dropped_samples = struct.unpack(">QQ", view.meta[b"dropped"])
    assert view.stored_bytes <= max_bytes
    assert struct.unpack(">Q", view.meta[b"stored_bytes"])[0] == view.stored_bytes
    assert dropped_pages > 0
    assert min(view.pages) == dropped_pages  # exactly the oldest pages went
    assert "pages_dropped" in run.log()
    assert (run.store_dir / "data.mdb").stat().st_size < 4 * max_bytes + (64 << 20)
    run.assert_running()

    # What is left is the newest data, and it accounts for every sample sent.
    uplink = UplinkPeer(context, run.runtime_dir)
    received = Received()
    sealed = set(view.pages)
    drain_pages(uplink, "s", received, lambda: sealed <= set(received.pages))
    seqs = [sample["seq"] for sample in received.samples()]
    open_samples = sum(len(json.loads(array)) for array in view.open_arrays)
    assert seqs == list(range(dropped_samples, batches * batch_size - open_samples))


def test_buffer_map_full_drops_and_retries(tmp_path) -> None:
    settings = BufferSettings(max_bytes=1 << 30, page_max_samples=1000, page_max_bytes=65_536,
                              page_max_age_ms=1000, commit_max_batches=64, sync="off")
    logger = logging.getLogger("test.buffer")
    # With a 1 MiB map under a 1 GiB bound, the map fills long before buffer.max_bytes.
    store = PageStore(tmp_path / "buffer", settings, logger, map_size_bytes=1 << 20)
    try:
        core = BufferCore(store, logger)
        samples_per_batch, batch_seq = 500, 0
        for _ in range(40):
            batches = []
            for _ in range(4):
                samples = make_samples(1, batch_seq * samples_per_batch, samples_per_batch)
                array = payload.encode_samples(samples)
                batches.append(Batch(b"reader", 1, batch_seq, samples_per_batch, array))
                batch_seq += 1
            outcome = core.commit(batches, time.monotonic())
            assert outcome.acks == {b"reader": (1, batch_seq - 1)}
        state = store.state
        assert state.dropped_pages > 0
        assert state.last_batch_seq == batch_seq - 1
    finally:
        store.close()

    # The store reopens with the counters matching what it holds.
    view = read_store(tmp_path / "buffer")
    assert struct.unpack(">Q", view.meta[b"stored_bytes"])[0] == view.stored_bytes
    dropped_pages, dropped_samples = struct.unpack(">QQ", view.meta[b"dropped"])
    assert dropped_pages == state.dropped_pages
    assert min(view.pages) == dropped_pages
    kept = sum(len(payload.parse_page(page)[1]) for page in view.pages.values())
    open_samples = sum(len(json.loads(array)) for array in view.open_arrays)
    assert kept + open_samples + dropped_samples == batch_seq * samples_per_batch


def test_buffer_sigterm_exits_zero(make_buffer, context) -> None:
    run = make_buffer()
    run.start()
    reader = ReaderPeer(context, run.runtime_dir)
    send_and_ack(reader, 1, [make_samples(1, 0, 10)])

    started = time.monotonic()
    assert run.terminate(timeout_s=5.0) == 0
    assert time.monotonic() - started < 5.0
    assert "stop version=" in run.log()


def test_buffer_second_instance_rejected(make_buffer) -> None:
    run = make_buffer()
    run.start()
    second = subprocess.run(
        [sys.executable, "-m", "processes.buffer", "--config", str(run.config_path)],
        cwd=REPO, capture_output=True, text=True, timeout=10,
    )
    assert second.returncode == 1
    assert "locked by another buffer process" in second.stdout
    run.assert_running()


def test_buffer_malformed_messages_ignored(make_buffer, context) -> None:
    run = make_buffer(page_max_age_ms=50)
    run.start()
    reader = ReaderPeer(context, run.runtime_dir)
    uplink = UplinkPeer(context, run.runtime_dir)

    reader.send_frames([b"batch"])
    reader.send_frames([b"batch", b"{not json"])
    reader.send_frames(wire.encode(wire.BATCH, {"epoch": 1, "batch_seq": -1, "count": 1}, b"[]"))
    uplink.send_frames(wire.encode(b"hello", {"session": "s"}))
    uplink.send_frames(wire.encode(wire.LINK, {"state": "up", "free": 3}))
    uplink.send_frames(wire.encode(wire.PUBACK, {"session": "s", "page_seq": "x"}))

    # Batches with a valid header but a bad payload are acknowledged and discarded. The
    # first fails the shape check, and the second must be split and fails to parse.
    reader.send_array(1, 0, 3, b"{not json at all}")
    reader.send_array(1, 1, 2000, b'[{"seq":1},{oops}]')
    reader.wait_for_ack(1, 1)

    send_and_ack(reader, 1, [make_samples(1, 0, 5)], first_batch_seq=2)
    received = Received()
    drain_pages(uplink, "s", received, lambda: store_is_empty(run))
    assert [sample["seq"] for sample in received.samples()] == list(range(5))
    assert struct.unpack(">QQ", read_store(run.store_dir).meta[b"dropped"]) == (0, 2003)
    assert "bad_message" in run.log()
    assert "batch_rejected" in run.log()
    run.assert_running()


def test_buffer_tap_publishes_counters(make_buffer, context) -> None:
    # The page stays open for the whole test: with the default age of 1 s it could be sealed
    # before the first counters after the commit, which come within a second too.
    run = make_buffer(page_max_age_ms=60_000)
    run.start()
    subscriber = wire.make_socket(context, zmq.SUB, wire.TAP_HWM, linger_ms=0)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"buffer")
    subscriber.connect(wire.tap_endpoint(run.runtime_dir, "buffer"))
    reader = ReaderPeer(context, run.runtime_dir)
    send_and_ack(reader, 1, [make_samples(1, 0, 10)])

    deadline = time.monotonic() + 5
    counters: dict[str, Any] = {}
    while not counters.get("batches_committed"):
        assert time.monotonic() < deadline, "no counters with the committed batch on the tap"
        if subscriber.poll(100):
            _topic, body = subscriber.recv_multipart()
            message = json.loads(body)
            if message["kind"] == "counters":
                counters = message
    for key in ("pages", "bytes", "open_samples", "batches_committed", "samples_committed",
                "duplicates", "pages_sent", "pages_acked", "dropped_pages", "dropped_samples",
                "commits"):
        assert key in counters
    assert counters["samples_committed"] == 10
    assert counters["open_samples"] == 10
