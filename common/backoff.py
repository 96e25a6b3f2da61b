"""Capped exponential backoff with jitter, for reconnect loops."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double from min_s up to max_s, each drawn from [delay/2, delay].

    The jitter spreads the reconnects of a fleet that lost its link at the same moment.
    """

    def __init__(self, min_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self.attempts = 0
        self._rng = rng or random.Random()

    def next_delay_s(self) -> float:
        ceiling = min(self.max_s, self.min_s * (2 ** min(self.attempts, 30)))
        self.attempts += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempts = 0
