"""The live pool: backends by name, their states, and a fresh-enough ``PoolView``.

The view joins the store's quota ledger, the usage meter's caps and each backend's
state. It is cached for ``max_age`` seconds: it only ranks candidates, while the
store's atomic reservation is what actually guards space.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence

from appliance.meta.store import MetadataStore
from appliance.placement.health import CLOSED, Breakers, counts_as_failure
from appliance.placement.router import BackendState, BackendView, PoolView, Router
from appliance.placement.usage import UsageMeter
from backends.base import Backend

log = logging.getLogger("cairn.pool")


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
        max_age: float = 0.5,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.router = router
        self.meter = meter
        self._order = [b.name for b in backends]
        self._backends = {b.name: b for b in backends}
        self._states = {name: BackendState.ACTIVE for name in self._order}
        self._states.update(states or {})
        self._groups = dict(groups or {})
        self._timeouts = dict(replica_timeouts or {})
        self.breakers = breakers or Breakers(self._order)
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
        if (left.requests, left.ingress_bytes, left.egress_bytes) == (
            view.requests_left,
            view.ingress_left,
            view.egress_left,
        ):
            return view
        return dataclasses.replace(
            view,
            requests_left=left.requests,
            ingress_left=left.ingress_bytes,
            egress_left=left.egress_bytes,
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
        space = {s.name: s for s in await self.store.get_space()}
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
                    reserved_bytes=ledger.reserved_bytes if ledger else 0,
                    requests_left=left.requests,
                    ingress_left=left.ingress_bytes,
                    egress_left=left.egress_bytes,
                    group=self._groups.get(name),
                    circuit=self.breakers.state(name),
                )
            )
        self._view = PoolView(tuple(views))
        self._view_at = now
        return self._view
