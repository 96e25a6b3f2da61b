"""How far the gateway trusts its wall clock when it signs and checks credentials.

Timers use time.monotonic() everywhere. The wall clock matters only for timestamps and for
credentials: a SAS token's `se` and a certificate's notBefore and notAfter. A gateway
without NTP, or with a flat RTC battery, can start months in the past, so the gateway keeps
two corrections:

- A persistent lower bound on the real time, `<state_dir>/time-floor.json`: the newest of
  RELEASE_TIME_S, the last time that the hub's Date header confirmed, and the time of the
  last successful connection. A wall clock below it is "behind" for certain.
- An offset learnt from the hub's HTTPS `Date` header, which TLS authenticates. Credentials
  are minted and checked against the wall clock plus that offset. The system clock is
  never set.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import math
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from common.atomic_file import write_atomically
from common.credentials import MAX_EPOCH_S, format_utc_seconds, read_regular_file
from common.errors import PlcBridgeError
from common.logs import fields

# 2026-12-04T00:00:00Z, the day this release was built. No real clock can be earlier on a
# gateway that runs it. Raise it with each release.
RELEASE_TIME_S = 1_796_342_400

TIME_FLOOR_FILE = "time-floor.json"
TIME_FLOOR_VERSION = 1

# Source of a floor saved from the gateway's own clock at a successful connection. Such a
# floor is only as good as that clock was, so the hub's Date header may lower it.
LOCAL_FLOOR_SOURCE = "last successful connection"

# The Date header has whole seconds, and the request takes a round trip. Offsets smaller
# than this are that noise, not a wrong clock, so they are not applied.
MIN_OFFSET_S = 5.0


class ClockError(PlcBridgeError):
    """The hub's time could not be read: the message names the endpoint."""


format_utc = format_utc_seconds


@dataclass(frozen=True)
class ClockCheck:
    """The wall clock compared with the lower bound on the real time."""

    now_s: float
    floor_s: float
    floor_source: str

    @property
    def behind(self) -> bool:
        return self.now_s < self.floor_s

    def describe(self) -> str:
        return fields(
            now=int(self.now_s), now_utc=format_utc(self.now_s),
            floor=int(self.floor_s), floor_utc=format_utc(self.floor_s),
            floor_source=self.floor_source,
        )


class TimeFloor:
    """The persistent lower bound on the real time, in <state_dir>/time-floor.json.

    A file that cannot be read or written is logged and the bound falls back to
    RELEASE_TIME_S, so a broken state folder never stops the uplink.
    """

    def __init__(self, state_dir: Path, logger: logging.Logger) -> None:
        self.path = state_dir / TIME_FLOOR_FILE
        self._logger = logger
        self.floor_s = float(RELEASE_TIME_S)
        self.source = "release time"
        self._load()

    def _load(self) -> None:
        try:
            document = json.loads(read_regular_file(self.path))
            floor_s = float(document["floor_s"])
            source = str(document["source"])
            # json.loads takes Infinity and NaN, and float() takes 1e300.
            if not (math.isfinite(floor_s) and 0 <= floor_s <= MAX_EPOCH_S):
                raise ValueError(f"floor_s out of range; expected epoch seconds up to "
                                 f"{MAX_EPOCH_S}")
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._logger.warning(
                "time_floor_invalid %s",
                fields(file=self.path, reason=exc,
                       consequence="the release time is the only lower bound on the real time"),
            )
            return
        if floor_s > self.floor_s:
            self.floor_s = floor_s
            self.source = source

    def check(self, now_s: float) -> ClockCheck:
        return ClockCheck(now_s, self.floor_s, self.source)

    def raise_to(self, time_s: float, source: str) -> None:
        """Raise the bound to time_s when that is newer; a lower time_s changes nothing."""
        if time_s > self.floor_s:
            self._store(time_s, source)

    def reset_to(self, hub_time_s: float) -> None:
        """Lower the bound to the hub's time. A bound above it was written by a clock that ran
        ahead, and the TLS-authenticated Date header is the better source."""
        if hub_time_s < self.floor_s:
            self._logger.warning(
                "time_floor_lowered %s",
                fields(old=int(self.floor_s), old_utc=format_utc(self.floor_s),
                       old_source=self.source, new=int(hub_time_s),
                       new_utc=format_utc(hub_time_s),
                       reason="the hub's Date header is earlier than the stored bound"),
            )
        self._store(max(hub_time_s, float(RELEASE_TIME_S)), "hub Date header")

    def _store(self, time_s: float, source: str) -> None:
        self.floor_s = time_s
        self.source = source
        document = {"version": TIME_FLOOR_VERSION, "floor_s": int(time_s),
                    "floor_utc": format_utc(time_s), "source": source}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, (json.dumps(document) + "\n").encode())
        except OSError as exc:
            self._logger.warning(
                "time_floor_not_saved %s",
                fields(file=self.path, reason=exc.strerror or exc,
                       consequence="after a restart a clock that is behind may go unnoticed"),
            )


class HubClock:
    """The wall clock plus the offset that the hub's Date header showed, if one was applied.

    The network thread writes the offset and the main thread reads it. A float assignment is
    atomic in CPython, so no lock is needed.
    """

    def __init__(self) -> None:
        self.offset_s = 0.0

    def now(self) -> float:
        return time.time() + self.offset_s

    @property
    def corrected(self) -> bool:
        return self.offset_s != 0.0


def fetch_hub_offset(
    host: str, port: int, context: ssl.SSLContext, timeout_s: float
) -> tuple[float, float]:
    """Read the hub's HTTPS Date header; return (hub time, hub time minus the wall clock).

    TLS uses context, so the CA bundle and the host name check authenticate the time. The
    hub time is the Date header as sent, truncated to whole seconds, so it is a lower bound
    on the real time that a stored floor may be raised to. The offset compares the middle of
    the request with that time plus half a second, the mean of the truncation. Raises
    ClockError naming the endpoint.
    """
    where = f"https://{host}:{port}/"
    connection = http.client.HTTPSConnection(host, port, timeout=timeout_s, context=context)
    try:
        sent_s = time.time()
        connection.request("HEAD", "/")
        response = connection.getresponse()
        received_s = time.time()
        header = response.getheader("Date")
    except ssl.SSLCertVerificationError as exc:
        raise ClockError(
            f"cannot read the time from {where}: certificate verify failed: {exc.verify_message}"
        ) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise ClockError(f"cannot read the time from {where}: {exc}") from exc
    finally:
        connection.close()

    if header is None:
        raise ClockError(f"cannot read the time from {where}: the response has no Date header")
    try:
        hub_time_s = email.utils.parsedate_to_datetime(header).timestamp()
    except (TypeError, ValueError, OverflowError) as exc:
        raise ClockError(f"cannot read the time from {where}: invalid Date {header!r}") from exc
    return hub_time_s, hub_time_s + 0.5 - (sent_s + received_s) / 2
