"""Tests of the buffer's bounds and overflow: drop-oldest, reject-new, the age limit, gap
records, a full disk, an unreadable store, free page reuse and `plcbridge buffer`.

Real buffer processes on real LMDB files, the real reader sender, and for the gap record a
real uplink process publishing to a real mosquitto.
"""

# The make_buffer fixture comes from tests.test_buffer, and ruff takes the test arguments
# that receive it for redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import json
import logging
import os
import queue
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest
import zmq

from common import payload, wire
from common.config import BufferSettings, load_config
from common.errors import ConfigError
from common.tap import Tap
from devstack.gateway_toml import gateway_dirs, gateway_toml
from processes.buffer import (
    STATUS_FILE,
    Batch,
    BufferCore,
    PageStore,
    StoreUnreadable,
    sample_span,
)
from processes.plc_reader.reader import PlcReader
from processes.plc_reader.sender import IngestSender
from tests.support.broker import Broker, Subscriber
from tests.support.tmpfs import mounted_tmpfs
from tests.support.waiting import wait_until
from tests.support.zmq_peers import ReaderPeer, UplinkPeer, make_samples
from tests.test_buffer import (  # noqa: F401 - make_buffer is a fixture
    SPEED_TAG,
    BufferRun,
    Received,
    drain_pages,
    make_buffer,
    read_store,
)

REPO = Path(__file__).resolve().parent.parent
PLCBRIDGE = Path(sys.executable).parent / "plcbridge"
LOGGER = logging.getLogger("test.buffer_overflow")


def settings(**overrides: Any) -> BufferSettings:
    values: dict[str, Any] = dict(max_bytes=1 << 30, page_max_samples=100,
                                  page_max_bytes=65_536, page_max_age_ms=60_000,
                                  commit_max_batches=64, sync="off")
    values.update(overrides)
    return BufferSettings(**values)


def batch_of(epoch: int, batch_seq: int, samples: list[dict[str, Any]]) -> Batch:
    return Batch(b"reader", epoch, batch_seq, len(samples), payload.encode_samples(samples))


def fill_with_reader(reader: ReaderPeer, epoch: int, batches: int, batch_size: int) -> None:
    """Send batches in windows of 16, as the real reader does, until all are acknowledged."""
    for batch_seq in range(batches):
        reader.send_batch(epoch, batch_seq, make_samples(epoch, batch_seq * batch_size,
                                                         batch_size))
        if batch_seq % 16 == 15:
            reader.wait_for_ack(epoch, batch_seq - 8)
    reader.wait_for_ack(epoch, batches - 1)


def fill_and_check(run: BufferRun, reader: ReaderPeer, epoch: int, batches: int,
                   batch_size: int) -> None:
    """fill_with_reader, with the buffer's log in the failure message."""
    try:
        fill_with_reader(reader, epoch, batches, batch_size)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; buffer log:\n{run.log()[-4000:]}") from None


def read_status(run: BufferRun) -> dict[str, Any]:
    status: dict[str, Any] = json.loads((run.runtime_dir / STATUS_FILE).read_text())
    return status


def gap_of(page: bytes) -> dict[str, Any] | None:
    gap: dict[str, Any] | None = json.loads(page).get("gap")
    return gap


# -- configuration -------------------------------------------------------------------------


def test_buffer_config_sync_modes(tmp_path: Path) -> None:
    source = (REPO / "devstack" / "demo.toml").read_text()
    config_path = tmp_path / "gateway.toml"

    def load(buffer_keys: str) -> BufferSettings:
        text = source.replace("[buffer]", f"[buffer]\n{buffer_keys}", 1)
        return load_config(config_path, text).buffer

    assert "[buffer]" in source
    assert load("").sync == "full"
    assert load('sync = "nometasync"').sync == "nometasync"
    assert load("sync = true").sync == "full"
    assert load("sync = false").sync == "off"
    defaults = load("")
    assert defaults.overflow_policy == "drop-oldest"
    assert defaults.commit_max_delay_ms == 0
    assert defaults.max_age_s == 0.0
    with pytest.raises(ConfigError, match=r"buffer\.sync: 'fast'; expected one of full"):
        load('sync = "fast"')
    with pytest.raises(ConfigError, match=r"buffer\.overflow_policy: 'drop-newest'"):
        load('overflow_policy = "drop-newest"')
    with pytest.raises(ConfigError, match=r"buffer\.commit_max_delay_ms: 5000"):
        load("commit_max_delay_ms = 5000")


# -- drop-oldest, gap records and the age limit ---------------------------------------------


def test_buffer_drop_oldest_gap_record_first(make_buffer, context) -> None:
    run = make_buffer(max_bytes=1 << 20, page_max_samples=1000, page_max_age_ms=60_000)
    run.start()
    reader = ReaderPeer(context, run.runtime_dir)
    batches, batch_size = 300, 100
    fill_with_reader(reader, 1, batches, batch_size)

    view = read_store(run.store_dir)
    drops = json.loads(view.meta[b"drops"])
    dropped_pages, dropped_samples, _batches = drops["max_bytes"]
    assert dropped_pages == min(view.pages)  # exactly the oldest pages went
    assert dropped_samples > 0
    open_gap = json.loads(view.meta[b"open_gaps"])["max_bytes"]
    assert (open_gap["pages"], open_gap["samples"]) == (dropped_pages, dropped_samples)

    # The gap record goes out first when the link comes up, then the pages, oldest first.
    uplink = UplinkPeer(context, run.runtime_dir)
    uplink.link("s", free=4)
    first = uplink.receive_page(5.0)
    assert first is not None
    gap = gap_of(first[2])
    assert gap is not None, first
    assert first[1] == 0
    assert first[0] > max(view.pages)  # a page_seq of its own, never reused
    assert gap["reason"] == "max_bytes"
    assert (gap["pages"], gap["samples"], gap["batches"]) == (dropped_pages, dropped_samples, 0)
    assert (gap["first_page_seq"], gap["last_page_seq"]) == (0, dropped_pages - 1)
    base_ts = make_samples(1, 0, 1)[0]["ts_ms"]
    assert (gap["first_ts_ms"], gap["last_ts_ms"]) == (base_ts, base_ts + dropped_samples - 1)
    assert (gap["first_epoch"], gap["last_epoch"]) == (1, 1)
    assert payload.parse_page(first[2]) == (first[0], [])

    received = Received()
    received.add(first[0], first[2])
    uplink.puback("s", first[0])
    sealed = set(view.pages)
    drain_pages(uplink, "s", received, lambda: sealed <= set(received.pages))
    data_pages = [seq for seq in received.order if seq in sealed]
    assert data_pages == sorted(sealed)
    seqs = [sample["seq"] for seq in data_pages
            for sample in payload.parse_page(received.pages[seq])[1]]
    assert seqs == list(range(dropped_samples, dropped_samples + len(seqs)))

    # Once acknowledged, the gap record is deleted and not sent again.
    wait_until(lambda: b"gaps" not in read_store(run.store_dir).meta
               and read_status(run)["gap_records"] == 0, 5.0, "the gap record deleted")
    assert json.loads(read_store(run.store_dir).meta[b"open_gaps"]) == {}


def test_buffer_max_age_drops_old_pages(tmp_path: Path) -> None:
    store = PageStore(tmp_path / "buffer", settings(max_age_s=3600.0, page_max_samples=10),
                      LOGGER)
    try:
        core = BufferCore(store, LOGGER)
        now_ms = int(time.time() * 1000)
        old = make_samples(1, 0, 20)
        for sample in old:
            sample["ts_ms"] = now_ms - 7_200_000 + sample["seq"]
        fresh = make_samples(1, 20, 20)
        for sample in fresh:
            sample["ts_ms"] = now_ms + sample["seq"]
        core.commit([batch_of(1, 0, old), batch_of(1, 1, fresh)], 0.0)
        assert store.state.page_count == 3  # the fourth page stays open

        # The first commit checked the age before storing, so the next check drops them.
        core.next_age_check = 0.0
        outcome = core.commit([], 1.0)
        assert [count for _seq, count in outcome.dropped["max_age"]] == [10, 10]
        assert store.state.page_count == 1
        assert store.state.drops == {"max_age": [2, 20, 0]}
        gap = store.state.open_gaps["max_age"]
        assert (gap["first_ts_ms"], gap["last_ts_ms"]) == (now_ms - 7_200_000,
                                                           now_ms - 7_200_000 + 19)

        # Nothing more is old enough, so the next check commits nothing.
        commits = core.counters["commits"]
        core.next_age_check = 0.0
        core.commit([], 2.0)
        assert core.counters["commits"] == commits
    finally:
        store.close()


def test_buffer_sample_span_reads_keys_only() -> None:
    samples = make_samples(4, 7, 3, name='odd "ts_ms":1 name')
    array = payload.encode_samples(samples)
    assert sample_span(array) == (samples[0]["ts_ms"], samples[-1]["ts_ms"], 4, 4)
    assert sample_span(b"[]") == (None, None, None, None)


# -- reject-new ------------------------------------------------------------------------------


def test_buffer_reject_new_reader_counts(make_buffer, context, caplog) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER.name)
    run = make_buffer(max_bytes=1 << 20, overflow_policy="reject-new", page_max_samples=1000)
    run.start()
    config = load_config(run.config_path)
    tap = Tap(context, run.runtime_dir, "plc_reader")
    sender = IngestSender(context, wire.endpoint(run.runtime_dir, wire.INGEST), config.plc,
                          epoch=5, logger=LOGGER, tap=tap)
    try:
        total = 40_000
        for first in range(0, total, 200):
            sender.enqueue([json.dumps(sample, separators=(",", ":")).encode()
                            for sample in make_samples(5, first, 200)])
            sender.pump()
            sender.wait_for_acks(0.001)
        deadline = time.monotonic() + 20
        while not sender.idle:
            assert time.monotonic() < deadline, "the reader's batches were not all acked"
            sender.pump()
            sender.wait_for_acks(0.05)

        # The reader's queue never overflowed, so every sample it dropped was rejected.
        assert sender.rejected_samples > 0
        assert sender.dropped_samples == sender.rejected_samples
        rejected = json.loads(read_store(run.store_dir).meta[b"rejected"])
        assert rejected["epoch"] == 5
        assert rejected["samples"] == sender.rejected_samples
        assert rejected["batches"] == sender.rejected_batches

        # The reader's tap shows the rejected samples apart from the other drops.
        counters = PlcReader([], queue.SimpleQueue(), sender, tap, 5).counters()
        assert counters["rejected_samples"] == sender.rejected_samples
        assert counters["dropped_samples"] == sender.dropped_samples
        warnings = [record.getMessage() for record in caplog.records
                    if record.getMessage().startswith("buffer_rejected")]
        assert len(warnings) == 1  # rate-limited
        assert "reject-new" in warnings[0]
    finally:
        sender.close()
        tap.close()

    # The store contains the oldest data, up to the bound, and nothing else.
    view = read_store(run.store_dir)
    assert view.stored_bytes <= 1 << 20
    stored = [sample["seq"] for page in sorted(view.pages)
              for sample in payload.parse_page(view.pages[page])[1]]
    stored += [sample["seq"] for array in view.open_arrays for sample in json.loads(array)]
    assert len(stored) + sender.rejected_samples == total
    assert stored == list(range(len(stored)))
    drops = json.loads(view.meta[b"drops"])
    assert drops == {"max_bytes": [0, sender.rejected_samples, sender.rejected_batches]}

    # The gap record reports the same counts.
    uplink = UplinkPeer(context, run.runtime_dir)
    uplink.link("s", free=2)
    first_page = uplink.receive_page(5.0)
    assert first_page is not None
    gap = gap_of(first_page[2])
    assert gap is not None
    assert (gap["reason"], gap["samples"], gap["batches"], gap["pages"]) == (
        "max_bytes", sender.rejected_samples, sender.rejected_batches, 0)
    assert gap["first_ts_ms"] == make_samples(5, len(stored), 1)[0]["ts_ms"]
    assert "batches_rejected" in run.log()


def test_buffer_reject_new_ack_totals(make_buffer, context) -> None:
    run = make_buffer(max_bytes=1 << 20, overflow_policy="reject-new", page_max_samples=1000)
    run.start()
    reader = ReaderPeer(context, run.runtime_dir)
    big = make_samples(1, 0, 2000, name="x" * 600)
    array = payload.encode_samples(big)
    assert len(array) > 1 << 20

    # A batch larger than the bound is rejected; its ack carries the epoch's totals, and so
    # does a duplicate's ack.
    for _ in range(2):
        reader.send_array(1, 0, len(big), array)
        message = reader.receive(5.0)
        assert message is not None
        assert message.header == {"epoch": 1, "batch_seq": 0, "rejected_samples": 2000,
                                  "rejected_batches": 1}

    # A new epoch starts its totals at 0, and the totals survive a restart.
    reader.send_batch(2, 0, make_samples(2, 0, 3))
    message = reader.receive(5.0)
    assert message is not None
    assert message.header["rejected_samples"] == 0
    reader.send_array(2, 1, len(big), array)
    assert reader.receive(5.0) is not None
    run.kill()
    run.start()
    reader.send_array(2, 1, len(big), array)
    message = reader.receive(5.0)
    assert message is not None
    assert message.header == {"epoch": 2, "batch_seq": 1, "rejected_samples": 2000,
                              "rejected_batches": 1}


def test_buffer_map_full_reject_new(tmp_path: Path) -> None:
    # With a 1 MiB map under a 1 GiB bound, the map fills long before buffer.max_bytes.
    store = PageStore(tmp_path / "buffer", settings(overflow_policy="reject-new",
                                                    page_max_samples=1000),
                      LOGGER, map_size_bytes=1 << 20)
    try:
        core = BufferCore(store, LOGGER)
        sent = 0
        for batch_seq in range(60):
            outcome = core.commit([batch_of(1, batch_seq, make_samples(1, sent, 500))], 0.0)
            sent += 500
            assert outcome.acks == {b"reader": (1, batch_seq)}
        state = store.state
        assert state.rejected_batches > 0
        assert state.drops == {"map_full": [0, state.rejected_samples, state.rejected_batches]}
        assert store.map_size_bytes == 1 << 20  # reject-new never grows the map
    finally:
        store.close()

    # The oldest data stays, and the counters match what the store contains.
    view = read_store(tmp_path / "buffer")
    kept = sum(len(payload.parse_page(page)[1]) for page in view.pages.values())
    kept += sum(len(json.loads(array)) for array in view.open_arrays)
    assert kept + state.rejected_samples == sent
    assert struct.unpack(">Q", view.meta[b"stored_bytes"])[0] == view.stored_bytes


HOLD_READER = """
import sys
import lmdb
env = lmdb.open(sys.argv[1], readonly=True, max_dbs=5)
txn = env.begin()
print("ready", flush=True)
sys.stdin.read()
"""


def test_buffer_map_not_grown_while_shared(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER.name)
    store = PageStore(tmp_path / "buffer", settings(page_max_samples=1000), LOGGER,
                      map_size_bytes=1 << 20)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_READER, str(tmp_path / "buffer")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        core = BufferCore(store, LOGGER)

        # Another process keeps an old snapshot open, so freed pages cannot be reused and
        # the map fills up. The buffer must not resize a map that another process maps.
        for batch_seq in range(40):
            core.commit([batch_of(1, batch_seq, make_samples(1, batch_seq * 500, 500))], 0.0)
        assert store.map_size_bytes == 1 << 20
        assert core.counters["commits_failed"] > 0
        messages = [record.getMessage() for record in caplog.records]
        assert any(message.startswith("store_map_not_grown") for message in messages)
    finally:
        holder.communicate("", timeout=10)
        store.close()


# -- commit grouping -------------------------------------------------------------------------


def test_buffer_commit_delay_groups_batches(make_buffer, context) -> None:
    run = make_buffer(commit_max_delay_ms=400, commit_max_batches=5, page_max_age_ms=60_000)
    run.start()
    reader = ReaderPeer(context, run.runtime_dir)

    # Three batches within the delay are acknowledged together, after the delay.
    started = time.monotonic()
    for batch_seq in range(3):
        reader.send_batch(1, batch_seq, make_samples(1, batch_seq, 1))
    ack = reader.receive_ack(5.0)
    elapsed = time.monotonic() - started
    assert ack == (1, 2)
    assert 0.35 <= elapsed < 3.0

    # commit_max_batches ends the wait early.
    started = time.monotonic()
    for batch_seq in range(3, 8):
        reader.send_batch(1, batch_seq, make_samples(1, batch_seq, 1))
    assert reader.receive_ack(5.0) == (1, 7)
    assert time.monotonic() - started < 0.35

    wait_until(lambda: read_status(run)["samples_committed"] == 8, 5.0, "the status")
    assert read_status(run)["commits"] == 2


# -- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """Mount an 8 MiB tmpfs under a fresh folder, and always unmount it afterwards."""
    with mounted_tmpfs("8m", "pb-disk-") as mount_point:
        yield mount_point


def run_on_disk(make_buffer: Callable[..., BufferRun], disk: Path, **keys: Any) -> BufferRun:
    run = make_buffer(**keys)
    text = run.config_path.read_text()
    run.config_path.write_text(text.replace(f'state_dir = "{run.root}/state"',
                                            f'state_dir = "{disk}/state"'))
    return run


def store_bytes_match(store_dir: Path) -> None:
    """Check that the store opens and that its counters match what it contains."""
    view = read_store(store_dir)
    assert struct.unpack(">Q", view.meta[b"stored_bytes"])[0] == view.stored_bytes
    for page_seq, page in view.pages.items():
        assert payload.parse_page(page)[0] == page_seq


def test_buffer_disk_full_drop_oldest(make_buffer, context, small_disk) -> None:
    run = run_on_disk(make_buffer, small_disk, max_bytes=1 << 30, page_max_samples=1000)
    run.start()
    reader = ReaderPeer(context, run.runtime_dir)

    # About 24 MiB go to an 8 MiB disk: the oldest pages make room, and every batch is
    # acknowledged.
    fill_and_check(run, reader, 1, 240, 1000)
    run.assert_running()
    view = read_store(small_disk / "state" / "buffer")
    drops = json.loads(view.meta[b"drops"])
    assert drops["disk_full"][0] > 0
    assert min(view.pages) > 0
    assert "store_full" in run.log()
    assert run.terminate() == 0
    store_bytes_match(small_disk / "state" / "buffer")


def test_buffer_disk_full_reject_new_resumes(make_buffer, context, small_disk) -> None:
    run = run_on_disk(make_buffer, small_disk, max_bytes=1 << 30, page_max_samples=1000,
                      overflow_policy="reject-new")
    run.start()
    reader = ReaderPeer(context, run.runtime_dir)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (5 << 20))

    # The disk fills: the new batches are rejected for disk_full, and none is lost silently.
    fill_and_check(run, reader, 1, 80, 1000)
    rejected = json.loads(read_store(small_disk / "state" / "buffer").meta[b"rejected"])
    assert rejected["samples"] > 0
    run.assert_running()

    # With space back, the next batches are stored.
    filler.unlink()
    for batch_seq in range(80, 90):
        reader.send_batch(1, batch_seq, make_samples(1, batch_seq * 1000, 1000))
    reader.wait_for_ack(1, 89)
    view = read_store(small_disk / "state" / "buffer")
    assert json.loads(view.meta[b"rejected"]) == rejected
    stored = b"".join([*view.pages.values(), *view.open_arrays])
    assert b'"seq":89999}' in stored
    drops = json.loads(view.meta[b"drops"])
    assert drops["disk_full"][1] == rejected["samples"]
    assert run.terminate() == 0
    store_bytes_match(small_disk / "state" / "buffer")


# -- an unreadable store, and free pages -------------------------------------------------------


def write_store(store_dir: Path, pages: int = 30) -> None:
    store = PageStore(store_dir, settings(page_max_samples=100), LOGGER)
    try:
        core = BufferCore(store, LOGGER)
        for batch_seq in range(pages):
            core.commit([batch_of(1, batch_seq, make_samples(1, batch_seq * 100, 100))], 0.0)
    finally:
        store.close()


def set_format(store_dir: Path) -> None:
    env = lmdb.open(str(store_dir), max_dbs=5)
    try:
        meta = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            txn.put(b"format", b"9", db=meta)
    finally:
        env.close()


def truncate(store_dir: Path) -> None:
    data = store_dir / "data.mdb"
    os.truncate(data, data.stat().st_size // 3)


def garble(store_dir: Path) -> None:
    (store_dir / "data.mdb").write_bytes(os.urandom(20_000))


@pytest.mark.parametrize("damage", [truncate, garble, set_format],
                         ids=["truncated", "garbage", "other-format"])
def test_buffer_unreadable_store_moved_aside(make_buffer, context, damage) -> None:
    run = make_buffer(page_max_age_ms=50)
    write_store(run.store_dir)
    damage(run.store_dir)
    damaged = (run.store_dir / "data.mdb").read_bytes()

    run.start()
    log = run.log()
    moved = sorted(run.store_dir.glob("data.mdb.unreadable-*"))
    assert len(moved) == 1
    assert moved[0].read_bytes() == damaged
    assert "ERROR" in log
    assert "store_moved_aside" in log
    assert str(run.store_dir / "data.mdb") in log
    assert str(moved[0]) in log

    # The fresh store works.
    reader = ReaderPeer(context, run.runtime_dir)
    reader.send_batch(1, 0, make_samples(1, 0, 5))
    reader.wait_for_ack(1, 0)
    uplink = UplinkPeer(context, run.runtime_dir)
    received = Received()
    drain_pages(uplink, "s", received, lambda: len(received.pages) == 1)
    assert [sample["seq"] for sample in received.samples()] == list(range(5))


def test_buffer_store_check_rejects_truncated(tmp_path: Path) -> None:
    store_dir = tmp_path / "buffer"
    write_store(store_dir)
    truncate(store_dir)
    with pytest.raises(StoreUnreadable, match="is damaged"):
        PageStore(store_dir, settings(), LOGGER)


def test_buffer_free_pages_reused(tmp_path: Path) -> None:
    store = PageStore(tmp_path / "buffer", settings(page_max_samples=100), LOGGER)
    sizes = []
    try:
        core = BufferCore(store, LOGGER)
        batch_seq = 0
        for _ in range(4):
            # Fill a backlog of 200 pages, then deliver and delete all of them.
            for _ in range(200):
                core.commit([batch_of(1, batch_seq, make_samples(1, batch_seq * 100, 100))],
                            0.0)
                batch_seq += 1
            core.add_pubacks(list(range(store.state.next_page_seq)), 0.0)
            core.commit([], 0.0, flush_deletes=True)
            assert store.state.page_count == 0
            sizes.append((tmp_path / "buffer" / "data.mdb").stat().st_size)
    finally:
        store.close()

    # LMDB reuses the freed pages, so the file stops growing after a few backlogs. It grows
    # a little at first, because the free list itself takes pages.
    assert sizes[3] == sizes[2], sizes
    assert sizes[3] <= sizes[0] * 1.25, sizes


# -- `plcbridge buffer` ---------------------------------------------------------------------


def plcbridge_buffer(run: BufferRun, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PLCBRIDGE), "buffer", "--config", str(run.config_path), *args],
                          capture_output=True, text=True, timeout=20, check=False)


def test_buffer_cli_shows_status(make_buffer, context) -> None:
    run = make_buffer(max_bytes=1 << 20, page_max_samples=1000)
    missing = plcbridge_buffer(run)
    assert missing.returncode == 1
    assert "the buffer is not running" in missing.stderr

    run.start()
    reader = ReaderPeer(context, run.runtime_dir)
    fill_with_reader(reader, 1, 300, 100)
    state_ms = make_samples(1, 0, 1)[0]["ts_ms"]

    def status_settled() -> dict[str, Any] | None:
        status = json.loads(plcbridge_buffer(run, "--json").stdout)
        return status if status["samples_committed"] == 30_000 else None

    status = wait_until(status_settled, 5.0, "the status after the last commit", step_s=0.05)
    assert status["running"] is True
    assert status["pages"] > 0
    assert status["bytes"] <= 1 << 20
    dropped = status["dropped_by_reason"]["max_bytes"]
    assert dropped["pages"] == status["dropped_pages"] > 0
    assert status["oldest_ts_ms"] == state_ms + dropped["samples"]
    assert status["newest_ts_ms"] == state_ms + 29_999
    for key in ("commits_per_s", "ingest_samples_per_s", "drain_pages_per_s",
                "drain_samples_per_s"):
        assert key in status

    table = plcbridge_buffer(run)
    assert table.returncode == 0, table.stderr
    assert "running, pid" in table.stdout
    assert f"max_bytes: {dropped['pages']} pages" in table.stdout
    assert "commits/s" in table.stdout

    run.kill()
    stopped = plcbridge_buffer(run)
    assert stopped.returncode == 1
    assert "the buffer is not running" in stopped.stderr
    assert "is gone" in stopped.stderr
    assert "not running, pid" in stopped.stdout


def test_buffer_tap_counters_show_drops(make_buffer, context) -> None:
    run = make_buffer(max_bytes=1 << 20, page_max_samples=1000)
    run.start()
    subscriber = wire.make_socket(context, zmq.SUB, wire.TAP_HWM, linger_ms=0)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"buffer")
    subscriber.connect(wire.tap_endpoint(run.runtime_dir, "buffer"))
    reader = ReaderPeer(context, run.runtime_dir)
    fill_with_reader(reader, 1, 300, 100)

    deadline = time.monotonic() + 5
    counters: dict[str, Any] = {}
    while counters.get("samples_committed") != 30_000:
        assert time.monotonic() < deadline, f"no counters after the last commit: {counters}"
        if subscriber.poll(100):
            message = json.loads(subscriber.recv_multipart()[1])
            if message["kind"] == "counters":
                counters = message
    status = read_status(run)
    assert counters["dropped_by_reason"] == status["dropped_by_reason"]
    assert counters["dropped_by_reason"]["max_bytes"]["pages"] > 0
    assert counters["oldest_ts_ms"] == status["oldest_ts_ms"]
    assert counters["newest_ts_ms"] == make_samples(1, 29_999, 1)[0]["ts_ms"]
    for key in ("commits_per_s", "ingest_samples_per_s", "drain_pages_per_s",
                "drain_samples_per_s", "gap_records", "samples_rejected"):
        assert key in counters


# -- the gap record at a real broker ---------------------------------------------------------


def gap_test_config(base: Path, port: int, ca_file: Path) -> str:
    """Return the configuration of a buffer and an uplink in mqtt mode, with a 1 MiB bound."""
    return gateway_toml(
        gateway=gateway_dirs(base),
        tags=[SPEED_TAG],
        buffer={"max_bytes": 1048576, "page_max_samples": 1000, "page_max_age_ms": 60000},
        uplink={"mode": "mqtt", "port": port, "reconnect_min_s": 0.1},
        broker={"host": "localhost", "client_id": "gap-test"},
        credentials={"ca_file": str(ca_file)},
    )


def test_buffer_gap_record_first_at_broker(base: Path, certs: Path, context) -> None:
    broker = Broker(certs, base / "mosquitto")
    broker.start()
    subscriber = Subscriber(broker.port, broker.ca_file, "plcbridge/#")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        subscriber.start()
        config = base / "gateway.toml"
        config.write_text(gap_test_config(base, broker.port, broker.ca_file))
        (base / "log").mkdir()

        def start(module: str) -> None:
            with (base / "log" / f"{module}.log").open("ab") as log:
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", f"processes.{module}", "--config", str(config)],
                    cwd=REPO, stdout=log, stderr=subprocess.STDOUT))

        # The buffer fills past its bound while no uplink runs.
        start("buffer")
        wait_until(lambda: (base / "run" / STATUS_FILE).exists(), 10.0, "the buffer")
        reader = ReaderPeer(context, base / "run")
        fill_with_reader(reader, 1, 300, 100)
        view = read_store(base / "state" / "buffer")
        dropped_pages = json.loads(view.meta[b"drops"])["max_bytes"][0]
        assert dropped_pages > 0

        start("uplink")
        messages = subscriber.wait_for(lambda found: len(found) > len(view.pages) and found,
                                       20.0, "the gap record and every page")
        first = json.loads(messages[0][1])
        assert first["samples"] == []
        assert first["gap"]["reason"] == "max_bytes"
        assert first["gap"]["pages"] == dropped_pages
        assert messages[0][0] == "plcbridge/gap-test/pages"
        page_seqs = [json.loads(body)["page_seq"] for _topic, body in messages[1:]]
        assert page_seqs[:len(view.pages)] == sorted(view.pages)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        subscriber.stop()
        broker.stop()
