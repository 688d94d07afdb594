"""ObjectService and MultipartService over real stores and local/moto backends."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from appliance.build import Pool, open_pool
from appliance.clock import month_of, utcnow
from appliance.config import parse_config
from appliance.errors import (
    BadDigest,
    EntityTooSmall,
    IncompleteBody,
    InvalidPart,
    InvalidPartOrder,
    MetadataUnavailable,
    NoCapacity,
    NoSuchBucket,
    NoSuchKey,
    NoSuchUpload,
    PreconditionFailed,
)
from appliance.meta.errors import StoreUnavailable
from appliance.meta.models import WritePrecondition
from appliance.services.multipart import MultipartService

pytestmark = pytest.mark.service
KiB = 1024
CHUNK = 64 * KiB


async def make_pool(
    database: Any, tmp_path: Path, quotas: list[str], placement: str = "pack"
) -> Pool:
    raw = {
        "database": database,
        "pool": {"chunk_size": CHUNK, "placement": placement, "gc_delay_seconds": 0},
        "backends": [
            {"name": f"d{i}", "type": "local", "path": f"d{i}", "quota_bytes": q}
            for i, q in enumerate(quotas)
        ],
        "buckets": [{"name": "bkt"}],
    }
    return await open_pool(parse_config(raw, env={}, base_dir=tmp_path))


@pytest.fixture
async def pool(database: Any, tmp_path: Path) -> AsyncIterator[Pool]:
    made = await make_pool(database, tmp_path, ["1MiB", "2MiB", "8MiB"])
    yield made
    await made.close()


async def body(data: bytes, piece: int = 10_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), piece):
        yield data[i : i + piece]


async def read_all(pool: Pool, key: str, start: int = 0, end: int | None = None) -> bytes:
    handle = await pool.objects.open_object("bkt", key)
    return b"".join([p async for p in pool.objects.read(handle, start, end)])


def disk_bytes(tmp_path: Path, name: str) -> int:
    return sum(f.stat().st_size for f in (tmp_path / name).rglob("*") if f.is_file())


async def run_gc(pool: Pool) -> None:
    """Run the GC worker until the queue is drained (the delay is 0 in these pools),
    then retire the tombstones that hide nothing any more and collect them too."""
    while await pool.gc.run_once():
        pass
    assert pool.sweeper is not None
    if await pool.sweeper.run_once():
        while await pool.gc.run_once():
            pass


async def test_put_get_ranges_and_overwrite(pool: Pool, tmp_path: Path) -> None:
    objects = pool.objects
    data = os.urandom(5 * CHUNK + 123)
    result = await objects.put_object(
        "bkt",
        "dir/file.bin",
        body(data),
        size=len(data),
        headers={"Content-Type": "application/x-test"},
        user_metadata={"a": "1"},
    )
    assert result.etag == hashlib.md5(data).hexdigest() and result.size == len(data)
    assert await read_all(pool, "dir/file.bin") == data
    for start, end in [(0, 1), (CHUNK - 5, CHUNK + 5), (3 * CHUNK, 5 * CHUNK + 123), (100, 100)]:
        assert await read_all(pool, "dir/file.bin", start, end) == data[start:end]
    head = await objects.head_object("bkt", "dir/file.bin")
    assert head.headers == {"Content-Type": "application/x-test"} and head.user_metadata == {
        "a": "1"
    }
    new = b"small"
    await objects.put_object("bkt", "dir/file.bin", body(new), size=len(new))
    assert await read_all(pool, "dir/file.bin") == new
    await run_gc(pool)
    space = {s.name: s for s in await pool.store.get_space()}
    for name in ("d0", "d1", "d2"):
        assert space[name].used_bytes == disk_bytes(tmp_path, name), name
        assert space[name].reserved_bytes == 0


async def test_empty_object_and_unknown_length(pool: Pool) -> None:
    objects = pool.objects
    await objects.put_object("bkt", "empty", body(b""), size=0)
    assert await read_all(pool, "empty") == b""
    data = os.urandom(2 * CHUNK + 7)
    await objects.put_object("bkt", "streamed", body(data, 3000), size=None)
    assert await read_all(pool, "streamed") == data


async def test_errors(pool: Pool) -> None:
    objects = pool.objects
    with pytest.raises(NoSuchBucket):
        await objects.put_object("nope", "k", body(b"x"), size=1)
    with pytest.raises(NoSuchKey):
        await objects.head_object("bkt", "missing")
    with pytest.raises(NoSuchBucket):
        await objects.head_object("nope", "missing")
    with pytest.raises(IncompleteBody):
        await objects.put_object("bkt", "short", body(b"abc"), size=10)
    with pytest.raises(IncompleteBody):
        await objects.put_object("bkt", "long", body(os.urandom(3 * CHUNK)), size=CHUNK)
    with pytest.raises(NoSuchKey):
        await objects.head_object("bkt", "short")
    assert all(s.reserved_bytes == 0 for s in await pool.store.get_space())


def blob_files(tmp_path: Path) -> set[Path]:
    return {
        p for p in tmp_path.glob("d*/**/*") if p.is_file() and not p.name.startswith(".cairn-tmp")
    }


class CommitFault:
    """The real store, with ``put_version`` failing before or after it commits."""

    def __init__(self, inner: Any, *, after: bool) -> None:
        self._inner = inner
        self._after = after

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def put_version(self, *args: Any, **kwargs: Any) -> Any:
        if not self._after:
            raise StoreUnavailable("the database went away")
        await self._inner.put_version(*args, **kwargs)
        raise asyncio.CancelledError  # the client left just after the commit


async def test_a_failed_one_chunk_put_leaves_no_blob_and_no_reservation(
    pool: Pool, tmp_path: Path
) -> None:
    objects = pool.objects
    await objects.put_object("bkt", "k", body(b"first"), size=5)
    before = blob_files(tmp_path)
    assert len(before) == 1
    with pytest.raises(NoSuchBucket):
        await objects.put_object("nope", "k", body(b"x"), size=1)
    with pytest.raises(BadDigest):
        await objects.put_object(
            "bkt", "k", body(b"abc"), size=3, content_md5=hashlib.md5(b"abd").digest()
        )
    with pytest.raises(PreconditionFailed):
        await objects.put_object(
            "bkt", "k", body(b"abc"), size=3, precondition=WritePrecondition(if_none_match=True)
        )
    with pytest.raises(IncompleteBody):
        await objects.put_object("bkt", "k", body(b"abc"), size=4)
    store = objects._store
    objects._store = CommitFault(store, after=False)  # type: ignore[assignment]
    with pytest.raises(MetadataUnavailable):
        await objects.put_object("bkt", "k", body(b"abc"), size=3)
    objects._store = store
    assert blob_files(tmp_path) == before
    assert all(s.reserved_bytes == 0 for s in await pool.store.get_space())
    assert await read_all(pool, "k") == b"first"

    # cancelled once committed: the new version and its blob stay
    objects._store = CommitFault(store, after=True)  # type: ignore[assignment]
    with pytest.raises(asyncio.CancelledError):
        await objects.put_object("bkt", "k", body(b"second"), size=6)
    objects._store = store
    assert await read_all(pool, "k") == b"second"
    assert len(blob_files(tmp_path) - before) == 1


async def test_object_larger_than_any_backend_spans_backends(database: Any, tmp_path: Path) -> None:
    pool = await make_pool(database, tmp_path, ["300KiB", "300KiB", "300KiB"])
    try:
        data = os.urandom(10 * CHUNK)  # 640 KiB > 300 KiB
        await pool.objects.put_object("bkt", "big", body(data), size=len(data))
        assert await read_all(pool, "big") == data
        used = {s.name: s.used_bytes for s in await pool.store.get_space()}
        assert sum(1 for v in used.values() if v > 0) >= 3
        with pytest.raises(NoCapacity):
            await pool.objects.put_object("bkt", "too-big", body(data), size=len(data))
        with pytest.raises(NoSuchKey):
            await pool.objects.head_object("bkt", "too-big")
        await run_gc(pool)
        space = {s.name: s for s in await pool.store.get_space()}
        for name in ("d0", "d1", "d2"):
            assert space[name].used_bytes == disk_bytes(tmp_path, name)
            assert space[name].used_bytes <= 300 * KiB
    finally:
        await pool.close()


async def test_spread_balances(database: Any, tmp_path: Path) -> None:
    pool = await make_pool(database, tmp_path, ["4MiB", "4MiB", "4MiB"], placement="spread")
    try:
        for i in range(12):
            await pool.objects.put_object("bkt", f"k{i}", body(os.urandom(CHUNK)), size=CHUNK)
        used = [s.used_bytes for s in await pool.store.get_space()]
        assert max(used) - min(used) <= CHUNK + 1024
    finally:
        await pool.close()


async def test_multipart_complete_moves_no_bytes(pool: Pool, tmp_path: Path) -> None:
    mp = pool.multipart
    upload = await mp.create("bkt", "mp/video", headers={"Content-Type": "video/mp4"})
    parts_data = [os.urandom(5 * 1024 * 1024 // 16) for _ in range(3)]
    # parts of 320 KiB: under S3's 5 MiB minimum, which the first completion enforces
    etags = []
    for n, data in enumerate(parts_data, start=1):
        etags.append((await mp.upload_part(upload, n, body(data), size=len(data))).etag)
    with pytest.raises(EntityTooSmall):
        await mp.complete(upload, list(zip([1, 2, 3], etags, strict=True)))
    mp = MultipartService(pool.store, pool.objects, min_part_size=1)  # small parts from here
    with pytest.raises(InvalidPartOrder):
        await mp.complete(upload, [(2, etags[1]), (1, etags[0])])
    with pytest.raises(InvalidPart):
        await mp.complete(upload, [(1, etags[0]), (2, "0" * 32)])
    before = {name: disk_bytes(tmp_path, name) for name in ("d0", "d1", "d2")}
    done = await mp.complete(upload, [(1, f'"{etags[0]}"'), (2, etags[1]), (3, etags[2])])
    after = {name: disk_bytes(tmp_path, name) for name in ("d0", "d1", "d2")}
    assert sum(after.values()) - sum(before.values()) < 4096  # only the manifest was written
    expected = hashlib.md5(b"".join(bytes.fromhex(e) for e in etags)).hexdigest() + "-3"
    assert done.etag == expected
    assert await read_all(pool, "mp/video") == b"".join(parts_data)
    head = await pool.objects.head_object("bkt", "mp/video")
    sizes = ",".join(str(len(p)) for p in parts_data)  # kept for GetObject partNumber
    assert head.etag == expected
    assert head.headers == {"Content-Type": "video/mp4", "x-cairn-part-sizes": sizes}
    with pytest.raises(NoSuchUpload):
        await mp.get(upload.upload_id)
    await run_gc(pool)
    space = {s.name: s for s in await pool.store.get_space()}
    for name in ("d0", "d1", "d2"):
        assert space[name].used_bytes == disk_bytes(tmp_path, name)


async def test_abort_and_replace_parts(pool: Pool, tmp_path: Path) -> None:
    mp = pool.multipart
    upload = await mp.create("bkt", "mp/x")
    await mp.upload_part(upload, 1, body(b"a" * 1000), size=1000)
    await mp.upload_part(upload, 1, body(b"b" * 1000), size=1000)
    parts = await mp.list_parts(upload)
    assert [(p.part_number, p.etag) for p in parts] == [(1, hashlib.md5(b"b" * 1000).hexdigest())]
    await mp.abort(upload)
    with pytest.raises(NoSuchUpload):
        await mp.upload_part(upload, 2, body(b"c"), size=1)
    await run_gc(pool)
    assert all(disk_bytes(tmp_path, n) == 0 for n in ("d0", "d1", "d2"))
    assert all(s.used_bytes == 0 and s.reserved_bytes == 0 for s in await pool.store.get_space())


async def test_writes_overflow_when_a_backend_reaches_its_request_cap(tmp_path: Path) -> None:
    raw = {
        "database": {"sqlite": {"path": str(tmp_path / "cairn.db")}},
        "pool": {"chunk_size": CHUNK, "placement": "pack", "gc_delay_seconds": 0},
        "backends": [
            {"name": "capped", "type": "local", "path": "capped", "api_request_limit": 10},
            {"name": "spare", "type": "local", "path": "spare"},
        ],
        "buckets": [{"name": "bkt"}],
    }
    pool = await open_pool(parse_config(raw, env={}, base_dir=tmp_path))
    try:
        for i in range(30):
            await pool.objects.put_object("bkt", f"k{i}", body(b"x" * 100), size=100)
            pool.state.invalidate()  # let the next write see the counts at once
        requests, _, ingress = pool.meter.totals("capped")
        assert requests == 10  # exactly the cap: one PUT per object until it was reached
        assert ingress == sum(
            f.stat().st_size for f in (tmp_path / "capped").rglob("*") if f.is_file()
        )
        assert len([f for f in (tmp_path / "spare").rglob("*") if f.is_file()]) == 20
        await pool.meter.flush()
        month = {u.backend: u for u in await pool.store.get_usage(month_of(utcnow()))}
        assert month["capped"].requests == 10 and month["spare"].requests == 20
    finally:
        await pool.close()


async def test_copy_is_metadata_only_and_survives_the_source(pool: Pool, tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK + 11)
    await pool.objects.put_object(
        "bkt",
        "src",
        body(data),
        size=len(data),
        headers={"Content-Type": "a/b"},
        user_metadata={"k": "v"},
    )
    before = {n: disk_bytes(tmp_path, n) for n in ("d0", "d1", "d2")}
    source = await pool.objects.open_object("bkt", "src")
    copy = await pool.objects.copy_object(source, "bkt", "dst")
    assert sum(disk_bytes(tmp_path, n) for n in ("d0", "d1", "d2")) - sum(before.values()) < 4096
    assert (copy.size, copy.etag, copy.headers, copy.user_metadata) == (
        len(data),
        source.version.etag,
        {"Content-Type": "a/b"},
        {"k": "v"},
    )
    replaced = await pool.objects.copy_object(
        await pool.objects.open_object("bkt", "dst"),
        "bkt",
        "dst2",
        headers={},
        user_metadata={"new": "1"},
    )
    assert replaced.user_metadata == {"new": "1"} and replaced.headers == {}
    await pool.objects.delete_object("bkt", "src")
    await pool.objects.delete_object("bkt", "dst")
    await run_gc(pool)
    assert await read_all(pool, "dst2") == data  # chunks live on while referenced
    await pool.objects.delete_object("bkt", "dst2")
    await run_gc(pool)
    assert all(disk_bytes(tmp_path, n) == 0 for n in ("d0", "d1", "d2"))
    space = {s.name: s for s in await pool.store.get_space()}
    assert all(s.used_bytes == 0 and s.reserved_bytes == 0 for s in space.values())
