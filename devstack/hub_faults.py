"""Fault modes of the hub emulator, read from a JSON file that tests rewrite at runtime.

    {"refuse": false, "blackhole": false, "close_after_s": null,
     "puback_delay_s": 0, "connack_delay_s": 0, "clock_offset_s": 0}

Every key is optional. The file is checked at every decision (a stat call) and read again
when its modification time, size or inode changes, so the connection after a test has
replaced the file already follows it. A missing file means no faults. An invalid file
(bad JSON, a value out of range, over 64 KiB, or not a regular file) is logged and the
previous faults stay in force.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.logs import fields


@dataclass(frozen=True)
class Faults:
    # Reject every CONNECT with CONNACK 5.
    refuse: bool = False
    # Accept TCP and send nothing, not even the TLS handshake, on both ports.
    blackhole: bool = False
    # Close every MQTT connection this many seconds after its CONNACK.
    close_after_s: float | None = None
    # Hold each PUBACK on its way to the client for this long.
    puback_delay_s: float = 0.0
    # Hold the broker's CONNACK on its way to the client for this long.
    connack_delay_s: float = 0.0
    # Added to the system clock for `se` checks, certificate validity and the Date header.
    clock_offset_s: float = 0.0


class FaultsError(ValueError):
    """An invalid faults file; the message names the key and the value."""


# Allowed range of each number in seconds. The bounds keep dates, sleeps and the expiry
# arithmetic within what datetime and asyncio handle: ten years of clock offset either way,
# a day of close_after_s and an hour of PUBACK or CONNACK delay.
_TEN_YEARS_S = 10 * 366 * 86400
_NUMBERS = {
    "close_after_s": (0.0, 86400.0),
    "puback_delay_s": (0.0, 3600.0),
    "connack_delay_s": (0.0, 3600.0),
    "clock_offset_s": (-_TEN_YEARS_S, _TEN_YEARS_S),
}
_FLAGS = {"refuse", "blackhole"}
# A faults file is a few dozen bytes. A larger one is a mistake and is not read.
MAX_FAULTS_BYTES = 64 * 1024


def parse_faults(document: Any) -> Faults:
    """Build Faults from a decoded JSON object; raise FaultsError naming the bad key."""
    if not isinstance(document, dict):
        raise FaultsError("expected a JSON object")
    values: dict[str, Any] = {}
    for key, value in document.items():
        if key in _FLAGS:
            if not isinstance(value, bool):
                raise FaultsError(f"invalid {key} = {value!r}; expected true or false")
        elif key in _NUMBERS:
            if not (key == "close_after_s" and value is None):
                value = _seconds(key, value)
        else:
            raise FaultsError(
                f"unknown key {key!r}; expected one of {', '.join(sorted(_FLAGS | set(_NUMBERS)))}"
            )
        values[key] = value
    return Faults(**values)


def _seconds(key: str, value: Any) -> float:
    """Check a number of seconds against its key's range; return it as a float."""
    low, high = _NUMBERS[key]
    expected = f"expected a number of seconds from {low:.0f} to {high:.0f}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FaultsError(f"invalid {key} = {value!r}; {expected}")
    # An int is finite, and math.isfinite() or float() raise OverflowError for one of 400
    # digits. Python compares an int with a float exactly, so the range check is safe.
    finite = isinstance(value, int) or math.isfinite(value)
    if not (finite and low <= value <= high):
        value_text = repr(value)
        if len(value_text) > 40:
            value_text = f"<a number of {len(value_text)} digits>"
        raise FaultsError(f"invalid {key} = {value_text}; {expected}")
    return float(value)


class FaultsFile:
    """The faults in force, following a file that may change at any time."""

    def __init__(self, path: Path | None, logger: logging.Logger) -> None:
        self._path = path
        self._logger = logger
        self._signature: tuple[int, int, int] | None = None
        self._faults = Faults()

    def current(self) -> Faults:
        """Return the faults in force, reading the file again if it has changed."""
        if self._path is None:
            return self._faults
        try:
            status = os.stat(self._path)
        except FileNotFoundError:
            self._apply(None, Faults())
            return self._faults
        except OSError as exc:
            self._logger.error("faults_unreadable %s", fields(file=self._path, error=exc))
            return self._faults

        signature = (status.st_mtime_ns, status.st_size, status.st_ino)
        if signature != self._signature:
            self._reload(signature)
        return self._faults

    def _reload(self, signature: tuple[int, int, int]) -> None:
        assert self._path is not None
        try:
            faults = parse_faults(json.loads(_read_regular_file(self._path)))
        except (OSError, ValueError, RecursionError) as exc:
            # json.JSONDecodeError, UnicodeDecodeError and FaultsError are ValueErrors.
            # RecursionError comes from deeply nested JSON arrays or objects.
            self._signature = signature
            self._logger.error(
                "faults_invalid %s; the previous faults stay in force",
                fields(file=self._path, error=str(exc) or repr(exc)),
            )
            return
        self._apply(signature, faults)

    def _apply(self, signature: tuple[int, int, int] | None, faults: Faults) -> None:
        changed = faults != self._faults or signature != self._signature
        self._signature = signature
        self._faults = faults
        if changed:
            self._logger.info(
                "faults_loaded %s",
                fields(file=self._path, refuse=faults.refuse, blackhole=faults.blackhole,
                       close_after_s=faults.close_after_s, puback_delay_s=faults.puback_delay_s,
                       connack_delay_s=faults.connack_delay_s,
                       clock_offset_s=faults.clock_offset_s),
            )


def _read_regular_file(path: Path) -> str:
    """Read a small regular file without blocking; raise FaultsError for anything else.

    O_NONBLOCK makes open() return at once for a FIFO, which would otherwise wait for a
    writer and stall every connection of the emulator meanwhile.
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(descriptor, "rb") as stream:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise FaultsError("not a regular file; write the faults as a JSON file")
        data = stream.read(MAX_FAULTS_BYTES + 1)
    if len(data) > MAX_FAULTS_BYTES:
        raise FaultsError(f"file larger than {MAX_FAULTS_BYTES} bytes")
    return data.decode("utf-8")
