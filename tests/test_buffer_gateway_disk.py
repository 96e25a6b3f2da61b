"""A whole gateway whose state folder is a small tmpfs that fills up while it runs.

The PLC simulator, mosquitto over TLS and the four processes under supervisord, as in
tests/test_gateway.py, with gateway.state_dir on a tmpfs that the test mounts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.gateway import wait_until
from tests.test_buffer_disk import fill
from tests.test_gateway import PROGRAMS, Stack, start_stack, stop_stack

pytestmark = pytest.mark.integration


@pytest.fixture
def disk_stack(base: Path, certs: Path) -> Iterator[Stack]:
    """Start the test stack with gateway.state_dir on an 8 MiB tmpfs."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    state_dir = base / "state"
    state_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(state_dir)],
                   check=True, capture_output=True)
    running = None
    try:
        running = start_stack(base, certs)
        running.gateway.start()
        yield running
    finally:
        if running is not None:
            stop_stack(running)
        subprocess.run(["umount", "-l", str(state_dir)], check=False, capture_output=True)
        shutil.rmtree(state_dir, ignore_errors=True)


def reader_samples(stack: Stack) -> int:
    """Return the highest seq of the reader's current epoch that reached the subscriber."""
    report = stack.report()
    epochs = sorted(report.seqs_by_epoch)
    return report.max_seq(epochs[-1]) if epochs else -1


def test_gateway_full_state_disk_keeps_reading(disk_stack: Stack) -> None:
    gateway = disk_stack.gateway
    disk_stack.wait_for_samples(200)
    pids = {program: gateway.pid(program) for program in PROGRAMS}

    # A broker outage on a full disk: the buffer's store cannot grow, so its overflow
    # policy applies or it leaves the batches unacknowledged, while the reader keeps polling.
    disk_stack.broker.stop()
    filler = fill(disk_stack.base / "state")
    wait_until(lambda: "store_full" in gateway.log("buffer"), 15, "store_full in the buffer log")
    for program in PROGRAMS:
        assert gateway.state(program) == "RUNNING", gateway.log(program)[-2000:]
        assert gateway.pid(program) == pids[program], f"{program} restarted"

    # Space and the broker return: samples read after the disk filled reach the cloud.
    before = reader_samples(disk_stack)
    filler.unlink()
    disk_stack.broker.start()
    wait_until(lambda: reader_samples(disk_stack) > before + 1000, 30,
               "new samples of the same epoch at the subscriber", step_s=0.2)
    for program in PROGRAMS:
        assert gateway.pid(program) == pids[program], f"{program} restarted"
    assert "Traceback" not in gateway.log("buffer")

