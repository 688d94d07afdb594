"""The object cache in the wired pool: ObjectService over real stores (SQLite and
PostgreSQL) and local backends, with a fault wrapper counting the backend GETs.

The memory cache sits over the chunk store; the disk cache under it, around each
backend (outside the fault wrapper, so the counts below are the GETs that reached the
backends).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from appliance.build import Pool, open_pool
from appliance.config import parse_config
from appliance.errors import NoSuchKey
from backends.base import Backend
from backends.faults import FaultyBackend

pytestmark = pytest.mark.service
KiB = 1024
CHUNK = 64 * KiB


class Counted:
    """A pool whose backends each sit behind a ``FaultyBackend`` (to count calls)."""

    def __init__(self, pool: Pool, faults: dict[str, FaultyBackend]) -> None:
        self.pool = pool
        self.faults = faults

    @property
    def gets(self) -> int:
        return sum(f.calls["get"] for f in self.faults.values())


async def open_counted(database: Any, tmp_path: Path, cache: dict[str, Any]) -> Counted:
    raw = {
        "database": database,
        "pool": {"chunk_size": CHUNK, "gc_delay_seconds": 0},
        "cache": cache,
        "backends": [
            {"name": f"d{i}", "type": "local", "path": f"d{i}", "quota_bytes": "8MiB"}
            for i in range(2)
        ],
        "buckets": [{"name": "bkt"}],
    }
    faults: dict[str, FaultyBackend] = {}

    def wrap(backend: Backend) -> Backend:
        faults[backend.name] = FaultyBackend(backend)
        return faults[backend.name]

    pool = await open_pool(parse_config(raw, env={}, base_dir=tmp_path), wrap_backend=wrap)
    return Counted(pool, faults)


@pytest.fixture
async def counted(database: Any, tmp_path: Path) -> AsyncIterator[Counted]:
    made = await open_counted(database, tmp_path, {"max_size": "1MiB", "max_object_size": CHUNK})
    yield made
    await made.pool.close()


async def body(data: bytes, piece: int = 10_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), piece):
        yield data[i : i + piece]


async def put(pool: Pool, key: str, data: bytes, *, cold: bool = True) -> None:
    """Put an object; with ``cold`` (these tests are about reads) the memory cache is
    emptied afterwards, dropping the small chunks it keeps as they are written."""
    await pool.objects.put_object("bkt", key, body(data), size=len(data))
    if cold and pool.cache is not None:
        pool.cache.clear()


async def test_small_chunks_written_are_read_back_without_a_backend(counted: Counted) -> None:
    pool = counted.pool
    small = os.urandom(10 * KiB)
    await put(pool, "small", small, cold=False)
    assert await read_all(pool, "small") == small
    assert counted.gets == 0
    assert pool.cache is not None and pool.cache.stats().hits == 1


async def read_all(pool: Pool, key: str, start: int = 0, end: int | None = None) -> bytes:
    handle = await pool.objects.open_object("bkt", key)
    return b"".join([p async for p in pool.objects.read(handle, start, end)])


async def test_repeated_reads_do_not_reach_the_backends(counted: Counted) -> None:
    pool = counted.pool
    small, large = os.urandom(10 * KiB), os.urandom(3 * CHUNK + 5)
    await put(pool, "small", small)
    await put(pool, "large", large)
    assert counted.gets == 0
    assert await read_all(pool, "small") == small
    assert await read_all(pool, "large") == large
    assert counted.gets == 5  # one per chunk
    for _ in range(3):
        assert await read_all(pool, "small") == small
        assert await read_all(pool, "large") == large
    assert counted.gets == 5
    assert pool.cache is not None
    stats = pool.cache.stats()
    assert (stats.misses, stats.hits, stats.entries) == (5, 15, 5)


async def test_overwrite_then_read_returns_the_new_data_at_once(counted: Counted) -> None:
    pool = counted.pool
    old, new = os.urandom(2 * CHUNK), os.urandom(2 * CHUNK - 3)
    await put(pool, "k", old)
    assert await read_all(pool, "k") == old
    await pool.objects.copy_object(await pool.objects.open_object("bkt", "k"), "bkt", "copy")
    await put(pool, "k", new)
    assert await read_all(pool, "k") == new
    assert await read_all(pool, "k", 10, 20) == new[10:20]
    assert await read_all(pool, "copy") == old  # the copy still names the old chunks
    await pool.objects.delete_object("bkt", "k")
    with pytest.raises(NoSuchKey):
        await pool.objects.open_object("bkt", "k")
    again = b"third version"
    await put(pool, "k", again)
    assert await read_all(pool, "k") == again


async def test_concurrent_reads_of_one_object_make_one_backend_get(counted: Counted) -> None:
    pool = counted.pool
    data = os.urandom(50 * KiB)
    await put(pool, "hot", data)
    for fault in counted.faults.values():
        fault.latency(0.05)  # so that every read arrives while the first fetch is running
    assert pool.cache is not None
    hits = pool.cache.hits
    results = await asyncio.gather(*(read_all(pool, "hot") for _ in range(20)))
    assert all(r == data for r in results)
    assert counted.gets == 1
    # the others joined the one fetch, or (a slow metadata store delaying them past it)
    # found the chunk already cached
    assert pool.cache.coalesced >= 1
    assert pool.cache.coalesced + pool.cache.hits - hits == 19


async def test_range_reads_are_served_from_cached_chunks(counted: Counted) -> None:
    pool = counted.pool
    data = os.urandom(4 * CHUNK)
    await put(pool, "obj", data)
    # a lone small range fetches only that range
    assert await read_all(pool, "obj", 100, 200) == data[100:200]
    assert counted.gets == 1
    # a second piece of that chunk fetches it whole; later pieces come from the cache
    for start in range(200, CHUNK, 8 * KiB):
        assert await read_all(pool, "obj", start, start + 100) == data[start : start + 100]
    assert counted.gets == 2
    # a range over two chunks, each cached whole after reading the object once
    assert await read_all(pool, "obj") == data
    gets = counted.gets
    for start, end in [(CHUNK - 5, CHUNK + 5), (0, 4 * CHUNK), (3 * CHUNK + 1, 3 * CHUNK + 2)]:
        assert await read_all(pool, "obj", start, end) == data[start:end]
    assert counted.gets == gets


async def test_memory_cache_off(database: Any, tmp_path: Path) -> None:
    counted = await open_counted(database, tmp_path, {"max_size": 0})
    try:
        assert counted.pool.cache is None
        await put(counted.pool, "k", b"data")
        for _ in range(2):
            assert await read_all(counted.pool, "k") == b"data"
        assert counted.gets == 2
    finally:
        await counted.pool.close()


async def test_disk_cache_survives_a_restart_and_catches_damage(
    database: Any, tmp_path: Path
) -> None:
    cache = {"max_size": 0, "disk_dir": "diskcache", "disk_max_size": "4MiB"}
    counted = await open_counted(database, tmp_path, cache)
    data = os.urandom(2 * CHUNK + 9)
    try:
        assert counted.pool.disk_cache is not None
        await put(counted.pool, "k", data)
        assert await read_all(counted.pool, "k") == data
        assert counted.gets == 3  # three chunks
    finally:
        await counted.pool.close()
    counted = await open_counted(database, tmp_path, cache)  # a restart: memory is empty
    try:
        assert await read_all(counted.pool, "k") == data
        assert counted.gets == 0
        assert counted.pool.disk_cache is not None
        assert counted.pool.disk_cache.hits == 3
        # flip a byte in one cache file: detected, read from the backend instead
        victim = sorted((tmp_path / "diskcache").glob("??/*"))[0]
        raw = bytearray(victim.read_bytes())
        raw[-1] ^= 0x40
        victim.write_bytes(bytes(raw))
        assert await read_all(counted.pool, "k") == data
        assert counted.gets == 1
        assert counted.pool.disk_cache.corrupt == 1
    finally:
        await counted.pool.close()


async def test_memory_and_disk_cache_together(database: Any, tmp_path: Path) -> None:
    cache = {"max_size": "1MiB", "disk_dir": "diskcache"}
    counted = await open_counted(database, tmp_path, cache)
    try:
        data = os.urandom(CHUNK + 1)
        await put(counted.pool, "k", data)
        for _ in range(3):
            assert await read_all(counted.pool, "k") == data
        assert counted.gets == 2
        disk = counted.pool.disk_cache
        assert disk is not None and (disk.misses, disk.hits) == (2, 0)  # memory answered
    finally:
        await counted.pool.close()
