"""Replication, failover reads, repair and circuit breakers over real stores (SQLite and
PostgreSQL) and local-directory backends behind the fault-injecting wrapper."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from appliance.build import Pool, open_pool
from appliance.config import parse_config
from appliance.errors import BackendsUnavailable
from appliance.meta.backoff import Backoff
from appliance.meta.store import REPLICATE_QUEUE
from appliance.services.replication import ReplicationWorker
from backends.base import Backend
from backends.errors import TransientBackendError
from backends.faults import FaultyBackend

pytestmark = pytest.mark.service
KiB = 1024
CHUNK = 64 * KiB


def config(
    database: Any,
    tmp_path: Path,
    *,
    backends: int = 2,
    factor: int = 2,
    quorum: int = 1,
    groups: list[str | None] | None = None,
    buckets: list[dict[str, Any]] | None = None,
    encrypted: bool = False,
    names: list[str] | None = None,
    hedged: bool = False,
    replica_timeout: float = 0.3,
    **pool: Any,
) -> Any:
    names = names or [f"d{i}" for i in range(backends)]
    specs = []
    for i, name in enumerate(names):
        spec: dict[str, Any] = {"name": name, "type": "local", "path": name}
        if groups is not None and groups[i] is not None:
            spec["group"] = groups[i]
        spec["replica_timeout"] = replica_timeout
        specs.append(spec)
    raw: dict[str, Any] = {
        "database": database,
        "pool": {
            "chunk_size": CHUNK,
            "gc_delay_seconds": 0,
            "replication": {"factor": factor, "write_quorum": quorum, "hedged_reads": hedged},
            **pool,
        },
        "backends": specs,
        "buckets": buckets or [{"name": "bkt"}],
        "cache": {"max_size": 0},  # these tests watch what reaches the backends
    }
    if encrypted:
        raw["encryption"] = {"enabled": True, "key": {"inline": base64.b64encode(b"K" * 32)}}
    return parse_config(raw, env={}, base_dir=tmp_path)


Faults = dict[str, FaultyBackend]


async def opened(cfg: Any) -> tuple[Pool, Faults]:
    faults: Faults = {}

    def wrap(backend: Backend) -> Backend:
        faults[backend.name] = FaultyBackend(backend)
        return faults[backend.name]

    return await open_pool(cfg, wrap_backend=wrap), faults


@pytest.fixture
async def pools() -> AsyncIterator[list[Pool]]:
    """Pools a test opens; closed at the end."""
    made: list[Pool] = []
    yield made
    for pool in made:
        await pool.close()


async def body(data: bytes, piece: int = 50_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), piece):
        yield data[i : i + piece]


async def read(pool: Pool, key: str, bucket: str = "bkt") -> bytes:
    handle = await pool.objects.open_object(bucket, key)
    return b"".join([bytes(p) async for p in pool.objects.read(handle)])


async def replicas(pool: Pool, key: str, bucket: str = "bkt") -> list[list[str]]:
    """Backends of each chunk of the key's current version, in order."""
    handle = await pool.objects.open_object(bucket, key)
    return [sorted(loc.backend for loc in p.locations) for p in handle.layout]


def worker(pool: Pool) -> ReplicationWorker:
    return ReplicationWorker(
        pool.store,
        pool.chunks,
        pool.state,
        pool.scanner._policy,
        backoff=Backoff(base_seconds=0, jitter=0),
    )


async def drain(pool: Pool) -> int:
    repl = worker(pool)
    total = 0
    for _ in range(20):
        did = await repl.run_once()
        total += did
        if not did:
            break
    return total


def files(tmp_path: Path, backend: str) -> dict[str, bytes]:
    root = tmp_path / backend
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


async def check_space(pool: Pool, tmp_path: Path) -> None:
    """The quota ledger counts exactly the bytes on each backend's disk, and nothing
    is reserved once the quota leases are retired."""
    await pool.state.leases.retire_all()
    for space in await pool.store.get_space():
        on_disk = sum(len(b) for b in files(tmp_path, space.name).values())
        assert space.used_bytes == on_disk, space.name
        assert space.reserved_bytes == 0, space.name


# -- write quorum and the replication worker ------------------------------------------


async def test_quorum_one_acknowledges_one_replica_and_the_worker_makes_the_rest(
    database: Any, tmp_path: Path, pools: list[Pool]
) -> None:
    pool, faults = await opened(config(database, tmp_path, backends=3, factor=2, quorum=1))
    pools.append(pool)
    data = os.urandom(3 * CHUNK + 100)
    await pool.objects.put_object("bkt", "k", body(data), size=len(data))
    assert [len(r) for r in await replicas(pool, "k")] == [1, 1, 1, 1]
    assert await pool.store.queue_depth(REPLICATE_QUEUE) == {"ready": 4}
    assert await drain(pool) == 4
    layout = await replicas(pool, "k")
    assert all(len(r) == 2 for r in layout), layout
    assert await pool.store.queue_depth(REPLICATE_QUEUE) == {}
    # either replica alone serves the object
    for name in ("d0", "d1", "d2"):
        faults[name].fail_always("get")
        assert await read(pool, "k") == data
        faults[name].clear()
    await check_space(pool, tmp_path)
    assert await drain(pool) == 0  # idempotent: nothing more to do


async def test_quorum_two_survives_the_loss_of_either_backend_right_after_the_ack(
    database: Any, tmp_path: Path, pools: list[Pool]
) -> None:
    pool, faults = await opened(config(database, tmp_path, backends=2, factor=2, quorum=2))
    pools.append(pool)
    data = os.urandom(2 * CHUNK + 7)
    await pool.objects.put_object("bkt", "k", body(data), size=len(data))
    assert await pool.store.queue_depth(REPLICATE_QUEUE) == {}
    for lost, other in (("d0", "d1"), ("d1", "d0")):
        faults[lost].fail_always("get", TransientBackendError("backend stopped"))
        assert await read(pool, "k") == data
        faults[lost].clear()
        assert faults[other].calls["get"] > 0


async def test_quorum_two_fails_cleanly_when_only_one_backend_takes_writes(
    database: Any, tmp_path: Path, pools: list[Pool]
) -> None:
    pool, faults = await opened(config(database, tmp_path, backends=2, factor=2, quorum=2))
    pools.append(pool)
    faults["d1"].fail_always("put", TransientBackendError("disk gone"))
    with pytest.raises(BackendsUnavailable, match="d1"):
        await pool.objects.put_object("bkt", "k", body(b"x" * 1000), size=1000)
    assert files(tmp_path, "d0") == {}  # the replica on d0 was undone
    await check_space(pool, tmp_path)


async def test_a_failing_backend_sends_the_write_elsewhere_and_repair_follows(
    database: Any, tmp_path: Path, pools: list[Pool]
) -> None:
    pool, faults = await opened(config(database, tmp_path, backends=2, factor=2, quorum=1))
    pools.append(pool)
    faults["d0"].fail_always("put", TransientBackendError("d0 down"))
    data = os.urandom(CHUNK + 1)
    await pool.objects.put_object("bkt", "k", body(data), size=len(data))
    assert await replicas(pool, "k") == [["d1"], ["d1"]]
    assert await drain(pool) == 0  # d0 still refuses: items wait (backoff)
    assert (await pool.store.queue_depth(REPLICATE_QUEUE)).get("ready") == 2
    faults["d0"].clear()
    assert await drain(pool) == 2
    assert await replicas(pool, "k") == [["d0", "d1"], ["d0", "d1"]]
    await check_space(pool, tmp_path)


async def test_groups_put_replicas_in_distinct_failure_domains(
    database: Any, tmp_path: Path, pools: list[Pool]
) -> None:
    cfg = config(database, tmp_path, backends=3, factor=2, quorum=2, groups=["aws", "aws", "b2"])
    pool, _ = await opened(cfg)
    pools.append(pool)
    data = os.urandom(4 * CHUNK)
    await pool.objects.put_object("bkt", "k", body(data), size=len(data))
    for chunk in await replicas(pool, "k"):
        assert "d2" in chunk and len(chunk) == 2, chunk


def test_groups_must_allow_the_factor(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="2 writable backends in distinct groups"):
        config({"sqlite": {}}, tmp_path, backends=2, factor=2, groups=["aws", "aws"])


async def test_a_bucket_overrides_the_factor(
    database: Any, tmp_path: Path, pools: list[Pool]
) -> None:
    buckets = [{"name": "bkt"}, {"name": "triple", "replication_factor": 3}]
    cfg = config(database, tmp_path, backends=3, factor=1, quorum=1, buckets=buckets)
    pool, _ = await opened(cfg)
    pools.append(pool)
    await pool.objects.put_object("bkt", "one", body(b"1" * 100), size=100)
    await pool.objects.put_object("triple", "three", body(b"3" * 100), size=100)
    await drain(pool)
    assert [len(r) for r in await replicas(pool, "one")] == [1]
    assert await replicas(pool, "three", "triple") == [["d0", "d1", "d2"]]
    assert (await pool.scanner.scan()).queued == 0


# -- failover reads and repair --------------------------------------------------------


@pytest.mark.allow_error_logs
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
async def test_a_corrupt_replica_is_read_around_then_rewritten(
    database: Any, tmp_path: Path, pools: list[Pool], encrypted: bool
) -> None:
    cfg = config(database, tmp_path, backends=2, factor=2, quorum=2, encrypted=encrypted)
    pool, _ = await opened(cfg)
    pools.append(pool)
    data = os.urandom(CHUNK)
    await pool.objects.put_object("bkt", "k", body(data), size=len(data))
    handle = await pool.objects.open_object("bkt", "k")
    location = next(loc for loc in handle.layout[0].locations if loc.backend == "d0")
    path = tmp_path / "d0" / location.blob_key
    good = path.read_bytes()
    damaged = bytearray(good)
    damaged[-10] ^= 1
    path.write_bytes(bytes(damaged))
    assert await read(pool, "k") == data  # d0 is first in read order: failed over to d1
    assert await pool.store.queue_depth(REPLICATE_QUEUE) == {"ready": 1}
    assert await drain(pool) == 1
    assert path.read_bytes() == good
    assert await replicas(pool, "k") == [["d0", "d1"]]
    await check_space(pool, tmp_path)


async def test_a_missing_replica_is_read_around_then_restored(
    database: Any, tmp_path: Path, pools: list[Pool]
) -> None:
    pool, _ = await opened(config(database, tmp_path, backends=2, factor=2, quorum=2))
    pools.append(pool)
    data = os.urandom(100)
    await pool.objects.put_object("bkt", "k", body(data), size=len(data))
    [lost] = list(files(tmp_path, "d0"))
    (tmp_path / "d0" / lost).unlink()
    assert await read(pool, "k") == data
    assert await drain(pool) == 1
    assert (tmp_path / "d0" / lost).read_bytes() == files(tmp_path, "d1")[lost]


async def test_a_slow_replica_is_abandoned_after_its_timeout(
    database: Any, tmp_path: Path, pools: list[Pool]
) -> None:
    pool, faults = await opened(config(database, tmp_path, backends=2, factor=2, quorum=2))
    pools.append(pool)
    data = os.urandom(CHUNK)
    await pool.objects.put_object("bkt", "k", body(data), size=len(data))
    faults["d0"].latency(3.0)
    started = time.monotonic()
    assert await read(pool, "k") == data
    assert time.monotonic() - started < 2.0  # replica_timeout 0.3 s, then d1
    assert faults["d1"].calls["get"] == 1
    # the last replica gets no limit: with d1 gone, the slow d0 still serves
    faults["d0"].latency(0.5)
    faults["d1"].fail_always("get")
    assert await read(pool, "k") == data


@pytest.mark.parametrize("hedged", [False, True], ids=["plain", "hedged"])
async def test_a_replica_slower_than_usual_is_hedged_or_waited_for(
    database: Any, tmp_path: Path, pools: list[Pool], hedged: bool
) -> None:
    cfg = config(database, tmp_path, factor=2, quorum=2, hedged=hedged, replica_timeout=30)
    pool, faults = await opened(cfg)
    pools.append(pool)
    data = os.urandom(CHUNK)
    await pool.objects.put_object("bkt", "k", body(data), size=len(data))
    for _ in range(25):  # d0 (first in order) learns its usual read time
        assert await read(pool, "k") == data
    assert faults["d1"].calls["get"] == 0
    faults["d0"].latency(0.6)
    started = time.monotonic()
    assert await read(pool, "k") == data
    took = time.monotonic() - started
    if hedged:  # d1 was asked after d0's p95 (milliseconds) and answered first
        assert took < 0.4
        assert faults["d1"].calls["get"] == 1
    else:
        assert took >= 0.6
        assert faults["d1"].calls["get"] == 0


# -- the scan: backends lost, factors changed -----------------------------------------


async def test_the_scan_repairs_chunks_of_a_backend_removed_from_the_pool(
    database: Any, tmp_path: Path, pools: list[Pool]
) -> None:
    pool, _ = await opened(config(database, tmp_path, backends=2, factor=2, quorum=2))
    data = os.urandom(2 * CHUNK)
    await pool.objects.put_object("bkt", "k", body(data), size=len(data))
    await pool.close()
    # d0 is gone for good; d2 replaces it
    pool, _ = await opened(config(database, tmp_path, names=["d1", "d2"], factor=2, quorum=2))
    pools.append(pool)
    report = await pool.scanner.scan()
    assert (report.chunks, report.below, report.queued) == (2, 2, 2)
    assert await drain(pool) == 2
    for chunk in await replicas(pool, "k"):
        assert {"d1", "d2"} <= set(chunk), chunk
    assert (await pool.scanner.scan()).below == 0
    assert files(tmp_path, "d2") == files(tmp_path, "d1")


async def test_the_scan_removes_replicas_above_a_lowered_factor(
    database: Any, tmp_path: Path, pools: list[Pool]
) -> None:
    pool, _ = await opened(config(database, tmp_path, backends=3, factor=3, quorum=3))
    data = os.urandom(CHUNK + 5)
    await pool.objects.put_object("bkt", "k", body(data), size=len(data))
    await pool.close()
    pool, _ = await opened(config(database, tmp_path, backends=3, factor=2, quorum=1))
    pools.append(pool)
    report = await pool.scanner.scan()
    assert (report.above, report.queued) == (2, 2)
    assert await drain(pool) == 2
    assert [len(r) for r in await replicas(pool, "k")] == [2, 2]
    assert len(files(tmp_path, "d2")) == 0  # last in read order goes first
    assert await read(pool, "k") == data
    await check_space(pool, tmp_path)


# -- circuit breakers -----------------------------------------------------------------


async def test_a_failing_backend_opens_its_circuit_and_a_probe_closes_it(
    database: Any, tmp_path: Path, pools: list[Pool]
) -> None:
    cfg = config(
        database,
        tmp_path,
        backends=2,
        factor=1,
        quorum=1,
        health={"failure_threshold": 2, "open_seconds": 0.2},
    )
    pool, faults = await opened(cfg)
    pools.append(pool)
    faults["d0"].fail_always("put", TransientBackendError("d0 down"))
    for i in range(3):
        await pool.objects.put_object("bkt", f"k{i}", body(b"x" * 10), size=10)
    # two failed puts opened d0's circuit: the third write went straight to d1
    assert faults["d0"].calls["put"] == 2
    [view] = [b for b in await pool.admin.backends() if b.name == "d0"]
    assert view.circuit == "open"
    faults["d0"].clear()
    await asyncio.sleep(0.25)  # half-open after open_seconds
    assert await pool.health.check("d0") is True
    [view] = [b for b in await pool.admin.backends() if b.name == "d0"]
    assert view.circuit == "closed"
    await pool.objects.put_object("bkt", "back", body(b"y" * 10), size=10)
    assert await replicas(pool, "back") == [["d0"]]


async def test_the_health_check_opens_the_circuit_of_an_idle_dead_backend(
    database: Any, tmp_path: Path, pools: list[Pool]
) -> None:
    cfg = config(database, tmp_path, factor=1, quorum=1, health={"failure_threshold": 3})
    pool, faults = await opened(cfg)
    pools.append(pool)
    faults["d1"].fail_always("head", TransientBackendError("connection refused"))
    for _ in range(3):
        await pool.health.run_once()
    states = {b.name: b.circuit for b in await pool.admin.backends()}
    assert states == {"d0": "closed", "d1": "open"}


# -- usage caps -----------------------------------------------------------------------


def capped_config(database: Any, tmp_path: Path, **d0: Any) -> Any:
    raw: dict[str, Any] = {
        "database": database,
        "pool": {"chunk_size": CHUNK, "gc_delay_seconds": 0},
        "backends": [
            {"name": "d0", "type": "local", "path": "d0", **d0},
            {"name": "d1", "type": "local", "path": "d1"},
        ],
        "buckets": [{"name": "bkt"}],
        "cache": {"max_size": 0},
    }
    return parse_config(raw, env={}, base_dir=tmp_path)


async def test_a_request_cap_overflows_writes_and_counts_what_the_backend_received(
    database: Any, tmp_path: Path, pools: list[Pool]
) -> None:
    pool, faults = await opened(capped_config(database, tmp_path, api_request_limit=100))
    pools.append(pool)
    for i in range(150):
        await pool.objects.put_object("bkt", f"k{i}", body(b"x" * 100), size=100)
    on_d0 = len(files(tmp_path, "d0"))
    assert on_d0 == 100  # one PUT per object while d0 had requests left (pack order)
    assert len(files(tmp_path, "d1")) == 50
    received = sum(faults["d0"].calls.values())
    assert received == 100
    assert pool.meter.totals("d0")[0] == received
    await pool.meter.flush()
    [row] = [u for u in await pool.store.get_usage(_month()) if u.backend == "d0"]
    assert row.requests == received
    # reads of d0's objects are refused by Cairn, naming the cap (d0 is their only replica)
    with pytest.raises(BackendsUnavailable, match="d0: monthly request cap reached"):
        await read(pool, "k0")
    assert sum(faults["d0"].calls.values()) == 100  # and d0 was not asked
    assert await read(pool, "k149") == b"x" * 100  # on d1


async def test_an_egress_cap_sends_reads_to_the_other_replica(
    database: Any, tmp_path: Path, pools: list[Pool]
) -> None:
    cfg = capped_config(database, tmp_path, egress_byte_limit=3 * CHUNK)
    cfg = cfg.model_copy(
        update={
            "pool": cfg.pool.model_copy(
                update={
                    "replication": cfg.pool.replication.model_copy(
                        update={"factor": 2, "write_quorum": 2}
                    )
                }
            )
        }
    )
    pool, faults = await opened(cfg)
    pools.append(pool)
    data = os.urandom(8 * CHUNK)
    await pool.objects.put_object("bkt", "k", body(data), size=len(data))
    assert await read(pool, "k") == data
    egress = pool.meter.totals("d0")[1]
    # d0 served until its cap (parallel read-ahead may pass it by the reads already in
    # flight), d1 the rest
    assert 3 * CHUNK <= egress < 8 * CHUNK
    assert faults["d1"].calls["get"] == 8 - egress // CHUNK
    before = faults["d0"].calls["get"]
    assert await read(pool, "k") == data  # past the cap: d0 is not asked at all
    assert faults["d0"].calls["get"] == before


def test_a_full_pool_names_the_cap_in_the_error() -> None:
    from appliance.placement.router import BackendView, cap_problem

    assert cap_problem(BackendView("b2", 0, ingress_left=10), 100, write=True) == (
        "b2: monthly ingress cap reached (10 bytes left)"
    )


async def test_writes_fail_naming_every_cap_when_nothing_is_left(
    database: Any, tmp_path: Path, pools: list[Pool]
) -> None:
    raw: dict[str, Any] = {
        "database": database,
        "pool": {"chunk_size": CHUNK},
        "backends": [
            {"name": "d0", "type": "local", "path": "d0", "api_request_limit": 0},
            {"name": "d1", "type": "local", "path": "d1", "ingress_byte_limit": 10},
        ],
        "buckets": [{"name": "bkt"}],
    }
    pool, _ = await opened(parse_config(raw, env={}, base_dir=tmp_path))
    pools.append(pool)
    from appliance.errors import NoCapacity

    with pytest.raises(NoCapacity) as caught:
        await pool.objects.put_object("bkt", "k", body(b"x" * 100), size=100)
    message = str(caught.value)
    assert "d0: monthly request cap reached" in message
    assert "d1: monthly ingress cap reached" in message


def _month() -> str:
    from appliance.clock import month_of, utcnow

    return month_of(utcnow())


# -- the cleanup queue ----------------------------------------------------------------


async def test_refused_deletes_are_retried_listed_when_exhausted_and_never_hit_newer_data(
    database: Any, tmp_path: Path, pools: list[Pool]
) -> None:
    from appliance.meta.store import GC_QUEUE
    from appliance.services.workers import GcWorker

    pool, faults = await opened(config(database, tmp_path, backends=1, factor=1))
    pools.append(pool)
    old, new = os.urandom(2 * CHUNK), os.urandom(2 * CHUNK)
    await pool.objects.put_object("bkt", "k", body(old), size=len(old))
    await pool.objects.put_object("bkt", "k", body(b"mid"), size=3)  # old chunks -> GC
    faults["d0"].fail_always("delete", TransientBackendError("refusing deletes"))
    gc = GcWorker(pool.store, pool.chunks, backoff=Backoff(base_seconds=0, jitter=0))
    for _ in range(12):  # past max_attempts: the items go dead, they are not dropped
        await gc.run_once()
    # rewritten at the same key during the backoff: new blobs, never touched by GC
    await pool.objects.put_object("bkt", "k", body(new), size=len(new))
    depth, dead = await pool.admin.queue("gc")
    assert depth.get("dead", 0) >= 2
    assert all((item.key or "").startswith("chunk:") for item in dead)  # keyed by blob
    assert dead[0].last_error == "delete failed on d0"
    faults["d0"].clear()
    for item in dead:
        await pool.admin.retry_dead("gc", item.item_id)
    while await gc.run_once():
        pass
    assert await pool.store.queue_depth(GC_QUEUE) == {}
    assert await read(pool, "k") == new
    handle = await pool.objects.open_object("bkt", "k")
    live = {loc.blob_key for p in handle.layout for loc in p.locations}
    assert set(files(tmp_path, "d0")) == live  # no orphan blobs
    await check_space(pool, tmp_path)


# -- fsck -----------------------------------------------------------------------------


async def test_fsck_finds_missing_and_orphan_blobs_and_chunks_below_their_factor(
    database: Any, tmp_path: Path, pools: list[Pool]
) -> None:
    pool, _ = await opened(config(database, tmp_path, backends=2, factor=2, quorum=1))
    pools.append(pool)
    data = os.urandom(2 * CHUNK)
    await pool.objects.put_object("bkt", "k", body(data), size=len(data))
    report = await pool.admin.fsck()
    assert (report.below, report.problems) == (2, 2)  # the second replicas are owed
    await drain(pool)
    report = await pool.admin.fsck()
    assert report.problems == 0, report
    assert (report.chunks, report.locations, report.blobs) == (2, 4, 4)
    [first, *_] = sorted(files(tmp_path, "d1"))
    (tmp_path / "d1" / first).unlink()
    (tmp_path / "d0" / "stray").write_bytes(b"left behind")
    report = await pool.admin.fsck()
    assert (report.missing, report.orphans, report.problems) == (1, 1, 2)
    assert f"missing d1:{first}" in report.examples
    assert "orphan d0:stray" in report.examples


async def test_the_health_check_spends_no_request_past_a_cap(
    database: Any, tmp_path: Path, pools: list[Pool]
) -> None:
    pool, faults = await opened(capped_config(database, tmp_path, api_request_limit=0))
    pools.append(pool)
    await pool.health.run_once()
    assert (faults["d0"].calls["head"], faults["d1"].calls["head"]) == (0, 1)
