"""Background workers over a real store and local backends, with injected faults."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from appliance.build import Pool, open_pool
from appliance.config import parse_config
from appliance.meta.backoff import Backoff
from appliance.meta.models import VersionKind
from appliance.meta.store import GC_QUEUE
from appliance.services.workers import GcWorker, Janitor
from backends.base import Backend
from backends.errors import TransientBackendError
from backends.faults import FaultyBackend

pytestmark = pytest.mark.service


async def body(data: bytes) -> AsyncIterator[bytes]:
    yield data


def disk_files(tmp_path: Path) -> list[Path]:
    return [f for f in tmp_path.glob("d*/**/*") if f.is_file()]


@pytest.fixture
async def faulty_pool(tmp_path: Path) -> AsyncIterator[tuple[Pool, dict[str, FaultyBackend]]]:
    faults: dict[str, FaultyBackend] = {}

    def wrap(backend: Backend) -> Backend:
        faults[backend.name] = FaultyBackend(backend)
        return faults[backend.name]

    raw = {
        "database": {"sqlite": {"path": str(tmp_path / "cairn.db")}},
        "pool": {"chunk_size": "64KiB", "gc_delay_seconds": 0},
        "backends": [{"name": "d0", "type": "local", "path": "d0", "quota_bytes": "10MiB"}],
        "buckets": [{"name": "bkt"}],
    }
    pool = await open_pool(parse_config(raw, env={}, base_dir=tmp_path), wrap_backend=wrap)
    yield pool, faults
    await pool.close()


async def test_gc_retries_refused_deletes_until_nothing_is_orphaned(
    faulty_pool: tuple[Pool, dict[str, FaultyBackend]], tmp_path: Path
) -> None:
    pool, faults = faulty_pool
    data = os.urandom(200_000)
    await pool.objects.put_object("bkt", "k", body(data), size=len(data))
    await pool.objects.put_object("bkt", "k", body(b"new"), size=3)  # old chunks -> GC
    faults["d0"].fail_always("delete", TransientBackendError("refusing deletes"))
    gc = GcWorker(pool.store, pool.chunks, backoff=Backoff(base_seconds=0, jitter=0))
    assert await gc.run_once() == 0
    depth = await pool.store.queue_depth(GC_QUEUE)
    assert depth == {"ready": 4}  # 4 chunks of 64 KiB: all retried later, none lost
    assert len(disk_files(tmp_path)) == 5
    faults["d0"].clear()
    while await gc.run_once():
        pass
    assert await pool.store.queue_depth(GC_QUEUE) == {}
    assert len(disk_files(tmp_path)) == 1
    space = (await pool.store.get_space())[0]
    assert space.used_bytes == sum(f.stat().st_size for f in disk_files(tmp_path))
    handle = await pool.objects.open_object("bkt", "k")
    assert b"".join([p async for p in pool.objects.read(handle)]) == b"new"


async def test_a_backend_dying_mid_write_leaves_nothing_behind(
    faulty_pool: tuple[Pool, dict[str, FaultyBackend]], tmp_path: Path
) -> None:
    pool, faults = faulty_pool
    faults["d0"].fail_call("put", 3, TransientBackendError("connection reset"))
    faults["d0"].fail_call("put", 4, TransientBackendError("connection reset"))
    faults["d0"].fail_call("put", 5, TransientBackendError("connection reset"))
    faults["d0"].fail_call("put", 6, TransientBackendError("connection reset"))
    faults["d0"].fail_call("put", 7, TransientBackendError("connection reset"))
    data = os.urandom(500_000)
    with pytest.raises(Exception, match="could not store a chunk"):
        await pool.objects.put_object("bkt", "k", body(data), size=len(data))
    while await pool.gc.run_once():
        pass
    assert disk_files(tmp_path) == []
    await pool.state.leases.retire_all()  # what the failed writes drew is back in the lease
    space = (await pool.store.get_space())[0]
    assert (space.used_bytes, space.reserved_bytes) == (0, 0)


async def test_janitor_aborts_stale_uploads(
    faulty_pool: tuple[Pool, dict[str, FaultyBackend]], tmp_path: Path
) -> None:
    pool, _ = faulty_pool
    version = await pool.objects.begin("bkt", "crashed", kind=VersionKind.OBJECT)
    await pool.objects.writer.write(version, body(os.urandom(100_000)), size=100_000, identity=True)
    await pool.store.reserve("d0", 5000, owner=version.version_id)  # a reservation left behind
    assert len(disk_files(tmp_path)) == 2
    assert await Janitor(pool.store, upload_ttl=timedelta(hours=1)).run_once() == 0
    assert await Janitor(pool.store, upload_ttl=timedelta(seconds=-1)).run_once() >= 1
    while await pool.gc.run_once():
        pass
    assert disk_files(tmp_path) == []
    space = (await pool.store.get_space())[0]
    assert (space.used_bytes, space.reserved_bytes) == (0, 0)
