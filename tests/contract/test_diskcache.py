"""The disk cache (``backends.diskcache``) over a real local backend: hits make no
backend call, the byte bound holds, the index survives a restart, damaged entries are
detected and refetched, and a second process cannot share the directory.

(The Backend contract suite also runs on a disk-cached local backend: ``local-diskcached``.)
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backends.base import ByteRange
from backends.diskcache import BLOCK_SIZE, DiskCache, DiskCacheBusy, DiskCachedBackend
from backends.errors import TransientBackendError
from backends.faults import FaultyBackend
from backends.local import LocalBackend

pytestmark = pytest.mark.contract
KiB = 1024


class Setup:
    def __init__(self, tmp_path: Path, max_size: int) -> None:
        (tmp_path / "blobs").mkdir(exist_ok=True)
        self.dir = tmp_path / "cache"
        self.local = LocalBackend("disk0", tmp_path / "blobs")
        self.faulty = FaultyBackend(self.local)
        self.max_size = max_size
        self.cache = DiskCache(self.dir, max_size)
        self.backend = DiskCachedBackend(self.faulty, self.cache)

    async def reopen(self) -> None:
        await self.cache.close()
        self.cache = DiskCache(self.dir, self.max_size)
        await self.cache.open()
        self.backend = DiskCachedBackend(self.faulty, self.cache)

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        stream = await self.backend.get(key, ByteRange(start, end))
        out = bytearray()
        try:
            async for piece in stream:
                out += piece
        finally:
            await stream.aclose()
        await self.settle()
        return bytes(out)

    async def settle(self) -> None:
        """Let background entry writes finish."""
        for _ in range(100):
            if not self.cache._writes:
                return
            await asyncio.gather(*self.cache._writes)

    def files(self) -> list[Path]:
        return [p for p in self.dir.glob("??/*") if p.is_file()]


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    made = Setup(tmp_path, 4 * 1024 * KiB)
    await made.cache.open()
    yield made
    await made.cache.close()
    await made.local.close()


def blob(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


async def test_a_repeated_get_is_served_from_disk(setup: Setup) -> None:
    data = blob(700 * KiB)
    await setup.backend.put("p/v/0", data, size=len(data))
    assert await setup.get("p/v/0", 100, 600 * KiB) == data[100 : 600 * KiB]
    assert setup.faulty.calls["get"] == 1
    assert await setup.get("p/v/0", 100, 600 * KiB) == data[100 : 600 * KiB]
    # any range inside a cached one is served from it too
    assert await setup.get("p/v/0", 300 * KiB, 301 * KiB) == data[300 * KiB : 301 * KiB]
    assert setup.faulty.calls["get"] == 1
    stats = setup.cache.stats()
    assert (stats.hits, stats.misses, stats.stored, stats.entries) == (2, 1, 1, 1)
    # a range the entry does not cover goes to the backend
    assert await setup.get("p/v/0", 0, 200) == data[:200]
    assert setup.faulty.calls["get"] == 2


async def test_a_get_to_the_end_is_cached_with_its_end(setup: Setup) -> None:
    data = blob(100 * KiB, seed=1)
    await setup.backend.put("k", data, size=len(data))
    assert await setup.get("k", 10) == data[10:]
    assert await setup.get("k", 20) == data[20:]
    assert await setup.get("k", 20, 10**9) == data[20:]  # clipped like the backend does
    assert setup.faulty.calls["get"] == 1


async def test_an_abandoned_or_failed_read_stores_nothing(tmp_path: Path) -> None:
    setup = Setup(tmp_path, 64 * 1024 * KiB)
    await setup.cache.open()
    try:
        data = blob(9 * 1024 * KiB, seed=2)  # the local backend reads 8 MiB per piece
        await setup.backend.put("k", data, size=len(data))
        stream = await setup.backend.get("k", ByteRange(0, len(data)))
        async for piece in stream:
            assert len(piece) < len(data)
            break
        await stream.aclose()
        await setup.settle()
        assert setup.cache.stats().entries == 0
        setup.faulty.cut_stream_after(100 * KiB)
        with pytest.raises(TransientBackendError, match="injected"):
            await setup.get("k", 0, len(data))
        assert setup.cache.stats().entries == 0
        assert not setup.files()
        assert await setup.get("k", 0, len(data)) == data  # and a whole read is kept
        assert setup.cache.stats().entries == 1
    finally:
        await setup.cache.close()


async def test_put_and_delete_drop_the_entries_of_a_key(setup: Setup) -> None:
    await setup.backend.put("k", b"old-bytes", size=9)
    assert await setup.get("k", 0, 9) == b"old-bytes"
    await setup.backend.put("k", b"new-bytes", size=9)
    assert await setup.get("k", 0, 9) == b"new-bytes"
    await setup.backend.delete("k")
    assert setup.cache.stats().entries == 0
    assert not setup.files()


async def test_the_byte_bound_holds_and_the_oldest_go_first(tmp_path: Path) -> None:
    setup = Setup(tmp_path, 1024 * KiB)
    await setup.cache.open()
    try:
        sizes = [random.Random(i).randrange(1, 300 * KiB) for i in range(40)]
        for i, size in enumerate(sizes):
            await setup.backend.put(f"k{i}", blob(size, seed=i), size=size)
            assert await setup.get(f"k{i}", 0, size) == blob(size, seed=i)
            on_disk = sum(p.stat().st_size for p in setup.files())
            assert on_disk == setup.cache.size <= 1024 * KiB
        assert setup.cache.evictions > 0
        last = len(sizes) - 1
        gets = setup.faulty.calls["get"]
        assert await setup.get(f"k{last}", 0, sizes[last]) == blob(sizes[last], seed=last)
        assert setup.faulty.calls["get"] == gets  # the newest is still there
        assert await setup.get("k0", 0, sizes[0]) == blob(sizes[0], seed=0)
        assert setup.faulty.calls["get"] == gets + 1  # the oldest was evicted
    finally:
        await setup.cache.close()


async def test_the_index_survives_a_restart(setup: Setup) -> None:
    data = blob(500 * KiB, seed=3)
    await setup.backend.put("k", data, size=len(data))
    await setup.get("k", 0, len(data))
    (setup.dir / "tmp" / "leftover").write_bytes(b"half-written")
    await setup.reopen()
    assert setup.cache.stats().entries == 1
    assert not (setup.dir / "tmp" / "leftover").exists()
    assert await setup.get("k", 0, len(data)) == data
    assert setup.faulty.calls["get"] == 1


@pytest.mark.parametrize("where", ["payload", "header", "truncated"])
async def test_a_damaged_entry_is_detected_and_refetched(setup: Setup, where: str) -> None:
    data = blob(3 * BLOCK_SIZE + 5, seed=4)
    await setup.backend.put("k", data, size=len(data))
    await setup.get("k", 0, len(data))
    [path] = setup.files()
    raw = bytearray(path.read_bytes())
    if where == "payload":
        raw[len(raw) - len(data) + 2 * BLOCK_SIZE + 7] ^= 0x01
    elif where == "header":
        raw[20] ^= 0x01
    else:
        del raw[-100:]
    path.write_bytes(bytes(raw))
    # a range touching the damaged block is never served from the entry
    assert await setup.get("k", 0, len(data)) == data
    assert setup.faulty.calls["get"] == 2
    assert setup.cache.corrupt == 1
    # the refetch stored a good entry again
    assert await setup.get("k", 0, len(data)) == data
    assert setup.faulty.calls["get"] == 2
    # damage found while rebuilding the index removes the file
    [path] = setup.files()
    raw = bytearray(path.read_bytes())
    raw[10] ^= 0xFF
    path.write_bytes(bytes(raw))
    await setup.reopen()
    assert setup.cache.stats().entries == 0
    assert not setup.files()


async def test_an_entry_evicted_under_a_reader_falls_back_to_the_backend(setup: Setup) -> None:
    data = blob(20 * 1024 * KiB // 8, seed=5)  # 2.5 MiB: a hit reads it in one piece
    data = data + blob(7 * 1024 * KiB, seed=6)  # 9.5 MiB: more than one hit piece
    big = DiskCache(setup.dir.parent / "big", 64 * 1024 * KiB)
    await big.open()
    try:
        backend = DiskCachedBackend(setup.faulty, big)
        await backend.put("k", data, size=len(data))
        for _ in range(2):
            stream = await backend.get("k", ByteRange(0, len(data)))
            out = bytearray()
            async for piece in stream:
                out += piece
                for path in (setup.dir.parent / "big").glob("??/*"):
                    path.unlink()  # evicted by someone else after the first piece
            await stream.aclose()
            await asyncio.gather(*big._writes)
            assert bytes(out) == data
        # the miss, then the second read's fallback for what followed its first piece
        assert setup.faulty.calls["get"] == 2
        assert big.hits == 1
    finally:
        await big.close()


async def test_a_second_process_cannot_share_the_directory(setup: Setup) -> None:
    other = DiskCache(setup.dir, 1024 * KiB)
    with pytest.raises(DiskCacheBusy, match="another process"):
        await other.open()
    await setup.cache.close()
    await other.open()  # free once the first one closed
    await other.close()
    await setup.cache.open()


async def test_cache_files_hold_exactly_the_bytes_the_backend_holds(setup: Setup) -> None:
    """What is cached is what the provider returned (ciphertext when encrypted): the
    payload of every entry file is a byte range of a blob on the backend."""
    data = os.urandom(300 * KiB)
    await setup.backend.put("k", data, size=len(data))
    await setup.get("k", 1000, 200 * KiB)
    [path] = setup.files()
    assert path.read_bytes().endswith(data[1000 : 200 * KiB])
