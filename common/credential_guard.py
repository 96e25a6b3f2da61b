"""The uplink's checks of its clock and credentials, at each connect attempt and periodically.

The checks never stop a connection attempt: the hub is the judge of a credential, and a
gateway whose clock is wrong must still try the credentials it was given. They make every
such problem loud instead, once per change of state, in the log and on the tap.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.clock import (
    LOCAL_FLOOR_SOURCE,
    MIN_OFFSET_S,
    ClockError,
    HubClock,
    TimeFloor,
    fetch_hub_offset,
    format_utc,
)
from common.config import CredentialSettings
from common.credential_files import (
    SECONDS_PER_DAY,
    ClientCertificate,
    check_certificate_validity,
)
from common.credentials import VALID, ValidityCheck, check_validity
from common.logs import fields

# The watchdog looks at the credentials at least this often between connect attempts.
WATCHDOG_INTERVAL_S = 60.0

# During a long run of rejected connects, the hub's time is read again at most this often.
TIME_RECHECK_S = 300.0

# Bound on the HTTPS request for the hub's Date header.
DATE_TIMEOUT_S = 10.0

# Log event of each credential's check.
CHECK_EVENTS = {"sas_token": "sas_check", "client_certificate": "certificate_check"}

# Callback that publishes an event on the uplink's tap: kind, then the event's values.
Report = Callable[..., None]


@dataclass(frozen=True)
class DateSource:
    """Endpoint of the hub's HTTPS Date header: the MQTT host, with the same TLS trust."""

    host: str
    port: int
    context: ssl.SSLContext


@dataclass(frozen=True)
class TokenState:
    """The SAS token of the current connection attempt."""

    expiry_s: int
    minted: bool


class CredentialGuard:
    """Checks the clock, the SAS token and the client certificate, and reads the hub's time
    when the clock is behind or the hub rejected the credentials."""

    def __init__(
        self,
        settings: CredentialSettings,
        floor: TimeFloor,
        clock: HubClock,
        date_source: DateSource | None,
        certificate: ClientCertificate | None,
        logger: logging.Logger,
        report: Report,
    ) -> None:
        self._settings = settings
        self._floor = floor
        self._clock = clock
        self._date_source = date_source
        self._certificate = certificate
        self._logger = logger
        self._report = report

        self._states: dict[str, str] = {}
        self._clock_behind = False
        self._time_read_at: float | None = None  # time.monotonic() of the last Date read
        self._token: TokenState | None = None
        self._next_watchdog_s = time.monotonic() + WATCHDOG_INTERVAL_S

    def use_credentials(self, certificate: ClientCertificate | None,
                        date_source: DateSource | None) -> None:
        """Check another credential set from now on, as the uplink's fallback does."""
        self._certificate = certificate
        self._date_source = date_source
        self._states.pop("client_certificate", None)

    # -- at each connect attempt -----------------------------------------------------------

    def before_connect(self, retrying: bool) -> None:
        """Compare the wall clock with the lower bound, and read the hub's time if behind."""
        check = self._floor.check(time.time())
        if check.behind and not self._clock_behind:
            self._logger.error(
                "clock_behind %s; the wall clock is earlier than the stored lower bound on the "
                "real time, so it is wrong. SAS tokens and certificates are judged with the "
                "hub's time if it can be read, and the uplink connects with the credentials "
                "as given; fix the gateway's time source (NTP or RTC)",
                check.describe(),
            )
            self._report("clock_behind", now=int(check.now_s), floor=int(check.floor_s),
                         floor_source=check.floor_source)
        elif not check.behind and self._clock_behind:
            self._logger.info("clock_ok %s", check.describe())
            self._report("clock_ok", now=int(check.now_s), floor=int(check.floor_s))
        self._clock_behind = check.behind

        if check.behind and not self._clock.corrected and self._time_read_at is None:
            self.read_hub_time("the wall clock is behind the stored lower bound")
        self.check_certificate(retrying)

    def after_rejection(self) -> None:
        """Read the hub's time after the hub rejected the credentials: a wrong clock is a
        common cause, and a token minted with the hub's time then works."""
        now = time.monotonic()
        if self._time_read_at is None or now - self._time_read_at >= TIME_RECHECK_S:
            self.read_hub_time("the hub rejected the credentials")

    def on_connected(self) -> None:
        self._floor.raise_to(self._clock.now(), LOCAL_FLOOR_SOURCE)

    def read_hub_time(self, reason: str) -> None:
        """Read the hub's Date header and apply it as the offset of the gateway's clock."""
        source = self._date_source
        if source is None:
            return
        self._time_read_at = time.monotonic()
        try:
            hub_time_s, offset_s = fetch_hub_offset(
                source.host, source.port, source.context, DATE_TIMEOUT_S
            )
        except ClockError as exc:
            self._logger.warning(
                "hub_time_unavailable %s",
                fields(reason=reason, error=exc,
                       consequence="SAS tokens are minted and checked with the wall clock"),
            )
            return

        if abs(offset_s) < MIN_OFFSET_S:
            offset_s = 0.0
        old_offset_s, self._clock.offset_s = self._clock.offset_s, offset_s
        details = fields(reason=reason, offset_s=f"{offset_s:.1f}", hub=int(hub_time_s),
                         hub_utc=format_utc(hub_time_s), wall=int(hub_time_s - offset_s),
                         wall_utc=format_utc(hub_time_s - offset_s))
        if offset_s:
            self._logger.warning(
                "clock_offset_applied %s; SAS tokens are minted and checked with the hub's "
                "time, and the system clock is left as it is", details)
        else:
            self._logger.info("clock_confirmed %s", details)
        if offset_s != old_offset_s:
            self._report("clock_offset", offset_s=round(offset_s, 1), hub=int(hub_time_s))

        if hub_time_s < self._floor.floor_s:
            self._floor.reset_to(hub_time_s)
        else:
            self._floor.raise_to(hub_time_s, "hub Date header")

        # A wall clock within MIN_OFFSET_S of the hub's agrees with the better source, so it
        # is right even where the Date header's rounding leaves it a little behind the bound.
        check = self._floor.check(time.time())
        if self._clock_behind and offset_s == 0.0:
            self._clock_behind = False
            self._logger.info("clock_ok %s", check.describe())
            self._report("clock_ok", now=int(check.now_s), floor=int(check.floor_s))

    # -- credential validity ---------------------------------------------------------------

    def check_token(self, token: TokenState | None, retrying: bool) -> None:
        """Check the SAS token of a connection attempt and remember it for the watchdog."""
        self._token = token
        if token is not None:
            self._log_validity("sas_token", self._token_validity(token), retrying)

    def check_certificate(self, retrying: bool) -> None:
        if self._certificate is None:
            return
        result = check_certificate_validity(self._certificate, self._settings, self._clock.now())
        self._log_validity("client_certificate", result, retrying)

    def watchdog(self) -> None:
        """Repeat the checks every WATCHDOG_INTERVAL_S; log only a change of state."""
        now = time.monotonic()
        if now < self._next_watchdog_s:
            return
        self._next_watchdog_s = now + WATCHDOG_INTERVAL_S
        if self._token is not None:
            self._log_validity("sas_token", self._token_validity(self._token), retrying=True)
        self.check_certificate(retrying=True)

    def _token_validity(self, token: TokenState) -> ValidityCheck:
        # A minted token is renewed long before it expires, so only a given one gets the
        # warning ahead of its expiry.
        warning_s = 0.0 if token.minted else self._settings.sas_warning_days * SECONDS_PER_DAY
        result = check_validity(
            "SAS token", token.expiry_s, self._clock.now(), warning_s,
            self._settings.expiry_error_margin_s,
        )
        if result.state != VALID and not token.minted:
            message = (f"{result.message}; the connection string has a SAS token and no "
                       "device key, so only a new SAS token fixes this, and pages keep "
                       "buffering meanwhile")
            result = ValidityCheck(result.state, result.level, message)
        return result

    def _log_validity(self, credential: str, result: ValidityCheck, retrying: bool) -> None:
        """Log a state change at its level; repeat an unchanged state at INFO or DEBUG."""
        changed = self._states.get(credential) != result.state
        self._states[credential] = result.state
        level = result.level
        if not changed:
            level = logging.DEBUG if retrying else logging.INFO
        if result.state == VALID and retrying:
            level = logging.DEBUG
        self._logger.log(level, "%s %s", CHECK_EVENTS[credential], result.message)
        if changed:
            values: dict[str, Any] = {"credential": credential, "state": result.state,
                                      "message": result.message}
            self._report("credential_check", **values)
