"""Fault modes of the hub emulator, read from a JSON file that tests rewrite at runtime.

    {"refuse": false, "blackhole": false, "close_after_s": null,
     "puback_delay_s": 0, "clock_offset_s": 0}

Every key is optional. The file is checked at every decision (a stat call) and read again
when its modification time, size or inode changes, so the connection after a test has
replaced the file already follows it. A missing file means no faults. An invalid file is
logged and the previous faults stay in force.
"""

from __future__ import annotations

import json
import logging
import math
import os
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
    # Added to the system clock for `se` checks, certificate validity and the Date header.
    clock_offset_s: float = 0.0


class FaultsError(ValueError):
    """An invalid faults file; the message names the key and the value."""


_NUMBERS = {"close_after_s", "puback_delay_s", "clock_offset_s"}
_FLAGS = {"refuse", "blackhole"}


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
            if key == "close_after_s" and value is None:
                pass
            elif (isinstance(value, bool) or not isinstance(value, int | float)
                  or not math.isfinite(value)):
                raise FaultsError(f"invalid {key} = {value!r}; expected a number of seconds")
            elif key != "clock_offset_s" and value < 0:
                raise FaultsError(f"invalid {key} = {value!r}; expected 0 or more")
        else:
            raise FaultsError(
                f"unknown key {key!r}; expected one of {', '.join(sorted(_FLAGS | _NUMBERS))}"
            )
        values[key] = value
    return Faults(**values)


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
            faults = parse_faults(json.loads(self._path.read_text()))
        except (OSError, ValueError) as exc:
            # json.JSONDecodeError and FaultsError are both ValueErrors.
            self._signature = signature
            self._logger.error(
                "faults_invalid %s; the previous faults stay in force",
                fields(file=self._path, error=exc),
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
                       clock_offset_s=faults.clock_offset_s),
            )
