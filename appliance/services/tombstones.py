"""Tombstones: an acknowledged delete is never undone by reads from blobs.

Reads served from blobs while the metadata store is down (``blobfallback``) take the
newest complete version under a key's prefix. The blobs of a deleted version live on
until the GC (``gc_delay_seconds``), and chunks that copies still reference live longer,
so a delete of a key that had a current version first writes a small tombstone blob
``<prefix>/<version id>/tombstone`` (docs/FORMAT.md), with a version id newer than the
one deleted, on the bucket's write quorum, and records it in the delete's transaction.
The newest thing under the prefix is then the tombstone: the fallback answers 404.

A recorded tombstone holds its quota (a chunk of size 0 with its replicas) until it is
no longer needed: a commit of a newer version of the key retires it in that
transaction, and ``TombstoneSweeper`` retires it once no older chunk 0 or manifest is
listed under the key's prefixes on any backend (every backend must answer). A retired
tombstone's chunk goes to the gc queue, whose worker deletes the blob and frees the quota.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import TypeVar

from appliance.clock import utcnow
from appliance.data.blobformat import (
    CHUNK0_NAME,
    MANIFEST_NAME,
    encode_tombstone,
    tombstone_blob_key,
)
from appliance.data.chunkstore import ChunkStorage, ChunkStore
from appliance.errors import NoCapacity
from appliance.ids import new_sortable_id, successor_id
from appliance.meta.errors import Conflict, StoreUnavailable
from appliance.meta.models import Location, NewChunk, NewTombstone, Tombstone
from appliance.meta.store import MetadataStore
from appliance.placement.pool import PoolState
from appliance.services.blobfallback import BlobFallback
from backends.errors import BackendError

log = logging.getLogger("cairn.tombstones")
T = TypeVar("T")
ATTEMPTS = 3
"""Tries of a delete whose key got a newer version between the look-up and the commit."""


async def _bounded(jobs: Sequence[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    slots = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[T]]) -> T:
        async with slots:
            return await job()

    return list(await asyncio.gather(*(one(j) for j in jobs)))


class Tombstones:
    """Deletes keys with a tombstone each (see the module docstring)."""

    def __init__(
        self,
        store: MetadataStore,
        chunks: ChunkStorage,
        placer: ChunkStore,
        pool: PoolState,
        *,
        concurrency: int = 16,
    ) -> None:
        self._store = store
        self._chunks = chunks
        self._placer = placer
        self._pool = pool
        self._concurrency = max(1, concurrency)

    async def delete(self, bucket: str, keys: Sequence[str]) -> list[str]:
        """Remove the current versions of ``keys`` in one store transaction, each key
        that has one with a tombstone written first; return the keys that existed.

        Raises the store's errors (``StoreUnavailable``...), ``BackendsUnavailable``
        (no backend took a tombstone). Tombstones not recorded are removed again, except
        after ``StoreUnavailable`` (the delete may have committed: its tombstone stays).
        """
        for attempt in range(ATTEMPTS):
            currents = await _bounded(
                [functools.partial(self._store.get_current, bucket, k) for k in keys],
                self._concurrency,
            )
            existing = {
                k: v.version_id for k, v in zip(keys, currents, strict=True) if v is not None
            }
            if not existing:
                return []
            written = await self._write_all(bucket, existing)
            tombs = dict(zip(existing, written, strict=True))
            try:
                if len(keys) == 1:
                    found = await self._store.delete_object(
                        bucket, keys[0], tombstone=tombs[keys[0]]
                    )
                    deleted = [keys[0]] if found is not None else []
                else:
                    deleted = await self._store.delete_objects(bucket, keys, tombstones=tombs)
            except StoreUnavailable:
                raise  # the transaction may have committed: keep the tombstones
            except Conflict:
                await self._undo(tombs.values())
                if attempt + 1 == ATTEMPTS:
                    raise
                continue  # a newer version committed meanwhile: look again
            except BaseException:
                await self._undo(tombs.values())
                raise
            await self._undo([t for k, t in tombs.items() if k not in deleted])
            return deleted
        raise AssertionError("unreachable")

    async def _write_all(self, bucket: str, after: dict[str, str]) -> list[NewTombstone]:
        """A tombstone for each key (newer than its version in ``after``); when one
        cannot be written, the others are removed again and the error raised."""
        slots = asyncio.Semaphore(self._concurrency)

        async def one(key: str, version_id: str) -> NewTombstone:
            async with slots:
                return await self._write(bucket, key, version_id)

        results = await asyncio.gather(
            *(one(k, v) for k, v in after.items()), return_exceptions=True
        )
        written = [r for r in results if isinstance(r, NewTombstone)]
        for result in results:
            if isinstance(result, BaseException):
                await self._undo(written)
                raise result
        return written

    async def _write(self, bucket: str, key: str, after: str) -> NewTombstone:
        """Put a tombstone newer than version ``after`` on the bucket's write quorum."""
        version_id = new_sortable_id()
        if version_id <= after:
            version_id = successor_id(after)
        blob = encode_tombstone(version_id)
        blob_key = tombstone_blob_key(self._chunks.blob_prefix(bucket, key), version_id)
        chunk_id = new_sortable_id()
        try:
            placed = await self._placer.place(blob, blob_key, version_id, chunk_id, bucket=bucket)
        except NoCapacity:
            # a full pool must still take deletes: a tombstone is ~100 bytes over quota
            placed = await self._place_over_quota(blob, blob_key, chunk_id, bucket)
        chunk = NewChunk(chunk_id, 0, hashlib.sha256(blob).digest(), len(blob))
        return NewTombstone(version_id, chunk, placed)

    async def _place_over_quota(
        self, blob: bytes, blob_key: str, chunk_id: str, bucket: str
    ) -> tuple[tuple[Location, int | None], ...]:
        """Write a tombstone without a reservation, on the quorum's count of backends
        (distinct groups) in configuration order. Raises ``NoCapacity`` when fewer
        took it."""
        pool = self._pool
        want = self._placer.policy.quorum_for(bucket)
        view = (await pool.view()).by_name()
        placed: list[tuple[Location, int | None]] = []
        domains: set[str] = set()
        failures: list[str] = []
        for name in pool.names():
            domain = view[name].domain if name in view else name
            if len(placed) == want:
                break
            if domain in domains:
                continue
            try:
                await pool.backend(name).put(blob_key, blob, size=len(blob))
            except BackendError as exc:
                failures.append(f"{name}: {exc}")
                continue
            domains.add(domain)
            placed.append((Location(chunk_id, name, blob_key, len(blob)), None))
        if len(placed) < want:
            await self._undo_placed(placed)
            raise NoCapacity("no backend took the delete's tombstone: " + "; ".join(failures))
        return tuple(placed)

    async def _undo(self, tombs: Iterable[NewTombstone]) -> None:
        for tomb in tombs:
            await self._undo_placed(tomb.locations)

    async def _undo_placed(self, placed: Sequence[tuple[Location, int | None]]) -> None:
        try:
            await self._chunks.undo(placed)
        except Exception as exc:  # the janitor releases reservations; fsck names blobs
            log.warning("could not remove an unrecorded tombstone: %s", exc)


class TombstoneSweeper:
    """Retires tombstones that hide nothing any more (see the module docstring).

    A tombstone younger than ``min_age`` (the GC delay: the deleted version's chunks
    are still there) is not looked at.
    """

    def __init__(
        self,
        store: MetadataStore,
        fallback: BlobFallback,
        *,
        min_age: timedelta = timedelta(hours=1),
        batch: int = 100,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._fallback = fallback
        self._min_age = min_age
        self._batch = batch
        self._clock = clock

    async def obsolete(self, tombstone: Tombstone) -> bool:
        """True when every backend was listed and none holds an older chunk 0 or
        manifest under the key's prefixes."""
        listing = await self._fallback.scan(tombstone.bucket, tombstone.key)
        if listing.unlisted:
            return False
        return not any(
            version_id < tombstone.version_id
            and (CHUNK0_NAME in found.blobs or MANIFEST_NAME in found.blobs)
            for version_id, found in listing.versions.items()
        )

    async def run_once(self) -> int:
        """One pass over the recorded tombstones; returns how many were retired."""
        cutoff = self._clock() - self._min_age
        retired = 0
        after = ""
        while page := await self._store.list_tombstones(after=after, limit=self._batch):
            for tombstone in page:
                if tombstone.created_at > cutoff:
                    continue
                if await self.obsolete(tombstone) and await self._store.drop_tombstone(
                    tombstone.version_id
                ):
                    retired += 1
            after = page[-1].version_id
        if retired:
            log.info("retired %d tombstones", retired)
        return retired
