"""Circuit breakers: one per backend, fed by the results of real calls and health checks.

A breaker is ``closed`` while calls succeed. ``threshold`` consecutive failures open it:
the Router then sends writes elsewhere and tries the backend last for reads. After
``cooldown`` seconds it is ``half_open``: the backend is used again, and the next result
decides (a success closes it, a failure opens it for another ``cooldown``). The health
checker probes every backend on a schedule, so an idle backend's circuit still moves.
State lives in memory, per process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from backends.errors import BackendError, BackendFull, BlobNotFound, InvalidBlobKey

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


def counts_as_failure(exc: BaseException) -> bool:
    """True when ``exc`` says the backend is unhealthy: not a missing blob, a refused key
    or a full backend (the backend answered), but timeouts, 5xx, refused auth..."""
    if isinstance(exc, BlobNotFound | InvalidBlobKey | BackendFull):
        return False
    return isinstance(exc, BackendError | TimeoutError | OSError)


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    """A breaker at one moment (for the admin API)."""

    state: str
    consecutive_failures: int
    last_error: str | None
    opened_for: float | None
    """Seconds since the circuit opened (None unless open or half-open)."""


class CircuitBreaker:
    """One backend's breaker (see the module docstring). Not thread-safe; one loop."""

    def __init__(
        self,
        *,
        threshold: int = 5,
        cooldown: float = 30.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1 or cooldown <= 0:
            raise ValueError("threshold must be at least 1 and cooldown positive")
        self._threshold = threshold
        self._cooldown = cooldown
        self._monotonic = monotonic
        self._failures = 0
        self._opened_at: float | None = None
        self._last_error: str | None = None

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return CLOSED
        if self._monotonic() - self._opened_at >= self._cooldown:
            return HALF_OPEN
        return OPEN

    def success(self) -> None:
        """A call worked: close the circuit."""
        self._failures = 0
        self._opened_at = None

    def failure(self, error: str) -> bool:
        """A call failed; returns True when this opened (or re-opened) the circuit."""
        self._failures += 1
        self._last_error = error[:500]
        if self._opened_at is not None:  # half-open probe failed (or open): restart the wait
            reopened = self.state == HALF_OPEN
            if reopened:
                self._opened_at = self._monotonic()
            return reopened
        if self._failures >= self._threshold:
            self._opened_at = self._monotonic()
            return True
        return False

    def status(self) -> BreakerStatus:
        opened = None if self._opened_at is None else self._monotonic() - self._opened_at
        return BreakerStatus(self.state, self._failures, self._last_error, opened)


class Breakers:
    """The breakers of a pool's backends, by name."""

    def __init__(
        self,
        names: Iterable[str],
        *,
        threshold: int = 5,
        cooldown: float = 30.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._by_name = {
            name: CircuitBreaker(threshold=threshold, cooldown=cooldown, monotonic=monotonic)
            for name in names
        }

    def __getitem__(self, name: str) -> CircuitBreaker:
        return self._by_name[name]

    def state(self, name: str) -> str:
        breaker = self._by_name.get(name)
        return CLOSED if breaker is None else breaker.state
