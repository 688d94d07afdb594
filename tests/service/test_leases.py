"""Quota leases over a real store (SQLite and PostgreSQL) and local backends: small
blobs draw on one reservation per backend, and the quota still holds exactly."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.build import Pool, open_pool
from appliance.clock import utcnow
from appliance.config import parse_config
from appliance.errors import NoCapacity
from appliance.placement.leases import LEASE_BYTES, OWNER_PREFIX, QuotaLeases
from appliance.services.workers import Janitor
from backends.base import Backend
from backends.errors import TransientBackendError
from backends.faults import FaultyBackend

pytestmark = pytest.mark.service

SMALL = 16 * 1024


async def body(data: bytes) -> AsyncIterator[bytes]:
    yield data


def on_disk(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


PoolFactory = Callable[..., Any]


@pytest.fixture
async def make_pool(database: Any, tmp_path: Path) -> AsyncIterator[PoolFactory]:
    pools: list[Pool] = []

    async def make(quota: str | None = None, wrap: Any = None) -> Pool:
        backend: dict[str, Any] = {"name": "d0", "type": "local", "path": "d0"}
        if quota is not None:
            backend["quota_bytes"] = quota
        raw = {
            "database": database,
            "pool": {"chunk_size": "64KiB", "gc_delay_seconds": 0},
            "backends": [backend],
            "buckets": [{"name": "bkt"}],
        }
        pool = await open_pool(parse_config(raw, env={}, base_dir=tmp_path), wrap_backend=wrap)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        await pool.close()


async def reserved(pool: Pool) -> int:
    space = (await pool.store.get_space())[0]
    return space.reserved_bytes


async def test_small_writes_share_one_lease_and_the_ledger_stays_exact(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    pool = await make_pool()
    for i in range(50):
        await pool.objects.put_object("bkt", f"k{i}", body(os.urandom(SMALL)), size=SMALL)
    space = (await pool.store.get_space())[0]
    used = on_disk(tmp_path / "d0")
    assert space.used_bytes == used
    # one lease holds what the 50 blobs did not draw; the view counts it as free
    assert space.reserved_bytes == LEASE_BYTES - used
    pool.state.invalidate()  # a fresh view, from the store's ledger
    view = (await pool.state.view()).by_name()["d0"]
    assert (view.used_bytes, view.reserved_bytes) == (used, 0)
    await pool.state.leases.retire_all()
    space = (await pool.store.get_space())[0]
    assert (space.used_bytes, space.reserved_bytes) == (used, 0)


async def test_a_pool_fills_to_its_quota_with_small_files(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    """A lease larger than the room left is not taken: the last bytes go to blobs that
    reserve their own, and the quota is never passed."""
    pool = await make_pool(quota="5MiB")
    written = 0
    full = False
    for i in range(1000):
        try:
            await pool.objects.put_object("bkt", f"k{i}", body(os.urandom(SMALL)), size=SMALL)
        except NoCapacity:
            full = True
            break
        written += 1
        space = (await pool.store.get_space())[0]
        assert space.used_bytes + space.reserved_bytes <= 5 * 1024 * 1024
    assert full
    space = (await pool.store.get_space())[0]
    assert space.used_bytes == on_disk(tmp_path / "d0")
    stored = space.used_bytes // written
    assert 5 * 1024 * 1024 - space.used_bytes < stored + 512  # not a blob more would fit
    await pool.state.leases.retire_all()
    assert await reserved(pool) == 0


async def test_two_instances_on_one_database_never_pass_the_quota(
    make_pool: PoolFactory, database: Any, tmp_path: Path
) -> None:
    if "postgres" not in database:
        pytest.skip("one SQLite database has one instance")
    first, second = await make_pool(quota="9MiB"), await make_pool(quota="9MiB")

    async def fill(pool: Pool, name: str) -> int:
        count = 0
        try:
            for i in range(2000):
                key = f"{name}{i}"
                await pool.objects.put_object("bkt", key, body(os.urandom(SMALL)), size=SMALL)
                count += 1
        except NoCapacity:
            return count
        raise AssertionError("the quota never stopped the writes")

    counts = await asyncio.gather(fill(first, "a"), fill(second, "b"))
    assert all(counts)
    space = (await first.store.get_space())[0]
    assert space.used_bytes == on_disk(tmp_path / "d0") <= 9 * 1024 * 1024
    await first.state.leases.retire_all()
    await second.state.leases.retire_all()
    assert await reserved(first) == 0


async def test_a_failed_write_gives_its_part_back_to_the_lease(
    make_pool: PoolFactory, tmp_path: Path
) -> None:
    faults: dict[str, FaultyBackend] = {}

    def wrap(backend: Backend) -> Backend:
        faults[backend.name] = FaultyBackend(backend)
        return faults[backend.name]

    pool = await make_pool(wrap=wrap)
    await pool.objects.put_object("bkt", "ok", body(os.urandom(SMALL)), size=SMALL)
    idle = pool.state.leases.idle("d0")
    faults["d0"].fail_always("put", TransientBackendError("disk gone"))
    with pytest.raises(Exception, match="could not store a chunk"):
        await pool.objects.put_object("bkt", "lost", body(os.urandom(SMALL)), size=SMALL)
    assert pool.state.leases.idle("d0") == idle
    faults["d0"].clear()
    await pool.state.leases.retire_all()
    space = (await pool.store.get_space())[0]
    assert (space.used_bytes, space.reserved_bytes) == (on_disk(tmp_path / "d0"), 0)


async def test_a_lease_is_retired_after_its_ttl_without_more_writes(
    make_pool: PoolFactory,
) -> None:
    pool = await make_pool()
    leases = QuotaLeases(pool.store, lease_bytes=1024 * 1024, ttl=0.2)
    first = await leases.reserve("d0", 1000, owner="v1")
    assert first is not None and await leases.reserve("d0", 1000, owner="v2") == first
    await leases.release("d0", first, 1000)  # one write failed: its part is back
    assert leases.idle("d0") == 1024 * 1024 - 1000
    assert await reserved(pool) == 1024 * 1024
    await asyncio.sleep(0.5)
    # the part still out (v1's) keeps that much reserved until its blob is recorded
    assert leases.idle("d0") == 0
    assert await reserved(pool) == 1000
    await pool.store.release_reservation(first, backend="d0", nbytes=1000)
    assert await reserved(pool) == 0
    await leases.close()


async def test_blobs_too_big_for_a_lease_reserve_their_own(make_pool: PoolFactory) -> None:
    pool = await make_pool()
    leases = QuotaLeases(pool.store, lease_bytes=1024 * 1024, largest_part=4096)
    own = await leases.reserve("d0", 5000, owner="v1")
    leased = await leases.reserve("d0", 4000, owner="v2")
    assert own is not None and leased is not None and own != leased
    assert leases.idle("d0") == 1024 * 1024 - 4000
    await leases.release("d0", own, 5000)
    await leases.close()
    assert await reserved(pool) == 4000  # v2's part, out until recorded


async def test_the_janitor_releases_leases_of_a_process_that_died(
    make_pool: PoolFactory,
) -> None:
    pool = await make_pool()
    dead = await pool.store.reserve("d0", LEASE_BYTES, owner=f"{OWNER_PREFIX}dead")
    own = await pool.store.reserve("d0", 100, owner="01UPLOADINGVERSION000000000")
    assert dead is not None and own is not None
    janitor = Janitor(pool.store, clock=lambda: utcnow() + timedelta(hours=2))
    assert await janitor.run_once() == 1  # the lease; the upload's is kept for 24 h
    assert await reserved(pool) == 100


async def test_a_sqlite_pool_opening_releases_leases_a_crash_left(
    make_pool: PoolFactory, database: Any
) -> None:
    """One process per SQLite file: any lease row found at open is a dead process's."""
    if "sqlite" not in database:
        pytest.skip("other instances may hold leases on PostgreSQL")
    first = await make_pool()
    assert await first.store.reserve("d0", LEASE_BYTES, owner=f"{OWNER_PREFIX}crashed")
    assert await first.store.reserve("d0", 100, owner="01UPLOADINGVERSION000000000")
    await first.close()  # retires only its own leases
    second = await make_pool()
    assert await reserved(second) == 100  # the upload's is the janitor's, after 24 h
