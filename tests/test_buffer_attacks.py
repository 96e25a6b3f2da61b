"""Tests of the buffer and `plcbridge buffer` against damaged files and hostile input: a
garbage status file, store files of the wrong kind, gap records across a kill, and
malformed messages.

Real buffer processes on real LMDB files, driven over ZeroMQ as in tests/test_buffer.py.
"""

# The make_buffer fixture comes from tests.test_buffer, and ruff takes the test arguments
# that receive it for redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from cli.buffer import buffer as buffer_command
from common import payload, wire
from common.config import load_config
from common.tap import Tap
from processes.plc_reader.sender import IngestSender
from tests.support.zmq_peers import ReaderPeer, UplinkPeer, make_samples
from tests.test_buffer import (  # noqa: F401 - make_buffer is a fixture
    BufferRun,
    make_buffer,
    read_store,
)
from tests.test_buffer_overflow import fill_with_reader, write_store

LOGGER = logging.getLogger("test.buffer_attacks")


# -- plcbridge buffer ----------------------------------------------------------------------


def run_cli(run: BufferRun, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = buffer_command(argparse.Namespace(config=str(run.config_path), json=False))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


NOW_MS = int(time.time() * 1000)


@pytest.mark.parametrize("content, problem", [
    ("garbage", "not JSON"),
    ("[]", "expected a JSON object"),
    ('{"running": true, "pid": 1}', "ts_ms is None"),
    ('{"ts_ms": "x", "running": true, "pid": 1}', "ts_ms is 'x'"),
    ('{"ts_ms": 1e400, "running": true, "pid": 1}', "ts_ms is inf"),
    (f'{{"ts_ms": {NOW_MS}, "bytes": "a", "max_bytes": 5}}', "bytes is 'a'"),
    (f'{{"ts_ms": {NOW_MS}, "dropped_by_reason": [1]}}', "dropped_by_reason is [1]"),
    (f'{{"ts_ms": {NOW_MS}, "dropped_by_reason": {{"x": 5}}}}', "dropped_by_reason.x is 5"),
    (f'{{"ts_ms": {NOW_MS}, "pid": true}}', "pid is True"),
    (f'{{"ts_ms": {NOW_MS}, "gaps_open": [1]}}', "gaps_open is [1]"),
    (f'{{"ts_ms": {NOW_MS}, "oldest_ts_ms": -5}}', "oldest_ts_ms is -5"),
], ids=["garbage", "list", "no-ts", "text-ts", "infinite-ts", "text-bytes", "drops-list",
        "drop-number", "bool-pid", "gap-number", "negative-time"])
def test_buffer_cli_invalid_status_file(make_buffer, capsys, content, problem) -> None:
    run = make_buffer()
    run.runtime_dir.mkdir(parents=True)
    (run.runtime_dir / "buffer-status.json").write_text(content)
    code, out, err = run_cli(run, capsys)
    assert code == 1
    assert out == ""
    assert "is invalid" in err
    assert problem in err
    assert "Traceback" not in err


def test_buffer_cli_future_status_stale(make_buffer, capsys) -> None:
    # A status from before the clock went back, with this test's live pid: not running.
    run = make_buffer()
    run.runtime_dir.mkdir(parents=True)
    status = {"ts_ms": NOW_MS + 3_600_000, "running": True, "pid": os.getpid()}
    (run.runtime_dir / "buffer-status.json").write_text(json.dumps(status))
    code, out, err = run_cli(run, capsys)
    assert code == 1
    assert "not running" in err
    assert "away from the current time" in err
    assert "pid" in out


def test_buffer_cli_no_status_file(make_buffer, capsys) -> None:
    run = make_buffer()
    code, out, err = run_cli(run, capsys)
    assert code == 1
    assert out == ""
    assert "no status file" in err
    assert str(Path(run.runtime_dir) / "buffer-status.json") in err


# -- store files of the wrong kind ---------------------------------------------------------


def data_folder(store_dir: Path) -> None:
    (store_dir / "data.mdb").unlink()
    (store_dir / "data.mdb").mkdir()


def data_fifo(store_dir: Path) -> None:
    (store_dir / "data.mdb").unlink()
    os.mkfifo(store_dir / "data.mdb")


def data_dangling_link(store_dir: Path) -> None:
    (store_dir / "data.mdb").unlink()
    (store_dir / "data.mdb").symlink_to(store_dir.parent / "unmounted" / "data.mdb")


@pytest.mark.parametrize("damage", [data_folder, data_fifo, data_dangling_link],
                         ids=["folder", "fifo", "dangling-link"])
def test_buffer_data_file_wrong_kind(make_buffer, context, damage) -> None:
    # A FIFO used to block the buffer at start for ever, and a dangling link made LMDB
    # create a new store at its target.
    run = make_buffer(page_max_age_ms=50)
    write_store(run.store_dir)
    damage(run.store_dir)
    run.start()
    moved = sorted(run.store_dir.glob("data.mdb.unreadable-*"))
    assert len(moved) == 1
    assert "store_moved_aside" in run.log()
    assert not (run.store_dir.parent / "unmounted").exists()
    reader = ReaderPeer(context, run.runtime_dir)
    reader.send_batch(1, 0, make_samples(1, 0, 5))
    reader.wait_for_ack(1, 0)
    assert run.terminate() == 0


def test_buffer_lock_file_folder_keeps_pages(make_buffer) -> None:
    run = make_buffer()
    write_store(run.store_dir, pages=10)
    pages_before = read_store(run.store_dir).pages
    (run.store_dir / "lock.mdb").unlink()
    (run.store_dir / "lock.mdb").mkdir()
    run.start()
    assert len(list(run.store_dir.glob("lock.mdb.unreadable-*"))) == 1
    assert not list(run.store_dir.glob("data.mdb.unreadable-*"))
    assert "the stored pages are kept" in run.log()
    assert run.terminate() == 0
    pages_after = read_store(run.store_dir).pages
    assert {seq: pages_after.get(seq) for seq in pages_before} == pages_before


def test_buffer_owner_lock_folder_named(make_buffer) -> None:
    run = make_buffer()
    (run.store_dir / "owner.lock").mkdir(parents=True)
    with pytest.raises(AssertionError, match="exited at start"):
        run.start()
    assert str(run.store_dir / "owner.lock") in run.log()
    assert "Traceback" not in run.log()


# -- gap records across restarts and a flapping link -----------------------------------------


def receive_gaps(uplink: UplinkPeer, session: str, count: int) -> list[dict[str, Any]]:
    """Bring the link up and return the first count pages, which must be gap records."""
    uplink.link(session, free=count)
    gaps = []
    for _ in range(count):
        page = uplink.receive_page(5.0)
        assert page is not None, f"only {len(gaps)} gap records arrived"
        gap = json.loads(page[2]).get("gap")
        assert gap is not None, page[2][:200]
        gaps.append(gap)
    return gaps


def test_buffer_gap_record_survives_kill(make_buffer, context) -> None:
    run = make_buffer(max_bytes=1 << 20, page_max_samples=1000, overflow_policy="reject-new")
    run.start()
    reader = ReaderPeer(context, run.runtime_dir)
    fill_with_reader(reader, 1, 150, 100)
    rejected = json.loads(read_store(run.store_dir).meta[b"rejected"])
    assert rejected["samples"] > 0

    # The link flaps while the store is full: a gap record is stored and sent, but never
    # acknowledged, before the buffer is killed.
    uplink = UplinkPeer(context, run.runtime_dir)
    first = receive_gaps(uplink, "s1", 1)[0]
    assert first["samples"] == rejected["samples"]
    uplink.link("s1", state="down")
    for batch_seq in range(150, 160):
        reader.send_batch(1, batch_seq, make_samples(1, batch_seq * 100, 100))
    reader.wait_for_ack(1, 159)
    run.kill()

    # After the restart the unacknowledged record goes out again, then one for the batches
    # rejected after it, and together they count every rejected sample exactly once.
    run.start()
    uplink.close()
    uplink = UplinkPeer(context, run.runtime_dir)
    gaps = receive_gaps(uplink, "s2", 2)
    assert gaps[0] == first
    total = json.loads(read_store(run.store_dir).meta[b"rejected"])["samples"]
    assert sum(gap["samples"] for gap in gaps) == total
    assert gaps[1]["first_ts_ms"] == make_samples(1, 15_000, 1)[0]["ts_ms"]


def test_buffer_set_aside_files_named(make_buffer) -> None:
    # A kill between the rename and its ERROR line leaves a file moved aside without a
    # log line, so every start names such files.
    run = make_buffer()
    write_store(run.store_dir, pages=2)
    os.rename(run.store_dir / "data.mdb", run.store_dir / "data.mdb.unreadable-20260101T000000Z")
    run.start()
    assert "store_files_set_aside" in run.log()
    assert "data.mdb.unreadable-20260101T000000Z" in run.log()
    assert run.terminate() == 0


# -- hostile messages ----------------------------------------------------------------------


def test_buffer_out_of_range_headers_ignored(make_buffer, context) -> None:
    # Each of these stopped the buffer with struct.error or RecursionError.
    run = make_buffer(page_max_age_ms=50)
    run.start()
    reader = ReaderPeer(context, run.runtime_dir)
    uplink = UplinkPeer(context, run.runtime_dir)
    sample = payload.encode_samples(make_samples(1, 0, 1))
    uplink.link("s", free=4)
    uplink.send_frames(wire.encode(wire.PUBACK, {"session": "s", "page_seq": 2**64}))
    uplink.send_frames(wire.encode(wire.LINK, {"session": "t", "state": "up", "free": 2**70}))
    reader.send_frames(wire.encode(wire.BATCH, {"epoch": 2**63, "batch_seq": 0, "count": 1},
                                   sample))
    reader.send_frames(wire.encode(wire.BATCH, {"epoch": 1, "batch_seq": 0, "count": 2**40},
                                   sample))
    reader.send_frames([wire.BATCH, b"[" * 100_000 + b"]" * 100_000, sample])
    uplink.send_frames([wire.PUBACK, b"[" * 100_000 + b"]" * 100_000])

    # The buffer still stores and delivers.
    reader.send_batch(1, 0, make_samples(1, 0, 5))
    reader.wait_for_ack(1, 0)
    uplink.link("s", free=4)
    page = uplink.receive_page(5.0)
    assert page is not None
    assert payload.parse_page(page[2])[1] == make_samples(1, 0, 5)
    run.assert_running()
    log = run.log()
    assert "Traceback" not in log
    assert "bad_message" in log  # rate-limited, so only the first of each socket shows
    assert "must be an integer from 0 to" in log


def test_sender_bad_acks_ignored(make_buffer, context) -> None:
    # The reader's side of ingest, against a test-side ROUTER that plays the buffer. Each
    # of these acks used to stop the reader with OverflowError or RecursionError.
    run = make_buffer()
    run.runtime_dir.mkdir(parents=True)
    config = load_config(run.config_path)
    endpoint = wire.endpoint(run.runtime_dir, wire.INGEST)
    router = wire.make_socket(context, zmq.ROUTER, wire.DATA_HWM, linger_ms=0)
    router.bind(endpoint)
    tap = Tap(context, run.runtime_dir, "plc_reader")
    sender = IngestSender(context, endpoint, config.plc, epoch=3, logger=LOGGER, tap=tap)
    try:
        sender.enqueue([json.dumps(sample).encode() for sample in make_samples(3, 0, 5)])
        deadline = time.monotonic() + 5
        while not router.poll(50):
            assert time.monotonic() < deadline, "the batch did not arrive"
            sender.pump()
        identity, *_frames = router.recv_multipart()
        for header in (b'{"epoch": 1e999, "batch_seq": 0}', b"[" * 100_000 + b"]" * 100_000,
                       b'{"epoch": 3, "batch_seq": 0, "rejected_samples": -1e999}'):
            router.send_multipart([identity, wire.ACK, header])
        router.send_multipart([identity, *wire.encode(wire.ACK, {"epoch": 3, "batch_seq": 0})])
        deadline = time.monotonic() + 5
        while not sender.idle:
            assert time.monotonic() < deadline, "the good ack was not applied"
            sender.wait_for_acks(0.05)
        assert sender.dropped_samples == 0
    finally:
        sender.close()
        tap.close()
        router.close()
