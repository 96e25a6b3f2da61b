"""The demo's process handling: every child stops when the demo gets a stop signal."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devstack.demo import ROOT, check_ports_free

# Runs supervise() as the demo's main() does, with two idle HTTP servers on free loopback
# ports as its children, and prints their process ids.
_SUPERVISE_SCRIPT = """
import sys
from devstack.demo import supervise

def start_all(start):
    for _ in range(2):
        child = start("http.server", "0", "--bind", "127.0.0.1", "--directory", sys.argv[1])
        print(child.pid, flush=True)
    print("started", flush=True)

sys.exit(supervise(start_all))
"""


def _read_child_pids(demo: subprocess.Popen[str], timeout_s: float) -> list[int]:
    """Read the process ids that the script prints, up to its "started" line."""
    assert demo.stdout is not None
    pids: list[int] = []
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(demo.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(timeout=deadline - time.monotonic()):
                continue
            line = demo.stdout.readline().strip()
            if line == "started":
                return pids
            assert line, f"the script exited with status {demo.wait()}"
            pids.append(int(line))
    raise AssertionError(f"no started line within {timeout_s:g} s")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_demo_stop_signal_stops_children(base: Path, signal_number: int) -> None:
    demo = subprocess.Popen([sys.executable, "-c", _SUPERVISE_SCRIPT, str(base)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        pids = _read_child_pids(demo, 15.0)
        assert len(pids) == 2
        assert all(_running(pid) for pid in pids)

        demo.send_signal(signal_number)
        assert demo.wait(timeout=20) == 0
        for pid in pids:
            assert not _running(pid), f"child {pid} outlived the demo"
    finally:
        for pid in pids:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        if demo.stdout is not None:
            demo.stdout.close()


def test_demo_port_in_use_named() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with pytest.raises(SystemExit) as raised:
            check_ports_free([port])
    assert f"127.0.0.1:{port} is already in use" in str(raised.value)
