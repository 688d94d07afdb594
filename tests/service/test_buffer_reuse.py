"""Reused chunk buffers never leak one object's bytes into another.

Chunk-sized buffers are lent by the pool's ``BufferPool`` and given back after a chunk
is written, after a sealed range is decrypted, and by a consumer once it has sent a
piece (the S3 frontend). These tests drive many concurrent writes and reads of plain and
encrypted objects through the real stores, local directories and the memory cache (which
keeps some of the very buffers a consumer offers back) and check every byte, and that
the buffers were in fact reused.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from appliance.build import Pool, open_pool
from appliance.config import parse_config

pytestmark = pytest.mark.service
MiB = 1 << 20
CHUNK = 2 * MiB  # above the cache's admit-at-once size: first reads share one buffer


@pytest.fixture
async def pool(database: Any, tmp_path: Path) -> AsyncIterator[Pool]:
    raw = {
        "database": database,
        "pool": {"chunk_size": CHUNK, "gc_delay_seconds": 0},
        "backends": [{"name": f"d{i}", "type": "local", "path": f"d{i}"} for i in range(2)],
        "buckets": [{"name": "plain"}, {"name": "sealed", "encryption": True}],
        "encryption": {"key": {"inline": base64.b64encode(os.urandom(32)).decode()}},
        # a small cache: a chunk's first read is handed on (one buffer for every
        # concurrent reader), its second read kept (and soon evicted)
        "cache": {"max_size": 8 * MiB, "max_object_size": CHUNK},
    }
    made = await open_pool(parse_config(raw, env={}, base_dir=tmp_path))
    yield made
    await made.close()


async def pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at : at + size]


async def read_like_the_frontend(pool: Pool, bucket: str, key: str) -> str:
    """Stream an object, hand each piece back as the S3 frontend does; its SHA-256."""
    handle = await pool.objects.open_object(bucket, key)
    digest = hashlib.sha256()
    async for piece in pool.objects.read(handle):
        for _ in range(3):  # sending takes a while: others read and write meanwhile
            await asyncio.sleep(0)
        digest.update(piece)
        pool.buffers.give_if_unshared(piece, holders=1)
    return digest.hexdigest()


@pytest.mark.parametrize("bucket", ["plain", "sealed"])
async def test_concurrent_writes_and_reads_with_reused_buffers(pool: Pool, bucket: str) -> None:
    bodies = {f"k{i}": os.urandom(3 * CHUNK + i * 4099) for i in range(8)}
    expected = {key: hashlib.sha256(data).hexdigest() for key, data in bodies.items()}

    async def put(key: str, data: bytes) -> None:
        await pool.objects.put_object(bucket, key, pieces(data, 300_000), size=len(data))

    await asyncio.gather(*(put(k, d) for k, d in bodies.items()))
    for round_ in range(3):  # the cache admits chunks on their second read
        # three readers per key at once: concurrent misses share one fetched buffer
        readers = [k for k in bodies for _ in range(3)]
        got = await asyncio.gather(*(read_like_the_frontend(pool, bucket, k) for k in readers))
        assert got == [expected[k] for k in readers], f"round {round_}"
        # overwrite half of them while the others are read
        fresh = {k: os.urandom(2 * CHUNK + 7) for k in list(bodies)[::2]}
        await asyncio.gather(
            *(put(k, d) for k, d in fresh.items()),
            *(read_like_the_frontend(pool, bucket, k) for k in list(bodies)[1::2]),
        )
        bodies.update(fresh)
        expected.update({k: hashlib.sha256(d).hexdigest() for k, d in fresh.items()})
    got = await asyncio.gather(*(read_like_the_frontend(pool, bucket, k) for k in bodies))
    assert dict(zip(bodies, got, strict=True)) == expected
    assert pool.buffers.hits > 20  # buffers really were lent again
    assert pool.buffers.free_bytes <= 64 * MiB
