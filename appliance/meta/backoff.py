"""Exponential backoff for durable queue retries (pure)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before retry ``attempt`` (1-based): ``base * factor**(attempt-1)``, capped.

    ``jitter`` spreads each delay uniformly over ``[delay*(1-jitter), delay]`` so many
    items failing together do not retry together.
    """

    base_seconds: float = 5.0
    factor: float = 2.0
    max_seconds: float = 3600.0
    jitter: float = 0.2

    def delay(self, attempt: int, rng: random.Random | None = None) -> timedelta:
        raw = min(self.max_seconds, self.base_seconds * self.factor ** max(0, attempt - 1))
        spread = raw * self.jitter * (rng or random).random()
        return timedelta(seconds=raw - spread)

    def next_time(self, attempt: int, now: datetime, rng: random.Random | None = None) -> datetime:
        return now + self.delay(attempt, rng)
