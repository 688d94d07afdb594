"""The Router: chooses where chunks go and where they are read from (pure).

It works on a ``PoolView`` snapshot (state, space and monthly caps per backend) and
never does I/O, so every policy is unit-testable.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class BackendState(enum.StrEnum):
    ACTIVE = "active"
    READ_ONLY = "read_only"
    DRAINING = "draining"
    OFFLINE = "offline"


class Placement(enum.StrEnum):
    PACK = "pack"
    SPREAD = "spread"


@dataclass(frozen=True, slots=True)
class BackendView:
    """What the Router knows of one backend at snapshot time.

    ``free_bytes`` None means no quota. Cap fields are what is left this month
    (None = no cap).
    """

    name: str
    order: int
    state: BackendState = BackendState.ACTIVE
    quota_bytes: int | None = None
    used_bytes: int = 0
    reserved_bytes: int = 0
    requests_left: int | None = None
    ingress_left: int | None = None
    egress_left: int | None = None
    group: str | None = None
    """Failure domain; replicas of a chunk go to distinct groups (None = its own)."""
    circuit: str = "closed"
    """The backend's circuit breaker: ``closed``, ``open`` or ``half_open``."""
    latency: float | None = None
    """Typical (median) recent chunk-read time in seconds; None = not known yet."""

    @property
    def domain(self) -> str:
        """The failure domain replicas must not share: the group, else the name."""
        return self.group if self.group is not None else "\0" + self.name

    @property
    def circuit_open(self) -> bool:
        return self.circuit == "open"

    @property
    def free_bytes(self) -> int | None:
        if self.quota_bytes is None:
            return None
        return max(0, self.quota_bytes - self.used_bytes - self.reserved_bytes)

    @property
    def utilisation(self) -> float:
        if not self.quota_bytes:
            return 0.0 if self.quota_bytes is None else 1.0
        return (self.used_bytes + self.reserved_bytes) / self.quota_bytes

    def can_take(self, nbytes: int) -> bool:
        """True when a write of ``nbytes`` fits space and caps right now."""
        if self.state is not BackendState.ACTIVE or self.circuit_open:
            return False
        if self.free_bytes is not None and self.free_bytes < nbytes:
            return False
        if self.requests_left is not None and self.requests_left < 1:
            return False
        return self.ingress_left is None or self.ingress_left >= nbytes

    def can_serve(self, nbytes: int) -> bool:
        """True when a read of ``nbytes`` is within its caps and it is reachable."""
        if self.state is BackendState.OFFLINE or self.circuit_open:
            return False
        if self.requests_left is not None and self.requests_left < 1:
            return False
        return self.egress_left is None or self.egress_left >= nbytes


@dataclass(frozen=True, slots=True)
class PoolView:
    backends: tuple[BackendView, ...]

    def by_name(self) -> dict[str, BackendView]:
        return {b.name: b for b in self.backends}


def cap_problem(view: BackendView, nbytes: int, *, write: bool) -> str | None:
    """Which monthly cap stops ``view`` from taking (``write``) or serving ``nbytes``,
    for error messages; None when no cap is in the way."""
    if view.requests_left is not None and view.requests_left < 1:
        return f"{view.name}: monthly request cap reached"
    if write and view.ingress_left is not None and view.ingress_left < nbytes:
        return f"{view.name}: monthly ingress cap reached ({view.ingress_left} bytes left)"
    if not write and view.egress_left is not None and view.egress_left < nbytes:
        return f"{view.name}: monthly egress cap reached ({view.egress_left} bytes left)"
    return None


class Router:
    """Placement policy over a snapshot. Stateless apart from its settings."""

    def __init__(self, placement: Placement) -> None:
        self._placement = placement

    def write_candidates(
        self,
        view: PoolView,
        nbytes: int,
        *,
        exclude: Iterable[str] = (),
        exclude_domains: Iterable[str] = (),
    ) -> list[str]:
        """Backends that can take ``nbytes`` now, best first; replicas take distinct ones.

        ``exclude`` names backends and ``exclude_domains`` failure domains
        (``BackendView.domain``) already holding a replica. ``pack`` keeps configuration
        order (fill the first, then the next); ``spread`` prefers the lowest utilisation,
        then the most free space.
        """
        skip = set(exclude)
        domains = set(exclude_domains)
        eligible = [
            b
            for b in view.backends
            if b.name not in skip and b.domain not in domains and b.can_take(nbytes)
        ]
        if self._placement is Placement.PACK:
            eligible.sort(key=lambda b: b.order)
        else:
            eligible.sort(
                key=lambda b: (
                    b.utilisation,
                    -(b.free_bytes if b.free_bytes is not None else 1 << 62),
                    b.order,
                )
            )
        return [b.name for b in eligible]

    def read_order(self, view: PoolView, backends: Sequence[str], nbytes: int) -> list[str]:
        """Replica backends in the order to try: servable ones first, by config order,
        except that a backend much slower than the fastest (typical read time over twice
        and 50 ms more; a backend not timed yet counts as fast) goes after the others.

        Backends not servable right now (offline, circuit open, past a cap) come last
        rather than never, so a read still has a chance when nothing better exists.
        """
        known = view.by_name()
        # a replica whose backend was never timed counts as fast (so it gets tried)
        fastest = min((known[n].latency or 0.0 for n in backends if n in known), default=0.0)

        def slow(b: BackendView) -> bool:
            # much slower than the fastest replica: try it after the others
            if b.latency is None:
                return False
            return b.latency > max(2 * fastest, fastest + 0.05)

        def rank(name: str) -> tuple[int, int, int]:
            b = known.get(name)
            if b is None:
                return (2, 0, 1 << 30)
            return (0 if b.can_serve(nbytes) else 1, int(slow(b)), b.order)

        return sorted(backends, key=rank)
