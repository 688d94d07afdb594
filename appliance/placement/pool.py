"""The live pool: backends by name, their states, and a fresh-enough ``PoolView``.

The view joins the store's quota ledger, the usage meter's caps and each backend's
state. It is cached for ``max_age`` seconds: it only ranks candidates, while the
store's atomic reservation is what actually guards space.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

from appliance.meta.errors import StoreUnavailable
from appliance.meta.models import BackendSpace
from appliance.meta.store import MetadataStore
from appliance.placement.health import CLOSED, Breakers, counts_as_failure
from appliance.placement.leases import QuotaLeases
from appliance.placement.router import BackendState, BackendView, PoolView, Router
from appliance.placement.usage import UsageMeter
from backends.base import Backend

log = logging.getLogger("cairn.pool")


class LatencyStats:
    """The last ``size`` chunk-read latencies of one backend (seconds)."""

    MIN_SAMPLES = 20

    def __init__(self, size: int = 200) -> None:
        self._samples: collections.deque[float] = collections.deque(maxlen=size)
        self._median: float | None = None
        """``typical``'s answer until the next sample (every pool view asks for it)."""

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)
        self._median = None

    def typical(self) -> float | None:
        """The median, once there are a few samples (None before)."""
        if len(self._samples) < 5:
            return None
        if self._median is None:
            self._median = statistics.median(self._samples)
        return self._median

    def p95(self) -> float | None:
        """The 95th percentile, once there are ``MIN_SAMPLES`` samples (None before)."""
        if len(self._samples) < self.MIN_SAMPLES:
            return None
        ordered = sorted(self._samples)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]


class PoolState:
    """Backends in configuration order with their state; builds ``PoolView`` snapshots."""

    def __init__(
        self,
        store: MetadataStore,
        backends: Sequence[Backend],
        router: Router,
        meter: UsageMeter,
        *,
        states: Mapping[str, BackendState] | None = None,
        groups: Mapping[str, str | None] | None = None,
        replica_timeouts: Mapping[str, float] | None = None,
        breakers: Breakers | None = None,
        hedged_reads: bool = False,
        leases: QuotaLeases | None = None,
        max_age: float = 0.5,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.leases = leases if leases is not None else QuotaLeases(store, lease_bytes=0)
        """Where blob writes reserve quota (small blobs from per-backend leases)."""
        self.router = router
        self.meter = meter
        self._order = [b.name for b in backends]
        self._backends = {b.name: b for b in backends}
        self._states = {name: BackendState.ACTIVE for name in self._order}
        self._states.update(states or {})
        self._groups = dict(groups or {})
        self._timeouts = dict(replica_timeouts or {})
        self.breakers = breakers or Breakers(self._order)
        self._hedged = hedged_reads
        self._latency = {name: LatencyStats() for name in self._order}
        self._max_age = max_age
        self._monotonic = monotonic
        self._view: PoolView | None = None
        self._view_at = 0.0

    def backend(self, name: str) -> Backend:
        """The backend called ``name``; KeyError if the pool has none."""
        return self._backends[name]

    def names(self) -> list[str]:
        return list(self._order)

    def replica_timeout(self, name: str) -> float | None:
        """Seconds a chunk read from ``name`` may take before moving on (None = no limit)."""
        return self._timeouts.get(name)

    def observe(self, name: str, seconds: float) -> None:
        """Record how long a successful chunk read from ``name`` took."""
        stats = self._latency.get(name)
        if stats is not None:
            stats.add(seconds)

    def latency(self, name: str) -> LatencyStats | None:
        return self._latency.get(name)

    def hedge_delay(self, name: str) -> float | None:
        """With hedged reads on: how long to wait for ``name`` before asking another
        replica too (its recent p95, at least 10 ms); None when off or not yet known."""
        if not self._hedged:
            return None
        stats = self._latency.get(name)
        p95 = stats.p95() if stats is not None else None
        return None if p95 is None else max(0.01, p95)

    def report(self, name: str, error: BaseException | None) -> None:
        """Feed the result of a call to ``name`` to its circuit breaker (None = success).
        Errors that do not say the backend is unhealthy (a missing blob) count as success."""
        breaker = self.breakers[name]
        before = breaker.state
        if error is None or not counts_as_failure(error):
            breaker.success()
        else:
            breaker.failure(f"{type(error).__name__}: {error}")
        if breaker.state != before:
            if breaker.state == CLOSED:
                log.info("backend %s: circuit closed", name)
            else:
                log.warning("backend %s: circuit %s (%s)", name, breaker.state, error)
            self.invalidate()

    def set_state(self, name: str, state: BackendState) -> None:
        self._states[name] = state
        self.invalidate()

    def account(self, name: str, nbytes: int) -> None:
        """Apply a reservation made (or released, negative) here to the cached view, so
        back-to-back writes see each other without a store round trip."""
        if self._view is None:
            return
        self._view = PoolView(
            tuple(
                dataclasses.replace(b, reserved_bytes=max(0, b.reserved_bytes + nbytes))
                if b.name == name
                else b
                for b in self._view.backends
            )
        )

    def _with_caps(self, view: BackendView) -> BackendView:
        left = self.meter.remaining(view.name)
        latency = self._latency[view.name].typical()
        if (left.requests, left.ingress_bytes, left.egress_bytes, latency) == (
            view.requests_left,
            view.ingress_left,
            view.egress_left,
            view.latency,
        ):
            return view
        return dataclasses.replace(
            view,
            requests_left=left.requests,
            ingress_left=left.ingress_bytes,
            egress_left=left.egress_bytes,
            latency=latency,
        )

    def invalidate(self) -> None:
        """Forget the cached view (after a reservation failed, a state changed...)."""
        self._view = None

    async def view(self) -> PoolView:
        """A snapshot whose space figures are at most ``max_age`` seconds old; what is
        left under the monthly caps is always current (counted in memory)."""
        now = self._monotonic()
        if self._view is not None and now - self._view_at < self._max_age:
            return PoolView(tuple(self._with_caps(b) for b in self._view.backends))
        try:
            space = {s.name: s for s in await self.store.get_space()}
        except StoreUnavailable:
            # reads go on while the store is down: the last ledger seen, else none
            # (writes fail at their reservation anyway)
            if self._view is not None:
                return PoolView(tuple(self._with_caps(b) for b in self._view.backends))
            return self._build({})
        self._view = self._build(space)
        self._view_at = now
        return self._view

    def _build(self, space: Mapping[str, BackendSpace]) -> PoolView:
        views = []
        for order, name in enumerate(self._order):
            ledger = space.get(name)
            left = self.meter.remaining(name)
            views.append(
                BackendView(
                    name=name,
                    order=order,
                    state=self._states[name],
                    quota_bytes=ledger.quota_bytes if ledger else None,
                    used_bytes=ledger.used_bytes if ledger else 0,
                    # a lease's bytes not yet handed out are free space to this process
                    reserved_bytes=(
                        max(0, ledger.reserved_bytes - self.leases.idle(name)) if ledger else 0
                    ),
                    requests_left=left.requests,
                    ingress_left=left.ingress_bytes,
                    egress_left=left.egress_bytes,
                    group=self._groups.get(name),
                    circuit=self.breakers.state(name),
                    latency=self._latency[name].typical(),
                )
            )
        return PoolView(tuple(views))
