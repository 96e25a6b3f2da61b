"""The uplink's SAS tokens from the on-site token server, renewed before they expire.

The network thread requests a token before each connection attempt, and again when the
connection's token reaches its renewal time. At that point the connection stays up while a
background thread fetches the next token, and the uplink reconnects only once it holds one.
While the server is unreachable, fetches are retried with capped, jittered backoff and the
connection keeps its token. Once that token has run out, the hub closes the connection, the
pages wait in the buffer, and a credential_check event with state "expired" raises the
credentials alert until a fetch succeeds again.

Times are on the monotonic clock, counted from the start of the fetch with the lifetime
that the server stated, so a wrong wall clock on the gateway does not shift them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.backoff import Backoff
from common.logs import fields
from common.token_client import FetchedToken, TokenServerClient, TokenServerError

# The name under which the credential alert and the status file show this source.
CREDENTIAL = "token_server"

# How often a connection whose token is due asks again whether a new token has arrived.
RENEWAL_POLL_S = 1.0


class TokenUnavailableError(TokenServerError):
    """No valid token is held and the token server gave none."""


@dataclass(frozen=True)
class HeldToken:
    fetched: FetchedToken
    expires_at: float  # monotonic
    renew_at: float  # monotonic


class RemoteTokenSource:
    """The latest token from the token server, and the fetches that replace it.

    issue() and prepare_renewal() run on the network thread. A background fetch runs on a
    thread of its own.
    """

    def __init__(self, client: TokenServerClient, renew_fraction: Callable[[], float],
                 backoff: Backoff, logger: logging.Logger) -> None:
        self._client = client
        self._renew_fraction = renew_fraction
        self._backoff = backoff
        self._logger = logger
        self._lock = threading.Lock()
        self._held: HeldToken | None = None
        self._given: HeldToken | None = None
        self._next_fetch_at = 0.0
        self._fetcher: threading.Thread | None = None
        self._state: str | None = None
        # Publishes a tap event (kind, then values); the uplink's network thread sets it.
        self.report: Callable[..., None] = lambda kind, **values: None

    @property
    def url(self) -> str:
        return self._client.url

    def issue(self) -> tuple[FetchedToken, float]:
        """Return the token for a new connection and its seconds left, fetching one when
        none is fresh.

        Raises TokenUnavailableError when the fetch fails and the held token has run out.
        """
        self._join_fetcher()
        now = time.monotonic()
        with self._lock:
            held = self._held
        if held is not None and now < held.renew_at:
            return self._give(held)

        try:
            held = self._fetch()
        except TokenServerError as exc:
            if held is not None and now < held.expires_at:
                self._logger.warning("token_fetch_failed %s", fields(
                    error=exc, token_left_s=f"{held.expires_at - now:.0f}",
                    consequence="the connection uses the token it holds"))
                return self._give(held)
            self._note_expired(exc, ever_held=held is not None)
            raise TokenUnavailableError(
                f"no valid SAS token: {exc}; pages wait in the buffer until the token "
                "server answers") from exc
        return self._give(held)

    def prepare_renewal(self) -> float | None:
        """Return None when a newer token than the connection's is held, so reconnect now.

        Otherwise start a background fetch, unless one runs or the backoff delay has not
        passed, and return the seconds until the connection should ask again.
        """
        with self._lock:
            if self._held is not None and self._held is not self._given:
                return None
            running = self._fetcher is not None and self._fetcher.is_alive()
            if not running and time.monotonic() >= self._next_fetch_at:
                self._fetcher = threading.Thread(target=self._fetch_in_background,
                                                 name="token-fetch", daemon=True)
                self._fetcher.start()
        return RENEWAL_POLL_S

    def discard(self) -> None:
        """Make the next issue() fetch a new token, after the hub rejected the held one."""
        with self._lock:
            if self._held is not None:
                self._held = HeldToken(self._held.fetched, self._held.expires_at, 0.0)

    def _fetch_in_background(self) -> None:
        try:
            held = self._fetch()
        except TokenServerError as exc:
            delay_s = self._backoff.next_delay_s()
            with self._lock:
                self._next_fetch_at = time.monotonic() + delay_s
                left_s = self._held.expires_at - time.monotonic() if self._held else 0.0
            self._logger.warning("token_fetch_failed %s", fields(
                error=exc, next_delay_s=f"{delay_s:.2f}", token_left_s=f"{max(0.0, left_s):.0f}",
                consequence="the connection keeps its token until it runs out"))
            self.report("token_fetch_failed", url=self.url, error=str(exc))
            return
        self._logger.info("token_renewed %s", fields(
            url=self.url, expiry_s=held.fetched.token.expiry_s))

    def _fetch(self) -> HeldToken:
        started = time.monotonic()
        fetched = self._client.fetch()
        lifetime_s = float(fetched.ttl_s)
        held = HeldToken(fetched, started + lifetime_s,
                         started + lifetime_s * self._renew_fraction())
        with self._lock:
            self._held = held
            self._next_fetch_at = 0.0
        self._backoff.reset()
        self._note_valid(fetched)
        return held

    def _give(self, held: HeldToken) -> tuple[FetchedToken, float]:
        with self._lock:
            self._given = held
        return held.fetched, max(0.0, held.expires_at - time.monotonic())

    def _join_fetcher(self) -> None:
        fetcher = self._fetcher
        if fetcher is not None:
            # A fetch is bounded by the client's timeout for each of its two requests.
            fetcher.join(2 * self._client.settings.timeout_s + 1.0)

    def _note_valid(self, fetched: FetchedToken) -> None:
        self._set_state("valid", f"SAS token from {self.url} valid for {fetched.ttl_s} s "
                                 f"(se={fetched.token.expiry_s})")

    def _note_expired(self, exc: Exception, ever_held: bool) -> None:
        what = "SAS token expired" if ever_held else "no SAS token yet"
        self._set_state("expired", f"{what}, and the token server issued no new one: {exc}")

    def _set_state(self, state: str, message: str) -> None:
        """Report a state change as the credential guard does, for the credentials alert."""
        with self._lock:
            changed = state != self._state
            self._state = state
        if not changed:
            return
        level = logging.INFO if state == "valid" else logging.ERROR
        self._logger.log(level, "token_state %s", fields(state=state, message=message))
        values: dict[str, Any] = {"credential": CREDENTIAL, "state": state, "message": message}
        self.report("credential_check", **values)
