"""Per-client token buckets for the token server's rate limit."""

from __future__ import annotations

import threading
import time

# Buckets kept at most. Beyond this, the buckets that have refilled completely are
# forgotten first, because forgetting a full bucket changes nothing.
MAX_BUCKETS = 10_000


class RateLimiter:
    """Allows each client a burst of requests, refilled at a steady rate."""

    def __init__(self, burst: int, per_minute: float) -> None:
        self._burst = float(burst)
        self._rate_per_s = per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, client: str, now: float | None = None) -> float:
        """Take one request from client's bucket; return 0, or the seconds until one is free."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, at = self._buckets.get(client, (self._burst, now))
            tokens = min(self._burst, tokens + (now - at) * self._rate_per_s)
            if tokens < 1.0:
                self._buckets[client] = (tokens, now)
                return (1.0 - tokens) / self._rate_per_s
            if client not in self._buckets and len(self._buckets) >= MAX_BUCKETS:
                self._forget_full(now)
            self._buckets[client] = (tokens - 1.0, now)
            return 0.0

    def _forget_full(self, now: float) -> None:
        full = [client for client, (tokens, at) in self._buckets.items()
                if tokens + (now - at) * self._rate_per_s >= self._burst]
        for client in full:
            del self._buckets[client]
        # NOTE: with every bucket still refilling, the table grows past MAX_BUCKETS until
        # some of them are full again; each entry is a few dozen bytes.
