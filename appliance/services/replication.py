"""Replication: bring every chunk to its factor, repair bad replicas, drop extras.

``ReplicationWorker`` takes items from the durable ``replicate`` queue (written by the
write path for replicas beyond the write quorum, by reads that met a corrupt or missing
replica, and by the scan) and repairs one chunk per item. ``ReplicationScanner`` walks
every live chunk and queues those below or above their factor. Both are idempotent and
safe in several instances: queue claims are leased, a new replica is recorded only while
the chunk is live, and a replica is deleted only when enough verified others remain.

Counting: a chunk's good replicas are those on configured backends, minus a replica
reported bad, counting one per failure domain (a second replica in the same group does
not add safety). Extras are removed last in the Router's read order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from appliance.data.chunkstore import ChunkStorage
from appliance.errors import BackendsUnavailable, DataCorrupted, KeyUnavailable, NoCapacity
from appliance.meta.backoff import Backoff
from appliance.meta.errors import Conflict
from appliance.meta.models import ChunkReplicas, Location
from appliance.meta.store import REPLICATE_QUEUE, MetadataStore
from appliance.placement.pool import PoolState
from appliance.placement.replication import ReplicationPolicy
from appliance.placement.router import PoolView

log = logging.getLogger("cairn.replication")


class RepairIncomplete(Exception):
    """A chunk could not reach its factor yet (retried from the queue)."""


@dataclass(frozen=True, slots=True)
class Health:
    """How a chunk stands against its factor."""

    wanted: int
    keepers: tuple[Location, ...]
    """One good replica per failure domain, best first."""
    extras: tuple[Location, ...]
    """Good replicas beyond one per domain (same domain as a keeper)."""
    bad: Location | None

    @property
    def below(self) -> bool:
        return len(self.keepers) < self.wanted

    @property
    def above(self) -> bool:
        return len(self.keepers) > self.wanted or bool(self.extras)


def assess(
    info: ChunkReplicas,
    policy: ReplicationPolicy,
    pool: PoolState,
    view: PoolView,
    bad: str | None = None,
) -> Health:
    """Where ``info``'s chunk stands (pure; ``bad`` names a replica reported bad)."""
    known = view.by_name()
    wanted = policy.wanted(info.buckets)
    bad_loc = next((loc for loc in info.locations if loc.backend == bad), None)
    good = [loc for loc in info.locations if loc.backend in known and loc.backend != bad]
    order = pool.router.read_order(view, [loc.backend for loc in good], info.chunk.stored_size)
    by_backend = {loc.backend: loc for loc in good}
    keepers: list[Location] = []
    extras: list[Location] = []
    seen: set[str] = set()
    for name in order:
        domain = known[name].domain
        (extras if domain in seen else keepers).append(by_backend[name])
        seen.add(domain)
    return Health(wanted, tuple(keepers), tuple(extras), bad_loc)


@dataclass
class RepairResult:
    added: int = 0
    removed: int = 0


class ReplicationWorker:
    """Repairs the chunks named on the ``replicate`` queue (see the module docstring)."""

    def __init__(
        self,
        store: MetadataStore,
        chunks: ChunkStorage,
        pool: PoolState,
        policy: ReplicationPolicy,
        *,
        backoff: Backoff | None = None,
    ) -> None:
        self._store = store
        self._chunks = chunks
        self._pool = pool
        self._policy = policy
        self._backoff = backoff or Backoff()

    async def run_once(self, limit: int = 50) -> int:
        """Repair up to ``limit`` queued chunks; returns how many items were finished.
        A chunk that cannot be repaired yet is retried with backoff, and dead-lettered
        (listed by the admin API) after its last attempt."""
        items = await self._store.claim(REPLICATE_QUEUE, limit=limit, lease_seconds=600)
        done = 0
        for item in items:
            chunk_id = str(item.payload.get("chunk_id", ""))
            bad = item.payload.get("bad")
            try:
                await self.repair(chunk_id, bad=str(bad) if bad is not None else None)
            except (
                RepairIncomplete,
                BackendsUnavailable,
                DataCorrupted,
                NoCapacity,
                KeyUnavailable,
            ) as exc:
                log.warning("chunk %s not repaired yet: %s", chunk_id, exc)
                await self._store.retry_later(item.item_id, error=str(exc), backoff=self._backoff)
                continue
            await self._store.ack(item.item_id)
            done += 1
        return done

    async def repair(self, chunk_id: str, *, bad: str | None = None) -> RepairResult:
        """Bring one chunk to its factor: copy it where replicas are missing, then delete
        the ``bad`` replica and any extras. Idempotent.

        Raises ``RepairIncomplete`` (still below the factor, or a delete refused),
        ``NoCapacity``, ``BackendsUnavailable`` or ``DataCorrupted`` (no good source).
        """
        result = RepairResult()
        info = await self._store.get_chunk_replicas(chunk_id)
        if info is None or info.chunk.refcount <= 0:
            return result  # gone or on its way to GC: nothing to keep
        self._pool.invalidate()
        view = await self._pool.view()
        health = assess(info, self._policy, self._pool, view, bad)
        keepers = list(health.keepers)
        if health.below:
            sources = [*health.keepers, *health.extras]
            if health.bad is not None:
                sources.append(health.bad)  # last resort; the copy is verified anyway
            sources += [loc for loc in info.locations if loc not in sources]
            if not sources:
                raise RepairIncomplete(f"chunk {chunk_id} has no replica left to copy from")
            placed = await self._chunks.replicate(
                info.chunk,
                sources,
                health.wanted - len(keepers),
                keep=[loc.backend for loc in keepers],
                rewrite=bad,
            )
            for location, reservation_id in placed:
                try:
                    await self._store.add_location(location, reservation_id)
                except Conflict:  # the chunk was released meanwhile: drop the copy
                    await self._chunks.undo([(location, reservation_id)])
                    return result
                keepers.append(location)
                result.added += 1
                if health.bad is not None and location.backend == health.bad.backend:
                    health = Health(health.wanted, health.keepers, health.extras, None)
            log.info("chunk %s: %d replica(s) added", chunk_id, result.added)
        if len(keepers) < health.wanted:
            raise RepairIncomplete(
                f"chunk {chunk_id} has {len(keepers)} of {health.wanted} replicas"
            )
        drop = list(health.extras) + keepers[health.wanted :]
        if health.bad is not None:
            drop.append(health.bad)
        refused = []
        for location in drop:
            if await self._chunks.delete_blob(location.backend, location.blob_key):
                await self._store.forget_location(chunk_id, location.backend)
                result.removed += 1
            else:
                refused.append(location.backend)
        if refused:
            raise RepairIncomplete(f"could not delete replicas on {', '.join(refused)}")
        return result


@dataclass
class ScanReport:
    chunks: int = 0
    below: int = 0
    above: int = 0
    queued: int = 0


class ReplicationScanner:
    """Walks every live chunk and queues those below or above their factor."""

    def __init__(
        self,
        store: MetadataStore,
        pool: PoolState,
        policy: ReplicationPolicy,
        *,
        page_size: int = 500,
    ) -> None:
        self._store = store
        self._pool = pool
        self._policy = policy
        self._page_size = page_size

    async def scan(self) -> ScanReport:
        """One full pass. Queue items are keyed by chunk, so a chunk already queued is
        not queued twice."""
        report = ScanReport()
        after = ""
        while True:
            page = await self._store.scan_chunks(after=after, limit=self._page_size)
            if not page:
                break
            view = await self._pool.view()
            for info in page:
                report.chunks += 1
                health = assess(info, self._policy, self._pool, view)
                if not (health.below or health.above):
                    continue
                if health.below:
                    report.below += 1
                else:
                    report.above += 1
                chunk_id = info.chunk.chunk_id
                queued = await self._store.enqueue(
                    REPLICATE_QUEUE, {"chunk_id": chunk_id}, key=f"chunk:{chunk_id}"
                )
                report.queued += queued is not None
            after = page[-1].chunk.chunk_id
        if report.below or report.above:
            log.info(
                "replication scan: %d chunks, %d below and %d above their factor, %d queued",
                report.chunks,
                report.below,
                report.above,
                report.queued,
            )
        return report

    async def run_once(self) -> int:
        """One full pass; returns 0 (a pass leaves no work for right away)."""
        await self.scan()
        return 0
