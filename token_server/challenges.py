"""Single-use challenge nonces with a short lifetime, for gateways without certificates."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass

# Outcomes of redeeming a nonce, which are also the audit log's reasons.
ACCEPTED = "accepted"
UNKNOWN = "challenge_unknown_or_used"
EXPIRED = "challenge_expired"
WRONG_SERIAL = "challenge_for_another_serial"


@dataclass(frozen=True)
class Pending:
    serial: str
    expires_at: float


class ChallengeBook:
    """Issues nonces and redeems each one at most once, before it expires."""

    def __init__(self, ttl_s: float, max_pending: int) -> None:
        self.ttl_s = ttl_s
        self._max_pending = max_pending
        self._pending: dict[str, Pending] = {}
        self._lock = threading.Lock()

    def issue(self, serial: str, now: float | None = None) -> str | None:
        """Return a new nonce for serial, or None when too many are pending."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if len(self._pending) >= self._max_pending:
                self._pending = {nonce: pending for nonce, pending in self._pending.items()
                                 if pending.expires_at > now}
            if len(self._pending) >= self._max_pending:
                return None
            nonce = secrets.token_urlsafe(32)
            self._pending[nonce] = Pending(serial, now + self.ttl_s)
            return nonce

    def redeem(self, serial: str, nonce: str, now: float | None = None) -> str:
        """Consume nonce and return ACCEPTED, or why it cannot be used.

        The nonce is consumed whatever the outcome, so a second request with it, a replay,
        always gets UNKNOWN.
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            pending = self._pending.pop(nonce, None)
        if pending is None:
            return UNKNOWN
        if pending.expires_at <= now:
            return EXPIRED
        if pending.serial != serial:
            return WRONG_SERIAL
        return ACCEPTED
