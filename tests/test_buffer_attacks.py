"""Tests of the buffer and `plcbridge buffer` against damaged files and hostile input: a
garbage status file, broken store files and huge batches.

Real buffer processes on real LMDB files, driven over ZeroMQ as in tests/test_buffer.py.
"""

# The make_buffer and context fixtures come from tests.test_buffer, and ruff takes the test
# arguments that receive them for redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pytest

from cli.buffer import buffer as buffer_command
from tests.support.zmq_peers import ReaderPeer, make_samples
from tests.test_buffer import (  # noqa: F401 - make_buffer and context are fixtures
    BufferRun,
    context,
    make_buffer,
    read_store,
)
from tests.test_buffer_overflow import write_store

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
