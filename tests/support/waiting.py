"""The one bounded wait of the test suite: poll a predicate until it is true or time runs out."""

from __future__ import annotations

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
