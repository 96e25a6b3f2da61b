"""The reader's epoch file on a state disk that is full: a small tmpfs that the test mounts."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import PlcBridgeError
from processes.plc_reader.epoch import EPOCH_FILE, advance_epoch
from tests.support.tmpfs import mounted_tmpfs
from tests.test_buffer_disk import fill

LOGGER = logging.getLogger("test.plc_epoch")


@pytest.fixture
def disk() -> Iterator[Path]:
    """Mount a 1 MiB tmpfs and unmount it afterwards."""
    with mounted_tmpfs("1m", "pb-") as mount_point:
        yield mount_point


@pytest.mark.parametrize(("old", "new"), [("41\n", "42"), ("9\n", "10"), ("1234   \n", "1235")],
                         ids=["same-length", "one-digit-more", "padded"])
def test_epoch_full_disk_overwritten_in_place(disk: Path, old: str, new: str) -> None:
    path = disk / EPOCH_FILE
    path.write_text(old)
    inode = path.stat().st_ino
    fill(disk)

    epoch = advance_epoch(disk, threading.Event(), LOGGER)

    assert epoch == int(new)
    assert path.read_text().strip() == new
    assert path.stat().st_ino == inode
    # The next start reads the padded file as usual.
    (disk / "filler").unlink()
    assert advance_epoch(disk) == int(new) + 1


def test_epoch_full_disk_without_file_waits(disk: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    filler = fill(disk)
    stop = threading.Event()
    result: list[int | None] = []
    worker = threading.Thread(target=lambda: result.append(advance_epoch(disk, stop, LOGGER)),
                              daemon=True)

    with caplog.at_level(logging.WARNING):
        worker.start()
        try:
            deadline = time.monotonic() + 5
            while "epoch_not_saved" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.02)
            assert "epoch_not_saved" in caplog.text
            assert worker.is_alive()

            filler.unlink()
            worker.join(timeout=10)
        finally:
            stop.set()
            worker.join(timeout=5)

    assert result == [1]
    assert (disk / EPOCH_FILE).read_text() == "1\n"
    assert str(disk / EPOCH_FILE) in caplog.text


def test_epoch_full_disk_stop_returns_none(disk: Path) -> None:
    fill(disk)
    stop = threading.Event()
    stop.set()

    assert advance_epoch(disk, stop, LOGGER) is None
    assert not (disk / EPOCH_FILE).exists()


def test_epoch_full_disk_without_stop_raises(disk: Path) -> None:
    fill(disk)

    with pytest.raises(PlcBridgeError) as caught:
        advance_epoch(disk)

    assert f"{disk / EPOCH_FILE}: cannot update the reader epoch" in str(caught.value)
    assert "has free space" in str(caught.value)


def test_epoch_fifo_rejected(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / EPOCH_FILE)

    with pytest.raises(PlcBridgeError) as caught:
        advance_epoch(tmp_path)

    assert "cannot read the reader epoch: the file is not a regular file (a FIFO)" in str(
        caught.value)
