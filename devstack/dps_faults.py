"""Fault modes of the DPS emulator, read from a JSON file that tests rewrite at runtime.

    {"assigning_polls": 0, "throttle_requests": 0, "retry_after_s": 1,
     "disabled": false, "failed": false}

Every key is optional. The emulator follows the file as devstack/followed_file.py describes,
and the count of throttled requests starts again whenever the file changes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DpsFaults:
    # Respond to this many polls of each registration with "assigning" before its outcome.
    assigning_polls: int = 0
    # Respond to the first N requests (register or poll) with status 429.
    throttle_requests: int = 0
    # The retry-after sent with 202 "assigning" and 429 responses, in seconds.
    retry_after_s: float = 1.0
    # End every registration with status "disabled", as for a disabled enrollment.
    disabled: bool = False
    # End every registration with status "failed" and an error code.
    failed: bool = False


_COUNTS = {"assigning_polls": 1000, "throttle_requests": 1_000_000}
_FLAGS = ("disabled", "failed")
_MAX_RETRY_AFTER_S = 3600.0


def parse_dps_faults(data: bytes) -> DpsFaults:
    """Parse the faults file; raise ValueError naming the bad key and value."""
    document: Any = json.loads(data)
    if not isinstance(document, dict):
        raise ValueError("expected a JSON object")
    for key, value in document.items():
        if key in _COUNTS:
            if isinstance(value, bool) or not isinstance(value, int) or not (
                0 <= value <= _COUNTS[key]
            ):
                raise ValueError(f"invalid {key} = {value!r}; expected an integer from 0 to "
                                 f"{_COUNTS[key]}")
        elif key in _FLAGS:
            if not isinstance(value, bool):
                raise ValueError(f"invalid {key} = {value!r}; expected true or false")
        elif key == "retry_after_s":
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and 0 <= value <= _MAX_RETRY_AFTER_S
            ):
                raise ValueError(f"invalid retry_after_s = {value!r}; expected a number of "
                                 f"seconds from 0 to {_MAX_RETRY_AFTER_S:g}")
        else:
            known = ", ".join(sorted([*_COUNTS, *_FLAGS, "retry_after_s"]))
            raise ValueError(f"unknown key {key!r}; expected one of {known}")
    return DpsFaults(**document)
