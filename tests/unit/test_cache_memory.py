"""The memory cache (``appliance.cache``): byte bound, counters, TTL, single-flight,
errors, cancellation and the range-read policy.

The layer below is ``ChunkSource``: a chunk store stand-in that serves chunk bytes from
a dict and counts its reads (the cache, not it, is under test here; the cache over the
real chunk store and backends is in ``tests/service/test_cache.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.cache.memory import CachingChunkStore
from appliance.cache.singleflight import SingleFlight
from appliance.data.blobformat import ChunkHeader, Manifest
from appliance.data.chunkstore import WrittenChunk
from appliance.errors import BackendsUnavailable
from appliance.meta.models import Chunk, Location, NewChunk

pytestmark = pytest.mark.unit
KiB = 1024


def make_chunk(chunk_id: str, data: bytes) -> Chunk:
    return Chunk(
        chunk_id=chunk_id,
        size=len(data),
        sha256=hashlib.sha256(data).digest(),
        stored_size=len(data) + 100,
        refcount=1,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


class ChunkSource:
    """Serves chunks from memory; counts reads; can fail, or hold reads until released."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.reads: list[tuple[str, int, int]] = []
        self.fail_next = 0
        self.gate: asyncio.Event | None = None
        self.cancelled = 0

    def add(self, chunk_id: str, data: bytes) -> Chunk:
        self.data[chunk_id] = data
        return make_chunk(chunk_id, data)

    async def read(
        self, chunk: Chunk, locations: Sequence[Location], start: int, end: int
    ) -> bytes | bytearray:
        self.reads.append((chunk.chunk_id, start, end))
        if self.gate is not None:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if self.fail_next:
            self.fail_next -= 1
            raise BackendsUnavailable(f"chunk {chunk.chunk_id}: injected")
        return bytearray(self.data[chunk.chunk_id][start:end])

    async def write_chunk(
        self,
        header: ChunkHeader,
        payload: bytes | bytearray | memoryview,
        blob_key: str,
        *,
        bucket: str | None = None,
    ) -> WrittenChunk:
        """Stores the bytes (as a backend would), then scribbles on the caller's buffer
        when it is writable (as an in-place encrypting layer could)."""
        if self.fail_next:
            self.fail_next -= 1
            raise BackendsUnavailable(f"chunk {header.chunk_id}: injected")
        self.data[header.chunk_id] = bytes(payload)
        if isinstance(payload, bytearray):
            payload[:] = bytes(len(payload))
        chunk = NewChunk(header.chunk_id, header.size, header.sha256, header.size + 100)
        return WrittenChunk(chunk, ())

    async def write_manifest(
        self, manifest: Manifest, blob_key: str, chunk_id: str
    ) -> WrittenChunk:
        raise NotImplementedError

    async def undo(self, placed: Sequence[tuple[Location, int | None]]) -> None:
        raise NotImplementedError

    async def delete_blob(self, backend: str, blob_key: str) -> bool:
        raise NotImplementedError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cache_over(
    source: ChunkSource, max_size: int = 1024 * KiB, max_object_size: int = 256 * KiB, **kw: Any
) -> CachingChunkStore:
    return CachingChunkStore(source, max_size=max_size, max_object_size=max_object_size, **kw)


async def test_second_read_is_a_hit_and_counters_say_so() -> None:
    source = ChunkSource()
    chunk = source.add("c1", os.urandom(10 * KiB))
    cache = cache_over(source)
    first = await cache.read(chunk, [], 0, chunk.size)
    second = await cache.read(chunk, [], 0, chunk.size)
    assert first == second == source.data["c1"]
    assert isinstance(second, bytes)  # immutable: a caller cannot damage the cached copy
    assert len(source.reads) == 1
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.size) == (1, 1, 1, 10 * KiB)
    # a range of a cached chunk is sliced from it
    assert await cache.read(chunk, [], 100, 2000) == source.data["c1"][100:2000]
    assert len(source.reads) == 1
    assert cache.hits == 2


async def test_small_written_chunks_are_kept_and_large_ones_not_copied() -> None:
    source = ChunkSource()
    cache = cache_over(source, admit_written=64 * KiB)

    async def write(chunk_id: str, data: bytes) -> Chunk:
        header = ChunkHeader(chunk_id, "v1", 0, len(data), hashlib.sha256(data).digest())
        await cache.write_chunk(header, bytearray(data), f"blobs/{chunk_id}")
        return make_chunk(chunk_id, data)

    small_data, large_data = os.urandom(16 * KiB), os.urandom(100 * KiB)
    small = await write("small", small_data)
    large = await write("large", large_data)
    assert "small" in cache and "large" not in cache
    assert await cache.read(small, [], 0, small.size) == small_data  # not the scribbles
    assert source.reads == [] and cache.hits == 1
    assert await cache.read(large, [], 0, large.size) == large_data
    assert len(source.reads) == 1
    source.fail_next = 1  # a failed write keeps nothing
    with pytest.raises(BackendsUnavailable):
        await write("failed", small_data)
    assert "failed" not in cache


async def test_chunks_larger_than_max_object_size_go_straight_through() -> None:
    source = ChunkSource()
    chunk = source.add("big", os.urandom(300 * KiB))
    cache = cache_over(source, max_object_size=256 * KiB)
    for _ in range(2):
        assert await cache.read(chunk, [], 0, chunk.size) == source.data["big"]
    assert len(source.reads) == 2
    assert (cache.bypassed, cache.hits, cache.size) == (2, 0, 0)


async def test_empty_reads_touch_nothing() -> None:
    source = ChunkSource()
    chunk = source.add("c", b"abc")
    cache = cache_over(source)
    assert await cache.read(chunk, [], 1, 1) == b""
    assert cache.stats().misses == 0


async def test_a_range_outside_the_chunk_is_refused() -> None:
    source = ChunkSource()
    chunk = source.add("c", b"abc")
    cache = cache_over(source)
    with pytest.raises(ValueError, match="outside chunk"):
        await cache.read(chunk, [], 2, 4)


async def test_lru_evicts_the_least_recently_used_chunk() -> None:
    source = ChunkSource()
    chunks = [source.add(f"c{i}", os.urandom(100 * KiB)) for i in range(4)]
    cache = cache_over(source, max_size=300 * KiB, max_object_size=100 * KiB)
    for chunk in chunks[:3]:
        await cache.read(chunk, [], 0, chunk.size)
    await cache.read(chunks[0], [], 0, chunks[0].size)  # c0 is now the most recent
    await cache.read(chunks[3], [], 0, chunks[3].size)  # evicts c1
    assert "c1" not in cache
    assert all(c in cache for c in ("c0", "c2", "c3"))
    assert cache.evictions == 1
    assert cache.size == 300 * KiB


async def test_ttl_drops_entries_after_their_time() -> None:
    source = ChunkSource()
    chunk = source.add("c", os.urandom(KiB))
    clock = Clock()
    cache = cache_over(source, ttl=60, timer=clock)
    await cache.read(chunk, [], 0, chunk.size)
    clock.now += 59
    await cache.read(chunk, [], 0, chunk.size)
    assert len(source.reads) == 1
    clock.now += 2
    assert cache.size == 0
    await cache.read(chunk, [], 0, chunk.size)
    assert len(source.reads) == 2
    assert cache.evictions == 0  # expiry is not eviction


async def test_a_failed_fetch_is_not_remembered() -> None:
    source = ChunkSource()
    chunk = source.add("c", os.urandom(KiB))
    cache = cache_over(source)
    source.fail_next = 1
    with pytest.raises(BackendsUnavailable):
        await cache.read(chunk, [], 0, chunk.size)
    assert "c" not in cache
    assert await cache.read(chunk, [], 0, chunk.size) == source.data["c"]
    assert len(source.reads) == 2


async def test_concurrent_misses_share_one_fetch_and_one_error() -> None:
    source = ChunkSource()
    chunk = source.add("c", os.urandom(64 * KiB))
    cache = cache_over(source)
    source.gate = asyncio.Event()
    readers = [asyncio.ensure_future(cache.read(chunk, [], 0, chunk.size)) for _ in range(20)]
    readers += [asyncio.ensure_future(cache.read(chunk, [], 5, 10)) for _ in range(5)]
    await asyncio.sleep(0.01)
    source.gate.set()
    results = await asyncio.gather(*readers)
    assert len(source.reads) == 1
    assert all(r == source.data["c"] for r in results[:20])
    assert all(r == source.data["c"][5:10] for r in results[20:])
    assert (cache.misses, cache.coalesced) == (25, 24)

    # a failure reaches every waiter, and is not kept
    other = source.add("d", os.urandom(KiB))
    source.gate = asyncio.Event()
    source.fail_next = 1
    waiting = [asyncio.ensure_future(cache.read(other, [], 0, other.size)) for _ in range(5)]
    await asyncio.sleep(0.01)
    source.gate.set()
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(o, BackendsUnavailable) for o in outcomes)
    source.gate = None
    assert await cache.read(other, [], 0, other.size) == source.data["d"]
    assert len(source.reads) == 3


async def test_a_cancelled_reader_does_not_cancel_the_others() -> None:
    source = ChunkSource()
    chunk = source.add("c", os.urandom(KiB))
    cache = cache_over(source)
    source.gate = asyncio.Event()
    first = asyncio.ensure_future(cache.read(chunk, [], 0, chunk.size))
    second = asyncio.ensure_future(cache.read(chunk, [], 0, chunk.size))
    await asyncio.sleep(0.01)
    first.cancel()  # the one that started the fetch
    await asyncio.sleep(0.01)
    source.gate.set()
    assert await second == source.data["c"]
    with pytest.raises(asyncio.CancelledError):
        await first
    assert (len(source.reads), source.cancelled) == (1, 0)
    assert "c" in cache


async def test_when_every_reader_is_cancelled_the_fetch_stops_and_is_forgotten() -> None:
    source = ChunkSource()
    chunk = source.add("c", os.urandom(KiB))
    cache = cache_over(source)
    source.gate = asyncio.Event()
    readers = [asyncio.ensure_future(cache.read(chunk, [], 0, chunk.size)) for _ in range(3)]
    await asyncio.sleep(0.01)
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    await asyncio.sleep(0.01)
    assert source.cancelled == 1  # the shared fetch was stopped
    assert "c" not in cache
    source.gate = None
    assert await cache.read(chunk, [], 0, chunk.size) == source.data["c"]  # starts afresh
    assert len(source.reads) == 2


async def test_range_policy_small_range_first_then_whole_chunk_on_the_second_piece() -> None:
    source = ChunkSource()
    chunk = source.add("c", os.urandom(256 * KiB))
    cache = cache_over(source)
    # one small range: only that range is fetched, nothing kept
    assert await cache.read(chunk, [], 0, 16 * KiB) == source.data["c"][: 16 * KiB]
    assert source.reads == [("c", 0, 16 * KiB)]
    assert "c" not in cache and cache.range_fetches == 1
    # a second piece of the same chunk: the client reads it piecewise, fetch it whole
    assert await cache.read(chunk, [], 16 * KiB, 32 * KiB) == source.data["c"][16 * KiB : 32 * KiB]
    assert source.reads[-1] == ("c", 0, 256 * KiB)
    assert "c" in cache
    for start in range(32 * KiB, 256 * KiB, 16 * KiB):
        piece = await cache.read(chunk, [], start, start + 16 * KiB)
        assert piece == source.data["c"][start : start + 16 * KiB]
    assert len(source.reads) == 2


async def test_range_policy_half_a_chunk_or_more_fetches_it_whole() -> None:
    source = ChunkSource()
    chunk = source.add("c", os.urandom(100 * KiB))
    cache = cache_over(source)
    assert await cache.read(chunk, [], 10 * KiB, 60 * KiB) == source.data["c"][10 * KiB : 60 * KiB]
    assert source.reads == [("c", 0, 100 * KiB)]
    assert "c" in cache


async def test_a_large_chunk_is_kept_only_when_read_again() -> None:
    source = ChunkSource()
    chunk = source.add("big", os.urandom(100 * KiB))
    cache = cache_over(source, admit_at_once=64 * KiB)
    assert await cache.read(chunk, [], 0, chunk.size) == source.data["big"]
    assert "big" not in cache and cache.passed == 1  # a one-off stream passes through
    assert await cache.read(chunk, [], 0, chunk.size) == source.data["big"]
    assert "big" in cache  # read again while remembered: kept
    assert await cache.read(chunk, [], 0, chunk.size) == source.data["big"]
    assert len(source.reads) == 2 and cache.hits == 1
    # first touch by a large range: only the range is fetched, even at half or more
    other = source.add("big2", os.urandom(100 * KiB))
    assert await cache.read(other, [], 0, 80 * KiB) == source.data["big2"][: 80 * KiB]
    assert source.reads[-1] == ("big2", 0, 80 * KiB) and "big2" not in cache
    assert (
        await cache.read(other, [], 80 * KiB, 90 * KiB) == source.data["big2"][80 * KiB : 90 * KiB]
    )
    assert source.reads[-1] == ("big2", 0, 100 * KiB) and "big2" in cache


async def test_concurrent_first_reads_of_a_large_chunk_share_one_fetch() -> None:
    source = ChunkSource()
    chunk = source.add("big", os.urandom(100 * KiB))
    cache = cache_over(source, admit_at_once=64 * KiB)
    source.gate = asyncio.Event()
    readers = [asyncio.ensure_future(cache.read(chunk, [], 0, chunk.size)) for _ in range(10)]
    await asyncio.sleep(0.01)
    source.gate.set()
    assert all(r == source.data["big"] for r in await asyncio.gather(*readers))
    assert len(source.reads) == 1 and cache.coalesced == 9


def test_admission_threshold_default() -> None:
    source = ChunkSource()
    assert cache_over(source, max_size=256 * 1024 * KiB).admit_at_once == 4 * 1024 * KiB
    assert cache_over(source, max_size=8 * 1024 * KiB).admit_at_once == 1024 * KiB


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    max_size=st.integers(min_value=1, max_value=64 * KiB),
    ops=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=30),  # which chunk
            st.integers(min_value=1, max_value=40 * KiB),  # its size
            st.floats(min_value=0, max_value=1),  # where a range starts (fraction)
            st.floats(min_value=0, max_value=1),  # how long it is (fraction)
        ),
        min_size=1,
        max_size=120,
    ),
)
def test_byte_bound_holds_under_a_random_workload(
    max_size: int, ops: list[tuple[int, int, float, float]]
) -> None:
    async def run() -> None:
        source = ChunkSource()
        cache = cache_over(source, max_size=max_size, max_object_size=max_size)
        chunks: dict[int, Chunk] = {}
        for which, size, a, b in ops:
            if which not in chunks:  # chunk ids are immutable: a size is fixed at first use
                chunks[which] = source.add(f"c{which}", os.urandom(size))
            chunk = chunks[which]
            start = min(int(a * chunk.size), chunk.size - 1)
            end = min(chunk.size, start + max(1, int(b * chunk.size)))
            got = await cache.read(chunk, [], start, end)
            assert got == source.data[chunk.chunk_id][start:end]
            held = cache.stats()
            assert held.size <= max_size
            assert held.size == sum(len(source.data[i]) for i in source.data if i in cache)
        stats = cache.stats()
        assert stats.hits + stats.misses + stats.bypassed == len(ops)

    asyncio.run(run())


async def test_single_flight_starts_once_per_key_and_again_after_it_finished() -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    calls = 0
    release = asyncio.Event()

    async def work() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return calls

    tasks = [asyncio.ensure_future(flights.run("k", work)) for _ in range(4)]
    await asyncio.sleep(0)
    assert "k" in flights
    release.set()
    results = await asyncio.gather(*tasks)
    assert [r for r, _ in results] == [1, 1, 1, 1]
    assert [joined for _, joined in results] == [False, True, True, True]
    assert "k" not in flights and len(flights) == 0
    assert (await flights.run("k", work))[0] == 2
    assert flights.started == 2
