"""The memory cache: plaintext chunks kept by their immutable chunk id (issue 5, part 4).

``CachingChunkStore`` wraps any ``ChunkStorage`` (the plain chunk store, or the
encrypting layer over it) and implements it again. Writes, ``undo`` and ``delete_blob``
pass straight through; ``read`` is served from an LRU of whole chunks bounded in bytes.

Contracts:

- Keys are chunk ids. A chunk never changes once written, and an overwrite or a copy
  makes a new version that names other chunk ids, so a cached chunk can never be stale:
  nothing is ever invalidated.
- The total of cached bytes never exceeds ``max_size``; a chunk larger than
  ``max_object_size`` is never kept (its reads go straight through). With ``ttl`` > 0 an
  entry is dropped ``ttl`` seconds after it was stored.
- Only whole chunks, as returned (and verified) by the layer below, are kept. Concurrent
  misses of a whole chunk share one fetch (``SingleFlight``); a failed fetch is not
  remembered, so the next read tries again.
- Admission: a chunk of at most ``admit_at_once`` bytes (default: 1/64 of ``max_size``,
  at least 1 MiB) is kept when first read whole. A larger chunk is kept only when it is
  read again while its id is still remembered as recently read: a one-off stream of a
  large object passes through without pushing everything else out (with an LRU, a scan
  larger than the cache would evict all and hit nothing).
- A range read of a cached chunk is sliced from it. A range miss fetches only the range
  unless the range is at least half of a chunk that may be kept at once, or the chunk
  was read recently (a second piece of one chunk means the client reads it piecewise,
  e.g. FUSE), in which case the whole chunk is fetched and kept. See docs/cache.md.
- Returned buffers are immutable (``bytes``) whenever they come from the cache.
- A chunk of at most ``admit_written`` bytes (default 256 KiB: small objects, the tail of
  a large one) is also kept when it is written, from the bytes handed to the layer below
  (copied first): reading back a small file just closed or put needs no backend. Larger
  written chunks are not copied (a large PUT pays nothing).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cachetools import Cache, LRUCache, TTLCache

from appliance.cache.singleflight import SingleFlight
from appliance.data.blobformat import ChunkHeader
from appliance.data.buffers import ChunkPayload, payload_view
from appliance.data.chunkstore import WrittenChunk
from appliance.data.storage import ChunkStorage, ChunkStorageWrapper
from appliance.meta.models import Chunk, Location

RECENT_READS = 4096
"""How many chunk ids the memory of recent reads not kept holds (ids only, ~0.5 MiB)."""
MIN_ADMIT_AT_ONCE = 1024 * 1024
ADMIT_WRITTEN = 256 * 1024


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of the memory cache's counters (monotonic since start) and size."""

    hits: int
    """Reads served from a cached chunk."""
    misses: int
    """Reads of a cacheable chunk that was not cached."""
    coalesced: int
    """Misses that waited for a fetch another read had started (no backend call of their own)."""
    range_fetches: int
    """Misses that fetched only the requested range (the chunk was not kept)."""
    passed: int
    """Misses of a whole large chunk read for the first time (fetched, not kept)."""
    bypassed: int
    """Reads of chunks larger than ``max_object_size`` (never cached)."""
    evictions: int
    """Chunks dropped to make room (expiry by ``ttl`` is not counted)."""
    entries: int
    size: int
    """Bytes held now."""
    max_size: int


class _CountingLRU(LRUCache[str, bytes]):
    evictions = 0

    def popitem(self) -> tuple[str, bytes]:
        item = super().popitem()
        self.evictions += 1
        return item


class _CountingTTL(TTLCache[str, bytes]):
    evictions = 0

    def popitem(self) -> tuple[str, bytes]:
        item = super().popitem()
        self.evictions += 1
        return item


class CachingChunkStore(ChunkStorageWrapper[ChunkStorage]):
    """A ``ChunkStorage`` that keeps whole plaintext chunks in memory; see the module doc."""

    def __init__(
        self,
        inner: ChunkStorage,
        *,
        max_size: int,
        max_object_size: int,
        ttl: float = 0.0,
        admit_at_once: int | None = None,
        admit_written: int = ADMIT_WRITTEN,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_size <= 0:
            raise ValueError("max_size must be positive (leave the cache out to disable it)")
        if ttl < 0:
            raise ValueError("ttl must not be negative")
        super().__init__(inner)
        self.max_size = max_size
        self.max_object_size = min(max_object_size, max_size)
        self.admit_at_once = (
            max(MIN_ADMIT_AT_ONCE, max_size // 64) if admit_at_once is None else admit_at_once
        )
        self.admit_written = min(admit_written, self.admit_at_once, self.max_object_size)
        self._entries: _CountingLRU | _CountingTTL
        if ttl > 0:
            self._entries = _CountingTTL(max_size, ttl, timer=timer, getsizeof=len)
        else:
            self._entries = _CountingLRU(max_size, getsizeof=len)
        self._recent: Cache[str, bool] = LRUCache(RECENT_READS)
        self._flights: SingleFlight[str, bytes | bytearray] = SingleFlight()
        self.hits = 0
        self.misses = 0
        self.coalesced = 0
        self.range_fetches = 0
        self.passed = 0
        self.bypassed = 0

    # -- counters -------------------------------------------------------------------
    @property
    def evictions(self) -> int:
        return self._entries.evictions

    @property
    def size(self) -> int:
        """Bytes held now (expired entries are dropped first)."""
        self._expire()
        return int(self._entries.currsize)

    def stats(self) -> CacheStats:
        self._expire()
        return CacheStats(
            hits=self.hits,
            misses=self.misses,
            coalesced=self.coalesced,
            range_fetches=self.range_fetches,
            passed=self.passed,
            bypassed=self.bypassed,
            evictions=self.evictions,
            entries=len(self._entries),
            size=int(self._entries.currsize),
            max_size=self.max_size,
        )

    def __contains__(self, chunk_id: object) -> bool:
        return chunk_id in self._entries

    def clear(self) -> None:
        """Drop every cached chunk (counters are kept)."""
        self._entries.clear()
        self._recent.clear()

    def _expire(self) -> None:
        if isinstance(self._entries, TTLCache):
            self._entries.expire()

    # -- ChunkStorage: writes pass through (small chunks are kept); reads ------------
    async def write_chunk(
        self,
        header: ChunkHeader,
        payload: ChunkPayload,
        blob_key: str,
        *,
        bucket: str | None = None,
    ) -> WrittenChunk:
        """Written by the layer below; kept as well when at most ``admit_written``
        bytes. Nothing is kept when the write raises."""
        small = 0 < header.size == len(payload) <= self.admit_written
        keep = bytes(payload_view(payload)) if small else None
        written = await self.inner.write_chunk(header, payload, blob_key, bucket=bucket)
        if keep is not None:
            self._recent.pop(header.chunk_id, None)
            self._entries[header.chunk_id] = keep
        return written

    async def read(
        self, chunk: Chunk, locations: Sequence[Location], start: int, end: int
    ) -> bytes | bytearray:
        """Bytes ``[start, end)`` of ``chunk``: from the cache, or fetched (and kept).

        Raises what the layer below raises (``DataCorrupted``, ``BackendsUnavailable``,
        ``ValueError`` for a range outside the chunk); nothing is cached then.
        """
        if start == end or chunk.size > self.max_object_size:
            if start != end:
                self.bypassed += 1
            return await self.inner.read(chunk, locations, start, end)
        if not 0 <= start <= end <= chunk.size:
            raise ValueError(f"range [{start}, {end}) outside chunk of {chunk.size} bytes")
        whole = start == 0 and end == chunk.size
        cached = self._entries.get(chunk.chunk_id)
        if cached is not None:
            self.hits += 1
            return cached if whole else cached[start:end]
        self.misses += 1
        chunk_id = chunk.chunk_id
        seen = chunk_id in self._recent or chunk_id in self._flights
        at_once = chunk.size <= self.admit_at_once
        if not whole and not seen and not (at_once and 2 * (end - start) >= chunk.size):
            self._recent[chunk_id] = True
            self.range_fetches += 1
            return await self.inner.read(chunk, locations, start, end)
        keep = at_once or seen
        data, joined = await self._flights.run(
            chunk_id, lambda: self._fetch(chunk, locations, keep=keep)
        )
        if joined:
            self.coalesced += 1
        return data if whole else data[start:end]

    async def _fetch(
        self, chunk: Chunk, locations: Sequence[Location], *, keep: bool
    ) -> bytes | bytearray:
        """The whole chunk from below; kept (as immutable ``bytes``) when ``keep``, else
        remembered as read and handed on without a copy (readers never modify it)."""
        data = await self.inner.read(chunk, locations, 0, chunk.size)
        if not keep:
            self._recent[chunk.chunk_id] = True
            self.passed += 1
            return data
        kept = data if isinstance(data, bytes) else bytes(data)
        self._recent.pop(chunk.chunk_id, None)
        self._entries[chunk.chunk_id] = kept
        return kept
