"""Monthly usage per backend: counted in memory as calls happen, flushed to the store.

``record`` is called by the metering wrapper on every backend call (cheap, no I/O).
``flush`` adds the pending counts to the store and reloads this month's totals, so
counts from other instances sharing a PostgreSQL store are seen too. The month is the
UTC calendar month; a new month starts from zero.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from appliance.clock import month_of, utcnow
from appliance.meta.models import UsageCounters, UsageDelta
from appliance.meta.store import MetadataStore


@dataclass(frozen=True, slots=True)
class Caps:
    """Monthly limits of one backend (None = no limit)."""

    requests: int | None = None
    egress_bytes: int | None = None
    ingress_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class Remaining:
    requests: int | None
    egress_bytes: int | None
    ingress_bytes: int | None


class UsageMeter:
    """Counts backend usage and knows what is left under each backend's caps."""

    def __init__(
        self,
        store: MetadataStore,
        caps: Mapping[str, Caps],
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._caps = dict(caps)
        self._clock = clock
        self._month = month_of(clock())
        self._flushed: dict[str, UsageCounters] = {}
        self._pending: dict[tuple[str, str], list[int]] = {}
        self._inflight: dict[tuple[str, str], list[int]] = {}
        """Counts being flushed: still counted until the reload that includes them."""

    def record(self, backend: str, requests: int, egress: int, ingress: int) -> None:
        """Count one call's usage (never blocks, never fails)."""
        month = month_of(self._clock())
        counts = self._pending.setdefault((backend, month), [0, 0, 0])
        counts[0] += requests
        counts[1] += egress
        counts[2] += ingress

    def totals(self, backend: str) -> tuple[int, int, int]:
        """This month's (requests, egress, ingress) as known here, pending included."""
        month = month_of(self._clock())
        base = self._flushed.get(backend) if month == self._month else None
        new = self._pending.get((backend, month), [0, 0, 0])
        flying = self._inflight.get((backend, month), [0, 0, 0])
        pending = [new[i] + flying[i] for i in range(3)]
        if base is None:
            return pending[0], pending[1], pending[2]
        return (
            base.requests + pending[0],
            base.egress_bytes + pending[1],
            base.ingress_bytes + pending[2],
        )

    def remaining(self, backend: str) -> Remaining:
        """What is left under each cap this month (None where there is no cap)."""
        caps = self._caps.get(backend, Caps())
        requests, egress, ingress = self.totals(backend)

        def left(cap: int | None, used: int) -> int | None:
            return None if cap is None else max(0, cap - used)

        return Remaining(
            left(caps.requests, requests),
            left(caps.egress_bytes, egress),
            left(caps.ingress_bytes, ingress),
        )

    def near_cap(self, fraction: float = 0.9) -> bool:
        """True when some backend has used ``fraction`` of one of its caps this month
        (the flusher then flushes faster, so several instances see it sooner)."""
        for backend, caps in self._caps.items():
            used = self.totals(backend)
            for cap, count in zip(
                (caps.requests, caps.egress_bytes, caps.ingress_bytes), used, strict=True
            ):
                if cap is not None and count >= cap * fraction:
                    return True
        return False

    async def flush(self) -> None:
        """Write pending counts to the store and reload this month's totals.

        On a store error the pending counts are kept for the next flush.
        """
        pending, self._pending = self._pending, {}
        self._inflight = pending
        deltas = [
            UsageDelta(backend, month, c[0], c[1], c[2])
            for (backend, month), c in sorted(pending.items())
            if any(c)
        ]
        try:
            if deltas:
                await self._store.add_usage(deltas)
        except BaseException:
            self._inflight = {}
            for key, counts in pending.items():
                merged = self._pending.setdefault(key, [0, 0, 0])
                for i in range(3):
                    merged[i] += counts[i]
            raise
        try:
            await self.reload()
        finally:
            self._inflight = {}

    async def reload(self) -> None:
        """Read this month's totals from the store."""
        month = month_of(self._clock())
        rows = await self._store.get_usage(month)
        self._month = month
        self._flushed = {row.backend: row for row in rows}
