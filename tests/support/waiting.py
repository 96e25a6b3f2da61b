"""The one bounded wait of the test suite: poll a predicate until it is true or time runs out."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from typing import Any

STEP_S = 0.02


def wait_until(
    predicate: Callable[[], Any], timeout_s: float, what: str, step_s: float = STEP_S
) -> Any:
    """Poll predicate until it returns a true value, and return that value.

    Raises AssertionError naming what was awaited once timeout_s has passed, so a failing
    test names the event that never came.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(step_s)


def wait_for_ready_line(
    process: subprocess.Popen[bytes], log: Callable[[], str], ready: re.Pattern[str],
    timeout_s: float, name: str,
) -> re.Match[str]:
    """Wait until a server's log matches its ready line, and return the match.

    Raises AssertionError with the log when the server exits first or time runs out.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = ready.search(log())
        if found:
            return found
        if process.poll() is not None:
            raise AssertionError(f"{name} exited with status {process.returncode}:\n{log()}")
        time.sleep(0.05)
    raise AssertionError(f"{name} not ready within {timeout_s:g} s:\n{log()}")
