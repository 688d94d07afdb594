"""Background workers: garbage collection, the janitor, usage flushing, health checks.

Each worker has ``run_once`` (one bounded pass; returns how much it did, for tests and
metrics) and is driven by ``run_forever``. They are safe to run in several instances at
once: queue claims are leased, and every step is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from appliance.clock import utcnow
from appliance.data.chunkstore import ChunkStorage
from appliance.meta.backoff import Backoff
from appliance.meta.errors import Conflict, MetaError
from appliance.meta.store import GC_QUEUE, MetadataStore
from appliance.placement.leases import OWNER_PREFIX as LEASE_OWNER_PREFIX
from appliance.placement.leases import STALE_AFTER as LEASE_STALE_AFTER
from appliance.placement.pool import PoolState
from appliance.placement.usage import UsageMeter
from backends.errors import BackendError, BlobNotFound

log = logging.getLogger("cairn.workers")


class GcWorker:
    """Deletes the blobs of chunks whose refcount reached zero, then their records.

    A blob delete that fails is retried from the durable queue with backoff; items are
    keyed by chunk, and a chunk at refcount zero can never be referenced again, so a
    retry can never delete live data.
    """

    def __init__(
        self, store: MetadataStore, chunks: ChunkStorage, *, backoff: Backoff | None = None
    ) -> None:
        self._store = store
        self._chunks = chunks
        self._backoff = backoff or Backoff()

    async def run_once(self, limit: int = 100) -> int:
        items = await self._store.claim(GC_QUEUE, limit=limit, lease_seconds=300)
        done = 0
        for item in items:
            chunk_id = str(item.payload.get("chunk_id", ""))
            locations = await self._store.claim_garbage(chunk_id)
            failed: list[str] = []
            for location in locations or []:
                if await self._chunks.delete_blob(location.backend, location.blob_key):
                    await self._store.forget_location(chunk_id, location.backend)
                else:
                    failed.append(location.backend)
            if failed:
                await self._store.retry_later(
                    item.item_id,
                    error=f"delete failed on {', '.join(failed)}",
                    backoff=self._backoff,
                )
                continue
            await self._store.ack(item.item_id)
            done += 1
        return done


class Janitor:
    """Aborts versions left UPLOADING too long (a crashed writer) and releases the
    reservations such writers held, and quota leases of processes that died."""

    def __init__(
        self,
        store: MetadataStore,
        *,
        upload_ttl: timedelta = timedelta(hours=24),
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._ttl = upload_ttl
        self._clock = clock

    async def run_once(self, limit: int = 100) -> int:
        cutoff = self._clock() - self._ttl
        aborted = 0
        for version_id in await self._store.list_stale_versions(cutoff, limit):
            try:
                await self._store.abort_version(version_id)
                aborted += 1
            except Conflict:
                pass  # committed meanwhile
        released = await self._store.release_stale_reservations(cutoff)
        # a lease lives seconds: one this old belongs to a process that died
        released += await self._store.release_stale_reservations(
            self._clock() - LEASE_STALE_AFTER, owner_prefix=LEASE_OWNER_PREFIX
        )
        if aborted or released:
            log.info(
                "janitor: aborted %d stale uploads, released %d reservations", aborted, released
            )
        return aborted + released


class UsageFlusher:
    """Writes the usage meter's counts to the store: every interval, and every
    ``fast_interval`` seconds while a backend is near one of its caps (90 %)."""

    def __init__(self, meter: UsageMeter, *, fast_interval: float = 1.0) -> None:
        self._meter = meter
        self._fast = fast_interval

    async def run_once(self) -> int:
        """Flush once; near a cap wait ``fast_interval`` and return 1 (run again at
        once), else return 0 (wait the normal interval)."""
        await self._meter.flush()
        if self._meter.near_cap():
            await asyncio.sleep(self._fast)
            return 1
        return 0


async def run_forever(
    name: str,
    step: Callable[[], Awaitable[int]],
    *,
    interval: float,
    stop: asyncio.Event,
) -> None:
    """Call ``step`` until ``stop`` is set: again at once while it finds work, else
    after ``interval`` seconds. Errors are logged and retried after the interval."""
    while not stop.is_set():
        try:
            did = await step()
        except MetaError as exc:
            log.warning("%s: metadata store unavailable: %s", name, exc)
            did = 0
        except Exception:
            log.exception("%s failed", name)
            did = 0
        if did:
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


PROBE_KEY = "cairn-health-probe"
"""The blob key the health check asks for (it never exists: ``BlobNotFound`` is healthy)."""


class HealthChecker:
    """Probes every backend (a HEAD of a key that does not exist) and feeds the result
    to its circuit breaker, so a failed backend's circuit opens without client traffic
    and a recovered one's closes."""

    def __init__(self, pool: PoolState, *, timeout: float = 10.0) -> None:
        self._pool = pool
        self._timeout = timeout

    async def check(self, name: str) -> bool:
        """Probe one backend; True when it answered."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._pool.backend(name).head(PROBE_KEY)
        except BlobNotFound:
            pass
        except (BackendError, TimeoutError) as exc:
            self._pool.report(name, exc)
            return False
        self._pool.report(name, None)
        return True

    async def run_once(self) -> int:
        """Probe all backends at once, except those past their monthly request cap (a
        probe would be a request beyond it); returns 0 (nothing left for right away)."""
        left = {b.name: b.requests_left for b in (await self._pool.view()).backends}
        names = [name for name in self._pool.names() if left.get(name) != 0]
        await asyncio.gather(*(self.check(name) for name in names))
        return 0
