"""Rate limiting for repeated log lines and tap events."""

from __future__ import annotations

import time


class RateLimit:
    """Allows one event per interval_s and counts the events suppressed in between."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._next_allowed = 0.0
        self._suppressed = 0

    def allow(self, now: float | None = None) -> int | None:
        """Return how many events were suppressed since the last allowed one, or None to skip.

        now is a time.monotonic() reading; the current one is taken when it is None.
        """
        now = time.monotonic() if now is None else now
        if now < self._next_allowed:
            self._suppressed += 1
            return None
        suppressed = self._suppressed
        self._suppressed = 0
        self._next_allowed = now + self.interval_s
        return suppressed
