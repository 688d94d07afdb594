"""Reads of keys whose metadata this process never read, while the metadata store is
down: the current version is found from the key's self-describing blobs (plain,
encrypted, multipart, copies), deleted keys stay deleted (tombstones), writes and
listings fail, and after the store returns everything agrees (fsck) and the tombstones
are retired. Stores: a corrupt SQLite file; PostgreSQL cut off behind a relay.
Backends: a local directory and moto (S3 over HTTP), every blob on both."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from appliance.build import Pool, make_file_service, open_pool
from appliance.config import parse_config
from appliance.errors import (
    BackendsUnavailable,
    BadDigest,
    MetadataUnavailable,
    NoSuchKey,
    PreconditionFailed,
)
from appliance.meta.errors import StoreUnavailable
from appliance.meta.models import WritePrecondition
from appliance.services.multipart import MultipartService
from backends.base import Backend
from backends.errors import TransientBackendError
from backends.faults import FaultyBackend
from tests.conftest import pg_dsn
from tests.fixtures_moto import MotoS3
from tests.relay import Switch, relayed_dsn
from tests.service.test_outage import corrupt, restore

pytestmark = pytest.mark.service
CHUNK = 64 * 1024
DOWN = (StoreUnavailable, MetadataUnavailable)


def config(
    tmp_path: Path, database: dict[str, Any], moto: MotoS3, s3_bucket: str, *, factor: int = 2
) -> Any:
    raw = {
        "database": {**database, "retry_seconds": 0.2},
        "pool": {
            "chunk_size": CHUNK,
            "gc_delay_seconds": 0,
            "replication": {"factor": factor, "write_quorum": factor},
        },
        "backends": [
            {"name": "d0", "type": "local", "path": "d0"},
            {
                "name": "cloud",
                "type": "s3",
                "endpoint": moto.endpoint_url,
                "bucket": s3_bucket,
                "prefix": "cairn",
                "access_key": moto.access_key,
                "secret_key": moto.secret_key,
                "path_style": True,
            },
        ],
        "buckets": [{"name": "plain"}, {"name": "secret", "encryption": True}],
        "encryption": {"key": {"inline": base64.b64encode(b"k" * 32).decode()}},
        "cache": {"max_size": 0},  # reads reach the backends
    }
    return parse_config(raw, env={}, base_dir=tmp_path)


async def body(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def read(pool: Pool, bucket: str, key: str, start: int = 0, end: int | None = None) -> bytes:
    handle = await pool.objects.open_object(bucket, key)
    return b"".join([bytes(p) async for p in pool.objects.read(handle, start, end)])


async def put(pool: Pool, bucket: str, key: str, data: bytes, **kw: Any) -> None:
    await pool.objects.put_object(bucket, key, body(data), size=len(data), **kw)


async def write_everything(pool: Pool) -> dict[tuple[str, str], bytes]:
    """Every kind of key the fallback must serve or hide; returns what reads must see."""
    seen: dict[tuple[str, str], bytes] = {}
    big = os.urandom(CHUNK * 3 + 17)
    await put(
        pool, "plain", "big", big, headers={"Content-Type": "x/big"}, user_metadata={"a": "1"}
    )
    seen[("plain", "big")] = big
    enc = os.urandom(CHUNK * 2 + 5)
    await put(pool, "secret", "enc", enc)
    seen[("secret", "enc")] = enc
    await put(pool, "plain", "empty", b"")
    seen[("plain", "empty")] = b""
    mp = MultipartService(pool.store, pool.objects, min_part_size=1)
    for bucket in ("plain", "secret"):
        upload = await mp.create(bucket, "mp")
        parts = [os.urandom(CHUNK + 3), os.urandom(CHUNK // 2)]
        etags = [
            (await mp.upload_part(upload, n, body(p), size=len(p))).etag
            for n, p in enumerate(parts, start=1)
        ]
        await mp.complete(upload, list(enumerate(etags, start=1)))
        seen[(bucket, "mp")] = b"".join(parts)
        source = await pool.objects.open_object(bucket, "mp")
        await pool.objects.copy_object(source, bucket, "copy-of-mp")  # refs another prefix
        seen[(bucket, "copy-of-mp")] = seen[(bucket, "mp")]
    source = await pool.objects.open_object("plain", "big")
    await pool.objects.copy_object(source, "secret", "copy-of-big")  # into an encrypted bucket
    seen[("secret", "copy-of-big")] = big
    # definite failures after chunk 0 was written: never served from blobs
    with pytest.raises(BadDigest):
        await put(pool, "plain", "bad-md5", b"body", content_md5=b"\0" * 16)
    await put(pool, "plain", "guarded", b"kept version")
    with pytest.raises(PreconditionFailed):
        await put(
            pool, "plain", "guarded", b"refused", precondition=WritePrecondition(if_match="0")
        )
    seen[("plain", "guarded")] = b"kept version"
    await put(pool, "plain", "over", b"first version")
    await put(pool, "plain", "over", b"second version")
    seen[("plain", "over")] = b"second version"
    for key in ("gone", "gone-many-1", "gone-many-2", "gone-after-copy"):
        await put(pool, "plain", key, os.urandom(CHUNK + 1))
    await put(pool, "secret", "gone", os.urandom(100))
    await put(pool, "plain", "gone", b"overwritten before the delete")
    source = await pool.objects.open_object("plain", "gone-after-copy")
    await pool.objects.copy_object(source, "plain", "kept-copy")  # keeps its chunks alive
    seen[("plain", "kept-copy")] = b"".join([bytes(p) async for p in pool.objects.read(source)])
    await pool.objects.delete_object("plain", "gone")
    await pool.objects.delete_object("secret", "gone")
    await pool.objects.delete_object("plain", "gone-after-copy")
    await pool.objects.delete_objects("plain", ["gone-many-1", "gone-many-2", "never-there"])
    return seen


async def check_down(pool: Pool, seen: dict[tuple[str, str], bytes]) -> None:
    for (bucket, key), data in seen.items():
        assert await read(pool, bucket, key) == data, (bucket, key)
    big = seen[("plain", "big")]
    assert (
        await read(pool, "plain", "big", CHUNK - 10, 2 * CHUNK + 7)
        == big[CHUNK - 10 : 2 * CHUNK + 7]
    )
    enc = seen[("secret", "enc")]
    assert (
        await read(pool, "secret", "enc", CHUNK + 1, CHUNK + 70_000)
        == enc[CHUNK + 1 : CHUNK + 70_000]
    )
    head = await pool.objects.head_object("plain", "big")
    assert (head.size, head.headers, head.user_metadata) == (
        len(big),
        {"Content-Type": "x/big"},
        {"a": "1"},
    )
    for bucket, key in [
        ("plain", "gone"),
        ("secret", "gone"),
        ("plain", "gone-many-1"),
        ("plain", "gone-many-2"),
        ("plain", "gone-after-copy"),
        ("plain", "never-written"),
        ("plain", "bad-md5"),
        ("secret", "never-written"),
    ]:
        with pytest.raises(NoSuchKey):
            await pool.objects.open_object(bucket, key)
        with pytest.raises(NoSuchKey):
            await pool.objects.head_object(bucket, key)
    assert pool.objects.fallback is not None and pool.objects.fallback.served >= len(seen)
    # the FUSE side: a file never looked up is found and read from its blobs
    files = make_file_service(pool)
    files.prepare()
    attr = await files.stat("plain", "big")
    assert (attr.size, attr.is_dir) == (len(big), False)
    node = await files.open("secret", "enc")
    assert await files.read(node, CHUNK - 3, 10) == enc[CHUNK - 3 : CHUNK + 7]
    await files.release(node)
    with pytest.raises(StoreUnavailable):  # maybe a directory: only the store knows
        await files.stat("plain", "gone")
    with pytest.raises(DOWN):
        await put(pool, "plain", "new", b"x")
    with pytest.raises(DOWN):
        await pool.objects.list_objects("plain")
    with pytest.raises(DOWN):
        await pool.objects.delete_object("plain", "big")


async def check_up(pool: Pool, seen: dict[tuple[str, str], bytes], tmp_path: Path) -> None:
    await asyncio.sleep(0.25)  # retry_seconds: the next call tries the store again
    for attempt in range(20):
        try:
            await put(pool, "plain", "after", b"back")
            break
        except DOWN:
            if attempt == 19:
                raise
            await asyncio.sleep(0.25)
    for (bucket, key), data in seen.items():
        assert await read(pool, bucket, key) == data
    report = await pool.admin.fsck()
    assert report.problems == 0, report
    assert len(await pool.store.list_tombstones()) == 5
    assert tombstone_files(tmp_path) == 5
    # the GC removes the deleted versions; then the tombstones hide nothing and go too,
    # except the one whose version's chunks a copy still holds
    assert pool.sweeper is not None
    while await pool.gc.run_once():
        pass
    assert await pool.sweeper.run_once() == 4
    while await pool.gc.run_once():
        pass
    left = await pool.store.list_tombstones()
    assert [t.key for t in left] == ["gone-after-copy"]
    assert tombstone_files(tmp_path) == 1
    await pool.objects.delete_object("plain", "kept-copy")
    while await pool.gc.run_once():
        pass
    assert await pool.sweeper.run_once() == 2  # gone-after-copy's, and kept-copy's own
    while await pool.gc.run_once():
        pass
    assert await pool.store.list_tombstones() == []
    assert tombstone_files(tmp_path) == 0
    report = await pool.admin.fsck()
    assert report.problems == 0, report


def tombstone_files(tmp_path: Path) -> int:
    return sum(1 for p in (tmp_path / "d0").rglob("tombstone") if p.is_file())


async def scenario(cfg: Any, tmp_path: Path, down: Any, up: Any) -> None:
    writer = await open_pool(cfg)
    try:
        seen = await write_everything(writer)
    finally:
        await writer.close()
    pool = await open_pool(cfg)  # a fresh process: nothing of those keys is cached
    try:
        state = down()
        await check_down(pool, seen)
        up(state)
        await check_up(pool, seen, tmp_path)
    finally:
        await pool.close()


@pytest.mark.allow_error_logs
async def test_sqlite_unreadable_uncached_reads_come_from_blobs(
    tmp_path: Path, moto_s3: MotoS3
) -> None:
    cfg = config(tmp_path, {"sqlite": {"path": "cairn.db"}}, moto_s3, moto_s3.new_bucket())
    await scenario(cfg, tmp_path, lambda: corrupt(tmp_path), restore)


@pytest.fixture
def pg_switch() -> Iterator[tuple[Switch, str]]:
    with relayed_dsn(pg_dsn()) as relay:
        yield relay


@pytest.mark.allow_error_logs
async def test_postgres_cut_off_uncached_reads_come_from_blobs(
    tmp_path: Path, moto_s3: MotoS3, pg_switch: tuple[Switch, str]
) -> None:
    switch, dsn = pg_switch
    schema = f"t_{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(pg_dsn())
    await conn.execute(f"CREATE SCHEMA {schema}")
    try:
        database = {"postgres": {"dsn": dsn, "schema": schema, "max_connections": 4}}
        cfg = config(tmp_path, database, moto_s3, moto_s3.new_bucket())
        await scenario(cfg, tmp_path, switch.off, lambda _: switch.on())
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


@pytest.mark.allow_error_logs
async def test_an_unlisted_backend_may_hold_the_newest_version(
    tmp_path: Path, moto_s3: MotoS3
) -> None:
    """With a write quorum of 1, a backend that cannot be listed may hold a newer
    version than the others show: 503, never an older version. With a quorum of 2,
    one unlisted backend is harmless: every acknowledged version is on the other."""
    for factor in (1, 2):
        faulty: dict[str, FaultyBackend] = {}

        def wrap(backend: Backend, faulty: dict[str, FaultyBackend] = faulty) -> Backend:
            faulty[backend.name] = FaultyBackend(backend)
            return faulty[backend.name]

        cfg = config(
            tmp_path / str(factor),
            {"sqlite": {"path": "cairn.db"}},
            moto_s3,
            moto_s3.new_bucket(),
            factor=factor,
        )
        (tmp_path / str(factor)).mkdir()
        pool = await open_pool(cfg, wrap_backend=wrap)
        try:
            await put(pool, "plain", "k", b"old")
            await put(pool, "plain", "k", b"new")
            corrupt(tmp_path / str(factor))  # the store is gone
            faulty["cloud"].fail_always("list", TransientBackendError("listing refused"))
            if factor == 1:
                with pytest.raises(MetadataUnavailable, match="cloud: listing refused"):
                    await read(pool, "plain", "k")
            else:
                assert await read(pool, "plain", "k") == b"new"
            faulty["cloud"].clear()
            assert await read(pool, "plain", "k") == b"new"
        finally:
            with contextlib.suppress(Exception):
                await pool.close()


async def test_a_full_pool_still_takes_deletes(tmp_path: Path) -> None:
    """A tombstone is written over quota when no backend has room: deleting is how a
    full pool gets space back."""

    def cfg(quota: int | None) -> Any:
        backend: dict[str, Any] = {"name": "d0", "type": "local", "path": "d0"}
        if quota is not None:
            backend["quota_bytes"] = quota
        raw = {
            "database": {"sqlite": {"path": "cairn.db"}},
            "pool": {"gc_delay_seconds": 0},
            "backends": [backend],
            "buckets": [{"name": "plain"}],
        }
        return parse_config(raw, env={}, base_dir=tmp_path)

    pool = await open_pool(cfg(None))
    try:
        await put(pool, "plain", "k", b"x" * 1000)
        [space] = await pool.store.get_space()
        full = space.used_bytes
    finally:
        await pool.close()
    pool = await open_pool(cfg(full))  # not one byte left
    try:
        await pool.objects.delete_object("plain", "k")
        [space] = await pool.store.get_space()
        assert space.used_bytes > full  # the tombstone, over quota, accounted
        [tomb] = await pool.store.list_tombstones()
        assert tomb.key == "k"
        report = await pool.admin.fsck()
        assert report.problems == 0, report
    finally:
        await pool.close()


async def test_a_delete_that_cannot_write_every_tombstone_changes_nothing(
    tmp_path: Path,
) -> None:
    faulty: dict[str, FaultyBackend] = {}

    def wrap(backend: Backend) -> Backend:
        faulty[backend.name] = FaultyBackend(backend)
        return faulty[backend.name]

    raw = {
        "database": {"sqlite": {"path": "cairn.db"}},
        "pool": {"gc_delay_seconds": 0},
        "backends": [{"name": "d0", "type": "local", "path": "d0"}],
        "buckets": [{"name": "plain"}],
    }
    pool = await open_pool(parse_config(raw, env={}, base_dir=tmp_path), wrap_backend=wrap)
    try:
        for key in ("a", "b", "c"):
            await put(pool, "plain", key, key.encode())
        faulty["d0"].fail_call("put", 2)  # the second tombstone cannot be written
        with pytest.raises(BackendsUnavailable):
            await pool.objects.delete_objects("plain", ["a", "b", "c"])
        assert not list((tmp_path / "d0").rglob("tombstone"))  # the others were removed
        for key in ("a", "b", "c"):
            assert await read(pool, "plain", key) == key.encode()
        assert await pool.store.list_tombstones() == []
        await pool.objects.delete_objects("plain", ["a", "b", "c"])
        assert len(list((tmp_path / "d0").rglob("tombstone"))) == 3
        report = await pool.admin.fsck()
        assert report.problems == 0, report
    finally:
        await pool.close()
