"""The database circuit breaker: reads keep working while the metadata store is
unreachable (a corrupt SQLite file; a PostgreSQL server cut off behind a relay), writes
and listings fail with ``StoreUnavailable`` (S3 503), and everything resumes after."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from appliance.build import Pool, open_pool
from appliance.config import parse_config
from appliance.errors import MetadataUnavailable, NoSuchKey
from appliance.meta.errors import StoreUnavailable
from tests.conftest import pg_dsn
from tests.relay import Switch, relayed_dsn

pytestmark = pytest.mark.service
CHUNK = 64 * 1024
DOWN = (StoreUnavailable, MetadataUnavailable)


def config(tmp_path: Path, database: dict[str, Any]) -> Any:
    raw = {
        "database": {**database, "retry_seconds": 0.2},
        "pool": {"chunk_size": CHUNK, "gc_delay_seconds": 0},
        "backends": [{"name": "d0", "type": "local", "path": "d0"}],
        "buckets": [{"name": "plain"}, {"name": "secret", "encryption": True}],
        "encryption": {"key": {"inline": base64.b64encode(b"k" * 32).decode()}},
        "cache": {"max_size": 0},  # reads reach the backends: only metadata is cached
    }
    return parse_config(raw, env={}, base_dir=tmp_path)


async def body(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def read(pool: Pool, bucket: str, key: str) -> bytes:
    handle = await pool.objects.open_object(bucket, key)
    return b"".join([bytes(p) async for p in pool.objects.read(handle)])


async def fill(pool: Pool) -> dict[tuple[str, str], bytes]:
    """Objects in both buckets, each read once (so its metadata is recent)."""
    stored = {}
    for bucket in ("plain", "secret"):
        for i in range(3):
            data = os.urandom(CHUNK * 2 + i)
            await pool.objects.put_object(bucket, f"k{i}", body(data), size=len(data))
            stored[(bucket, f"k{i}")] = data
    for (bucket, key), data in stored.items():
        assert await read(pool, bucket, key) == data
    return stored


async def check_down(pool: Pool, stored: dict[tuple[str, str], bytes]) -> None:
    for _ in range(2):  # the first call finds the store gone, the second fails fast
        for (bucket, key), data in stored.items():
            assert await read(pool, bucket, key) == data
    with pytest.raises(DOWN):
        await pool.objects.put_object("plain", "new", body(b"x"), size=1)
    with pytest.raises(DOWN):
        await pool.objects.list_objects("plain")
    with pytest.raises(DOWN):
        await pool.objects.delete_object("plain", "k0")
    with pytest.raises(NoSuchKey):  # nothing cached: its blobs say it was never written
        await pool.objects.open_object("plain", "never-read")


async def check_up(pool: Pool, stored: dict[tuple[str, str], bytes]) -> None:
    await asyncio.sleep(0.25)  # retry_seconds: the next call tries the store again
    for attempt in range(20):
        try:
            await pool.objects.put_object("plain", "after", body(b"back"), size=4)
            break
        except DOWN:
            if attempt == 19:
                raise
            await asyncio.sleep(0.25)
    assert await read(pool, "plain", "after") == b"back"
    for (bucket, key), data in stored.items():
        assert await read(pool, bucket, key) == data
    page = await pool.objects.list_objects("plain")
    assert [e.key for e in page.entries] == ["after", "k0", "k1", "k2"]
    report = await pool.admin.fsck()  # the store and the backends agree
    assert report.problems == 0, report
    assert report.locations == report.blobs == report.chunks == 2 * (2 + 3 + 3) + 1


def corrupt(tmp_path: Path) -> dict[Path, bytes]:
    """Write garbage over the database and its WAL (same sizes); return what was there."""
    files = [p for p in tmp_path.glob("cairn.db*") if not p.name.endswith(".lock")]
    saved = {p: p.read_bytes() for p in files}
    for p in files:
        with p.open("r+b") as f:
            f.write(os.urandom(len(saved[p])))
    return saved


def restore(saved: dict[Path, bytes]) -> None:
    for p, data in saved.items():
        with p.open("r+b") as f:
            f.write(data)


@pytest.mark.allow_error_logs
async def test_sqlite_corrupt_file_reads_go_on_writes_fail_then_resume(tmp_path: Path) -> None:
    pool = await open_pool(config(tmp_path, {"sqlite": {"path": "cairn.db"}}))
    try:
        stored = await fill(pool)
        saved = corrupt(tmp_path)
        await check_down(pool, stored)
        restore(saved)  # the file is repaired
        await check_up(pool, stored)
    finally:
        await pool.close()


@pytest.fixture
def pg_switch() -> Iterator[tuple[Switch, str]]:
    """A relay to the test PostgreSQL server and a DSN that goes through it."""
    with relayed_dsn(pg_dsn()) as relay:
        yield relay


@pytest.mark.allow_error_logs
async def test_postgres_cut_off_reads_go_on_writes_fail_then_resume(
    tmp_path: Path, pg_switch: tuple[Switch, str]
) -> None:
    switch, dsn = pg_switch
    schema = f"t_{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(pg_dsn())
    await conn.execute(f"CREATE SCHEMA {schema}")
    try:
        pool = await open_pool(
            config(tmp_path, {"postgres": {"dsn": dsn, "schema": schema, "max_connections": 4}})
        )
        try:
            stored = await fill(pool)
            switch.off()  # the server is gone: connections cut, new ones refused
            await check_down(pool, stored)
            switch.on()
            await check_up(pool, stored)
        finally:
            await pool.close()
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()
    shutil.rmtree(tmp_path / "d0", ignore_errors=True)
