"""Tests of the buffer's store on a disk that is full before the buffer starts, and of a
store whose map was grown before a restart.

Real buffer processes on a real tmpfs that the test mounts, and real LMDB files.
"""

# The make_buffer fixture comes from tests.test_buffer, and ruff takes the test arguments
# that receive it for redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from processes.buffer import BufferCore, PageStore
from tests.support.tmpfs import mounted_tmpfs
from tests.support.waiting import wait_until
from tests.support.zmq_peers import ReaderPeer, make_samples
from tests.test_buffer import (  # noqa: F401 - make_buffer is a fixture
    REPO,
    BufferRun,
    make_buffer,
    read_store,
)
from tests.test_buffer_overflow import PLCBRIDGE, batch_of, settings, store_bytes_match

LOGGER = logging.getLogger("test.buffer_disk")


@pytest.fixture
def full_disk() -> Iterator[Path]:
    """Mount a 4 MiB tmpfs under a fresh folder, and always unmount it afterwards."""
    with mounted_tmpfs("4m", "pb-full-") as mount_point:
        yield mount_point


def fill(disk: Path) -> Path:
    """Write a filler file until the disk is full, and return its path."""
    filler = disk / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            os.write(descriptor, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(descriptor)
    return filler


def start_on_disk(make_buffer, disk: Path, wait_for: str, **keys) -> BufferRun:
    """Start a buffer whose state_dir is on disk, and wait until its log shows wait_for."""
    run = make_buffer(**keys)
    text = run.config_path.read_text()
    run.config_path.write_text(text.replace(f'state_dir = "{run.root}/state"',
                                            f'state_dir = "{disk}/state"'))
    log_path = run.root / "log" / "buffer-1.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    run.logs.append(log_path)
    with log_path.open("wb") as log:
        run.process = subprocess.Popen(
            [sys.executable, "-m", "processes.buffer", "--config", str(run.config_path)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    process = run.process
    wait_until(lambda: wait_for in run.log() or process.poll() is not None, 10.0,
               f"{wait_for} in the buffer's log")
    run.assert_running()
    return run


def test_buffer_new_store_full_disk_waits(make_buffer, context, full_disk) -> None:
    # LMDB cannot create its files on a full disk: the buffer waits instead of exiting
    # (or dying of SIGBUS in LMDB's lock file), and holds the reader's batches.
    filler = fill(full_disk)
    run = start_on_disk(make_buffer, full_disk, "store_not_opened", page_max_age_ms=50)
    assert "disk_full" in run.log()
    reader = ReaderPeer(context, run.runtime_dir)
    reader.send_batch(1, 0, make_samples(1, 0, 10))
    assert reader.receive_ack(0.5) is None
    run.assert_running()

    # `plcbridge buffer` gives the reason why nothing is stored.
    status = subprocess.run([str(PLCBRIDGE), "buffer", "--config", str(run.config_path)],
                            capture_output=True, text=True, timeout=20, check=False)
    assert status.returncode == 1
    assert "its store is not open" in status.stderr
    assert "disk" in status.stderr
    assert "not open:" in status.stdout

    # Space returns: the store opens, and the batch that waited is committed.
    filler.unlink()
    reader.wait_for_ack(1, 0, timeout_s=15.0)
    assert "store_opened" in run.log()
    assert run.terminate() == 0
    view = read_store(full_disk / "state" / "buffer")
    assert view.stored_bytes > 0
    store_bytes_match(full_disk / "state" / "buffer")


def test_buffer_existing_store_full_disk_runs(make_buffer, context, full_disk) -> None:
    # A store written before the disk filled opens without writing, and the overflow
    # policy applies to the new batches.
    store_dir = full_disk / "state" / "buffer"
    store = PageStore(store_dir, settings(page_max_samples=100), LOGGER)
    try:
        core = BufferCore(store, LOGGER)
        for batch_seq in range(5):
            core.commit([batch_of(1, batch_seq, make_samples(1, batch_seq * 100, 100))], 0.0)
    finally:
        store.close()
    filler = fill(full_disk)

    run = start_on_disk(make_buffer, full_disk, "buffer_ready", page_max_samples=100,
                        overflow_policy="reject-new")
    reader = ReaderPeer(context, run.runtime_dir)
    for batch_seq in range(20):
        reader.send_batch(2, batch_seq, make_samples(2, batch_seq * 100, 100))
    reader.wait_for_ack(2, 19)
    run.assert_running()

    # Space returns, and the next batches are stored.
    filler.unlink()
    for batch_seq in range(20, 25):
        reader.send_batch(2, batch_seq, make_samples(2, batch_seq * 100, 100))
    reader.wait_for_ack(2, 24)
    assert run.terminate() == 0
    view = read_store(store_dir)
    stored = b"".join([*view.pages.values(), *view.open_arrays])
    assert b'"epoch":2,"seq":2499}' in stored
    store_bytes_match(store_dir)


def test_buffer_grown_map_kept_on_reopen(tmp_path: Path) -> None:
    # The map grows past the 1 MiB requested. A reopen with the same request must not
    # shrink it to the used pages, because the next commit would then drop data.
    store_dir = tmp_path / "buffer"
    store = PageStore(store_dir, settings(page_max_samples=1000), LOGGER, map_size_bytes=1 << 20)
    sent = 0
    batch_seq = 0
    try:
        assert store.grow_map()
        core = BufferCore(store, LOGGER)
        while (store_dir / "data.mdb").stat().st_size <= 1 << 20:
            core.commit([batch_of(1, batch_seq, make_samples(1, sent, 500))], 0.0)
            sent += 500
            batch_seq += 1
        assert store.state.dropped_samples == 0
    finally:
        store.close()

    store = PageStore(store_dir, settings(page_max_samples=1000), LOGGER, map_size_bytes=1 << 20)
    try:
        file_bytes = (store_dir / "data.mdb").stat().st_size
        assert store.env.info()["map_size"] > file_bytes
        core = BufferCore(store, LOGGER)
        for offset in range(20):
            outcome = core.commit([batch_of(1, batch_seq + offset,
                                            make_samples(1, sent, 500))], 0.0)
            sent += 500
            assert outcome.acks == {b"reader": (1, batch_seq + offset)}
        assert store.state.dropped_samples == 0
        assert core.counters["commits_failed"] == 0
    finally:
        store.close()
