"""One contract suite for every MetadataStore: each test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Sequence
from datetime import timedelta

import pytest

from appliance.ids import new_sortable_id
from appliance.meta.backoff import Backoff
from appliance.meta.errors import (
    AlreadyExists,
    BucketNotEmpty,
    Conflict,
    InvalidPart,
    NotFound,
    PreconditionFailed,
    SchemaTooNew,
    StoreUnavailable,
)
from appliance.meta.models import (
    BackendSpec,
    ChunkRef,
    Credential,
    KeyUpdate,
    Location,
    MultipartUpload,
    NewChunk,
    NewTombstone,
    Permission,
    QueueState,
    UsageDelta,
    VersionKind,
    VersionState,
    WritePrecondition,
)
from appliance.meta.sql import SqlMetadataStore
from appliance.meta.store import GC_QUEUE
from tests.conftest import FakeClock, StoreFactory

pytestmark = pytest.mark.contract

NO_BACKOFF = Backoff(base_seconds=1, factor=2, max_seconds=60, jitter=0)


def chunk(chunk_id: str, size: int = 100) -> NewChunk:
    return NewChunk(chunk_id, size, hashlib.sha256(chunk_id.encode()).digest(), size + 32)


async def write_version(
    store: SqlMetadataStore,
    bucket: str,
    key: str,
    chunk_ids: Sequence[str],
    *,
    backend: str = "b1",
    size: int = 100,
    version_id: str | None = None,
    kind: VersionKind = VersionKind.OBJECT,
) -> str:
    """Begin a version and record one new chunk per id, each on ``backend``."""
    vid = version_id or new_sortable_id()
    await store.begin_version(vid, bucket, key, kind=kind)
    for seq, cid in enumerate(chunk_ids):
        loc = Location(cid, backend, f"blobs/{cid}", size + 32)
        await store.add_chunk(
            vid, ChunkRef(seq, seq * size, size, cid), chunk(cid, size), [(loc, None)]
        )
    return vid


async def put_object(
    store: SqlMetadataStore, bucket: str, key: str, chunk_ids: Sequence[str], **kw: object
) -> str:
    vid = await write_version(store, bucket, key, chunk_ids, **kw)  # type: ignore[arg-type]
    await store.commit_version(vid, size=100 * len(chunk_ids), etag=f"etag-{vid}")
    return vid


async def gc_ids(store: SqlMetadataStore, clock: FakeClock) -> set[str]:
    """Chunk ids waiting on the GC queue (moving the clock past the GC delay)."""
    clock.advance(3600)
    items = await store.claim(GC_QUEUE, limit=1000)
    for item in items:
        await store.ack(item.item_id)
    return {str(i.payload["chunk_id"]) for i in items}


@pytest.fixture
async def pool(store: SqlMetadataStore) -> SqlMetadataStore:
    """A store with bucket ``bk`` and backends b1 (quota 10,000) and b2 (unlimited)."""
    await store.create_bucket("bk")
    await store.sync_backends([BackendSpec("b1", 10_000), BackendSpec("b2", None)])
    return store


# -- migrations and lifecycle ---------------------------------------------------------


async def test_fresh_database_is_migrated_and_reopens(store_factory: StoreFactory) -> None:
    first = store_factory()
    await first.open()
    version = await first.schema_version()
    assert version >= 1
    await first.create_bucket("keep")
    await first.close()
    again = store_factory()
    await again.open()
    assert await again.schema_version() == version
    assert [b.name for b in await again.list_buckets()] == ["keep"]


async def test_database_newer_than_code_is_refused(store_factory: StoreFactory) -> None:
    first = store_factory()
    await first.open()
    await first.set_setting("schema_version", "999")
    await first.close()
    with pytest.raises(SchemaTooNew, match="999"):
        await store_factory().open()


async def test_settings(store: SqlMetadataStore) -> None:
    assert await store.get_setting("pool_secret") is None
    assert await store.setdefault_setting("pool_secret", "one") == "one"
    assert await store.setdefault_setting("pool_secret", "two") == "one"
    await store.set_setting("pool_secret", "three")
    assert await store.get_setting("pool_secret") == "three"


async def test_concurrent_setdefault_agrees(store: SqlMetadataStore) -> None:
    results = await asyncio.gather(*(store.setdefault_setting("s", str(i)) for i in range(20)))
    assert len(set(results)) == 1


# -- buckets and credentials ----------------------------------------------------------


async def test_bucket_lifecycle(store: SqlMetadataStore) -> None:
    await store.create_bucket("b-two")
    await store.create_bucket("a-one")
    with pytest.raises(AlreadyExists):
        await store.create_bucket("a-one")
    assert [b.name for b in await store.list_buckets()] == ["a-one", "b-two"]
    got = await store.get_bucket("a-one")
    assert got is not None
    assert got.created_at.tzinfo is not None
    await store.delete_bucket("a-one")
    assert await store.get_bucket("a-one") is None
    with pytest.raises(NotFound):
        await store.delete_bucket("a-one")


async def test_non_empty_bucket_is_not_deleted(pool: SqlMetadataStore) -> None:
    await put_object(pool, "bk", "k", ["c1"])
    with pytest.raises(BucketNotEmpty):
        await pool.delete_bucket("bk")
    await pool.delete_object("bk", "k")
    await pool.create_upload(MultipartUpload("up1", "bk", "k", pool._clock()))
    with pytest.raises(BucketNotEmpty):
        await pool.delete_bucket("bk")
    await pool.abort_upload("up1")
    await pool.delete_bucket("bk")


async def test_bucket_usage_and_deleting_a_bucket_drops_its_grants(
    pool: SqlMetadataStore, clock: FakeClock
) -> None:
    assert await pool.bucket_usage("bk") == (0, 0)
    await put_object(pool, "bk", "k1", ["c1"])
    await put_object(pool, "bk", "k2", ["c2"])
    count, size = await pool.bucket_usage("bk")
    assert count == 2 and size > 0
    assert await pool.bucket_usage("nothing-here") == (0, 0)
    grants = {"bk": frozenset({Permission.READ}), "*": frozenset({Permission.LIST})}
    await pool.put_credential(Credential("AKIAEXAMPLE000002", "s", clock(), "", grants))
    await pool.delete_object("bk", "k1")
    await pool.delete_object("bk", "k2")
    await pool.delete_bucket("bk")
    left = await pool.get_credential("AKIAEXAMPLE000002")
    assert left is not None and dict(left.grants) == {"*": frozenset({Permission.LIST})}


async def test_credentials_round_trip(store: SqlMetadataStore, clock: FakeClock) -> None:
    cred = Credential(
        "AKIAEXAMPLE000001",
        "sealed-secret",
        clock(),
        "app one",
        {
            "photos": frozenset({Permission.READ, Permission.LIST}),
            "*": frozenset({Permission.ADMIN}),
        },
    )
    await store.put_credential(cred)
    assert await store.get_credential("AKIAEXAMPLE000001") == cred
    changed = Credential(
        "AKIAEXAMPLE000001", "new", clock(), "", {"docs": frozenset({Permission.WRITE})}
    )
    await store.put_credential(changed)
    assert await store.get_credential("AKIAEXAMPLE000001") == changed
    assert [c.access_key for c in await store.list_credentials()] == ["AKIAEXAMPLE000001"]
    await store.delete_credential("AKIAEXAMPLE000001")
    await store.delete_credential("AKIAEXAMPLE000001")
    assert await store.get_credential("AKIAEXAMPLE000001") is None


# -- versions, refs and refcounts -----------------------------------------------------


async def test_write_commit_read_layout(pool: SqlMetadataStore) -> None:
    vid = await write_version(pool, "bk", "photos/a.jpg", ["c1", "c2"])
    assert await pool.get_current("bk", "photos/a.jpg") is None
    uploading = await pool.get_version(vid)
    assert uploading is not None and uploading.state is VersionState.UPLOADING
    await pool.add_location(Location("c2", "b2", "blobs/c2", 132), None)
    result = await pool.commit_version(
        vid, size=200, etag="abc", headers={"Content-Type": "image/jpeg"}, user_metadata={"k": "v"}
    )
    assert result.is_current and result.replaced_version_id is None
    current = await pool.get_current("bk", "photos/a.jpg")
    assert current is not None
    assert (current.version_id, current.state, current.size, current.etag) == (
        vid,
        VersionState.COMPLETE,
        200,
        "abc",
    )
    assert current.headers == {"Content-Type": "image/jpeg"} and current.user_metadata == {"k": "v"}
    layout = await pool.get_layout(vid)
    assert [(p.ref.seq, p.ref.offset, p.chunk.chunk_id) for p in layout] == [
        (0, 0, "c1"),
        (1, 100, "c2"),
    ]
    assert [loc.backend for loc in layout[1].locations] == ["b1", "b2"]
    assert layout[0].chunk.sha256 == hashlib.sha256(b"c1").digest()
    assert layout[0].chunk.refcount == 1


async def test_newer_version_wins_whatever_the_commit_order(
    pool: SqlMetadataStore, clock: FakeClock
) -> None:
    older = await write_version(pool, "bk", "k", ["old"], version_id=new_sortable_id(1_000))
    newer = await write_version(pool, "bk", "k", ["new"], version_id=new_sortable_id(2_000))
    first = await pool.commit_version(newer, size=100, etag="n")
    late = await pool.commit_version(older, size=100, etag="o")
    assert first.is_current and not late.is_current
    assert late.freed_chunk_ids == ("old",)
    current = await pool.get_current("bk", "k")
    assert current is not None and current.version_id == newer
    assert await pool.get_version(older) is None
    assert await gc_ids(pool, clock) == {"old"}


async def test_concurrent_commits_of_one_key_leave_exactly_one_current(
    store_factory: StoreFactory, clock: FakeClock
) -> None:
    stores = [store_factory(clock=clock, gc_delay=timedelta(seconds=1)) for _ in range(2)]
    if stores[0].kind == "sqlite":
        stores = stores[:1]  # one SQLite instance; concurrency comes from the tasks
    for s in stores:
        await s.open()
    await stores[0].create_bucket("bk")
    await stores[0].sync_backends([BackendSpec("b1", None)])
    ids = [new_sortable_id(1_000 + i) for i in range(16)]
    random.shuffle(ids)
    for i, vid in enumerate(ids):
        await write_version(stores[i % len(stores)], "bk", "same", [f"c-{vid}"], version_id=vid)
    results = await asyncio.gather(
        *(
            stores[i % len(stores)].commit_version(vid, size=100, etag=vid)
            for i, vid in enumerate(ids)
        )
    )
    current = await stores[0].get_current("bk", "same")
    assert current is not None and current.version_id == max(ids)
    assert sum(r.is_current for r in results) >= 1
    page = await stores[0].list_objects("bk")
    assert [(e.key, e.version_id) for e in page.entries] == [("same", max(ids))]
    for vid in ids:
        assert (await stores[0].get_version(vid) is not None) == (vid == max(ids))
    assert await gc_ids(stores[0], clock) == {f"c-{v}" for v in ids if v != max(ids)}


async def test_refcount_reaches_zero_exactly_when_last_reference_goes(
    pool: SqlMetadataStore, clock: FakeClock
) -> None:
    a = await put_object(pool, "bk", "a", ["c1", "c2"])
    copy = new_sortable_id()
    await pool.begin_version(copy, "bk", "b")
    await pool.add_refs(
        copy, [ChunkRef(0, 0, 100, "c1"), ChunkRef(1, 100, 50, "c1", chunk_offset=50)]
    )
    await pool.commit_version(copy, size=150, etag="copy")
    assert [p.chunk.refcount for p in await pool.get_layout(copy)] == [3, 3]
    assert await pool.delete_object("bk", "a") == a
    assert await gc_ids(pool, clock) == {"c2"}
    assert await pool.claim_garbage("c1") is None
    assert await pool.delete_object("bk", "b") == copy
    assert await pool.delete_object("bk", "b") is None
    assert await gc_ids(pool, clock) == {"c1"}


async def test_gc_items_wait_for_the_gc_delay(pool: SqlMetadataStore, clock: FakeClock) -> None:
    await put_object(pool, "bk", "a", ["c1"])
    await pool.delete_object("bk", "a")
    assert await pool.claim(GC_QUEUE) == []
    clock.advance(61)
    [item] = await pool.claim(GC_QUEUE)
    assert item.payload == {"chunk_id": "c1"} and item.key == "chunk:c1"


async def test_garbage_collection_returns_bytes_to_the_backend(pool: SqlMetadataStore) -> None:
    await put_object(pool, "bk", "a", ["c1"])
    space = {s.name: s for s in await pool.get_space()}
    assert space["b1"].used_bytes == 132
    await pool.delete_object("bk", "a")
    locations = await pool.claim_garbage("c1")
    assert locations == [Location("c1", "b1", "blobs/c1", 132)]
    await pool.forget_location("c1", "b1")
    await pool.forget_location("c1", "b1")
    assert {s.name: s.used_bytes for s in await pool.get_space()}["b1"] == 0
    assert await pool.claim_garbage("c1") == []
    assert await pool.get_locations("c1") == []


async def test_chunk_replicas_scan_and_location_listing(pool: SqlMetadataStore) -> None:
    await pool.create_bucket("other")
    await put_object(pool, "bk", "a", ["c1", "c2"])
    await pool.add_location(Location("c1", "b2", "blobs/c1", 132), None)
    vid = new_sortable_id()  # "other" references c1 too (a copy)
    await pool.begin_version(vid, "other", "copy")
    await pool.add_refs(vid, [ChunkRef(0, 0, 100, "c1")])
    await pool.commit_version(vid, size=100, etag="e")
    await put_object(pool, "bk", "gone", ["c3"])
    await pool.delete_object("bk", "gone")  # c3: refcount 0, not scanned
    info = await pool.get_chunk_replicas("c1")
    assert info is not None
    assert (info.chunk.chunk_id, info.chunk.refcount) == ("c1", 2)
    assert [loc.backend for loc in info.locations] == ["b1", "b2"]
    assert info.buckets == ("bk", "other")
    assert await pool.get_chunk_replicas("nope") is None
    gone = await pool.get_chunk_replicas("c3")
    assert gone is not None and gone.chunk.refcount == 0 and gone.buckets == ()
    scanned = await pool.scan_chunks(limit=1)
    assert [i.chunk.chunk_id for i in scanned] == ["c1"]
    rest = await pool.scan_chunks(after="c1")
    assert [(i.chunk.chunk_id, len(i.locations), i.buckets) for i in rest] == [("c2", 1, ("bk",))]
    assert [loc.blob_key for loc in await pool.list_locations("b1")] == [
        "blobs/c1",
        "blobs/c2",
        "blobs/c3",
    ]
    assert [loc.chunk_id for loc in await pool.list_locations("b1", after="blobs/c1", limit=1)] == [
        "c2"
    ]
    assert [loc.chunk_id for loc in await pool.list_locations("b2")] == ["c1"]


async def test_unreferenced_chunks_cannot_be_revived(pool: SqlMetadataStore) -> None:
    await put_object(pool, "bk", "a", ["c1"])
    await pool.delete_object("bk", "a")
    vid = new_sortable_id()
    await pool.begin_version(vid, "bk", "b")
    with pytest.raises(Conflict):
        await pool.add_refs(vid, [ChunkRef(0, 0, 100, "c1")])
    with pytest.raises(Conflict):
        await pool.add_location(Location("c1", "b2", "x", 132), None)


async def test_abort_frees_chunks_and_reservations(
    pool: SqlMetadataStore, clock: FakeClock
) -> None:
    vid = await write_version(pool, "bk", "k", ["c1"])
    spare = await pool.reserve("b1", 500, owner=vid)
    assert spare is not None
    assert await pool.abort_version(vid) == ("c1",)
    assert await pool.abort_version(vid) == ()
    space = {s.name: s for s in await pool.get_space()}["b1"]
    assert (space.used_bytes, space.reserved_bytes) == (132, 0)  # blob still there until GC
    with pytest.raises(Conflict):
        await pool.add_chunk(vid, ChunkRef(1, 100, 100, "c9"), chunk("c9"), [])
    with pytest.raises(Conflict):
        await pool.commit_version(vid, size=0, etag="")
    done = await put_object(pool, "bk", "k2", ["c2"])
    with pytest.raises(Conflict):
        await pool.abort_version(done)
    assert await gc_ids(pool, clock) == {"c1"}


async def test_stale_uploads_are_listed_for_the_janitor(
    pool: SqlMetadataStore, clock: FakeClock
) -> None:
    old = await write_version(pool, "bk", "k", [])
    busy = await write_version(pool, "bk", "k2", ["first"])
    clock.advance(100)
    await write_version(pool, "bk", "k", [])
    await pool.add_chunk(busy, ChunkRef(1, 100, 100, "later"), chunk("later"), [])  # active
    assert await pool.list_stale_versions(clock.now - timedelta(seconds=50)) == [old]


async def test_missing_bucket_and_duplicate_version(pool: SqlMetadataStore) -> None:
    with pytest.raises(NotFound):
        await pool.begin_version(new_sortable_id(), "nope", "k")
    vid = await write_version(pool, "bk", "k", [])
    with pytest.raises(AlreadyExists):
        await pool.begin_version(vid, "bk", "k")


# -- quota ----------------------------------------------------------------------------


async def test_reservations_respect_quota(pool: SqlMetadataStore) -> None:
    r1 = await pool.reserve("b1", 6_000, owner="v")
    assert r1 is not None
    assert await pool.reserve("b1", 4_001, owner="v") is None
    r2 = await pool.reserve("b1", 4_000, owner="v")
    assert r2 is not None
    assert await pool.reserve("b2", 10**15, owner="v") is not None
    with pytest.raises(NotFound):
        await pool.reserve("nope", 1, owner="v")
    await pool.release_reservation(r1.reservation_id)
    await pool.release_reservation(r1.reservation_id)
    space = {s.name: s for s in await pool.get_space()}["b1"]
    assert (space.reserved_bytes, space.free_bytes) == (4_000, 6_000)


async def test_reservation_becomes_usage_when_the_blob_is_recorded(pool: SqlMetadataStore) -> None:
    vid = new_sortable_id()
    await pool.begin_version(vid, "bk", "k")
    res = await pool.reserve("b1", 132, owner=vid)
    assert res is not None
    await pool.add_chunk(
        vid,
        ChunkRef(0, 0, 100, "c1"),
        chunk("c1"),
        [(Location("c1", "b1", "x", 132), res.reservation_id)],
    )
    space = {s.name: s for s in await pool.get_space()}["b1"]
    assert (space.used_bytes, space.reserved_bytes) == (132, 0)
    leftover = await pool.reserve("b1", 700, owner=vid)
    assert leftover is not None
    await pool.commit_version(vid, size=100, etag="e")
    space = {s.name: s for s in await pool.get_space()}["b1"]
    assert (space.used_bytes, space.reserved_bytes) == (132, 0)


async def test_blobs_drawing_on_one_lease_settle_their_part_each(pool: SqlMetadataStore) -> None:
    """A lease: one reservation several blobs draw on; each recorded blob takes its
    stored size off it, a failed one gives its part back, and the row goes once empty."""
    lease = await pool.reserve("b1", 1_000, owner="lease:x")
    assert lease is not None
    for i in range(3):
        vid = new_sortable_id()
        await pool.begin_version(vid, "bk", f"k{i}")
        await pool.add_chunk(
            vid,
            ChunkRef(0, 0, 100, f"c{i}"),
            chunk(f"c{i}"),
            [(Location(f"c{i}", "b1", f"x{i}", 132), lease.reservation_id)],
        )
    space = {s.name: s for s in await pool.get_space()}["b1"]
    assert (space.used_bytes, space.reserved_bytes) == (396, 604)
    await pool.release_reservation(lease.reservation_id, backend="b1", nbytes=100)
    await pool.release_reservation(lease.reservation_id, backend="b2", nbytes=100)  # not b2's
    space = {s.name: s for s in await pool.get_space()}["b1"]
    assert (space.used_bytes, space.reserved_bytes) == (396, 504)
    await pool.release_reservation(lease.reservation_id, backend="b1", nbytes=504)
    space = {s.name: s for s in await pool.get_space()}["b1"]
    assert space.reserved_bytes == 0
    again = await pool.reserve("b1", 10, owner="v")  # the emptied lease row is gone:
    assert again is not None  # giving back more of it changes nothing
    await pool.release_reservation(lease.reservation_id, backend="b1", nbytes=5)
    assert {s.name: s for s in await pool.get_space()}["b1"].reserved_bytes == 10


async def test_many_concurrent_reservations_never_exceed_quota(store_factory: StoreFactory) -> None:
    stores = [store_factory() for _ in range(3)]
    if stores[0].kind == "sqlite":
        stores = stores[:1]
    for s in stores:
        await s.open()
    await stores[0].sync_backends([BackendSpec("small", 1_005)])
    results = await asyncio.gather(
        *(stores[i % len(stores)].reserve("small", 10, owner=f"w{i}") for i in range(300))
    )
    granted = [r for r in results if r is not None]
    assert len(granted) == 100
    space = (await stores[0].get_space())[0]
    assert space.reserved_bytes == 1_000 and space.free_bytes == 5


async def test_stale_reservations_are_released(pool: SqlMetadataStore, clock: FakeClock) -> None:
    await pool.reserve("b1", 1_000, owner="crashed")
    clock.advance(7200)
    await pool.reserve("b1", 10, owner="alive")
    assert await pool.release_stale_reservations(clock.now - timedelta(hours=1)) == 1
    assert {s.name: s for s in await pool.get_space()}["b1"].reserved_bytes == 10


async def test_stale_reservations_by_owner_prefix(pool: SqlMetadataStore, clock: FakeClock) -> None:
    await pool.reserve("b1", 1_000, owner="lease:dead")
    await pool.reserve("b1", 200, owner="lease_dead")  # "_" is no wildcard
    await pool.reserve("b1", 30, owner="upload")
    clock.advance(7200)
    cutoff = clock.now - timedelta(hours=1)
    assert await pool.release_stale_reservations(cutoff, owner_prefix="lease:") == 1
    assert {s.name: s for s in await pool.get_space()}["b1"].reserved_bytes == 230


async def test_sync_backends_keeps_usage(pool: SqlMetadataStore) -> None:
    await put_object(pool, "bk", "a", ["c1"])
    await pool.sync_backends([BackendSpec("b1", 50_000)])
    space = {s.name: s for s in await pool.get_space()}["b1"]
    assert (space.quota_bytes, space.used_bytes) == (50_000, 132)


# -- usage counters -------------------------------------------------------------------


async def test_usage_counters_add_up(store: SqlMetadataStore) -> None:
    await asyncio.gather(
        *(
            store.add_usage(
                [UsageDelta("b1", "2026-01", 1, 10, 100), UsageDelta("b2", "2026-01", 2)]
            )
            for _ in range(25)
        )
    )
    await store.add_usage([UsageDelta("b1", "2026-02", 5)])
    jan = {u.backend: u for u in await store.get_usage("2026-01")}
    assert (jan["b1"].requests, jan["b1"].egress_bytes, jan["b1"].ingress_bytes) == (25, 250, 2500)
    assert jan["b2"].requests == 50
    assert [u.requests for u in await store.get_usage("2026-02")] == [5]


# -- durable queues -------------------------------------------------------------------


async def test_queue_claim_ack_and_lease(store: SqlMetadataStore, clock: FakeClock) -> None:
    first = await store.enqueue("work", {"n": 1})
    later = await store.enqueue("work", {"n": 2}, not_before=clock.now + timedelta(seconds=30))
    assert first is not None and later is not None
    [item] = await store.claim("work", lease_seconds=10)
    assert (item.item_id, item.attempts, item.payload) == (first, 1, {"n": 1})
    assert await store.claim("work") == []  # leased
    clock.advance(31)
    again = await store.claim("work", lease_seconds=10)
    assert sorted(i.item_id for i in again) == [first, later]  # lease ran out: redelivered
    for i in again:
        await store.ack(i.item_id)
    await store.ack(first)
    assert await store.queue_depth("work") == {}


async def test_queue_keys_make_enqueue_idempotent(store: SqlMetadataStore) -> None:
    assert await store.enqueue("q", {"a": 1}, key="blob:x") is not None
    assert await store.enqueue("q", {"a": 2}, key="blob:x") is None
    assert await store.enqueue("other", {"a": 3}, key="blob:x") is not None
    assert await store.queue_depth("q") == {"ready": 1}


async def test_queue_backoff_doubles_then_dead_letters(
    store: SqlMetadataStore, clock: FakeClock
) -> None:
    item_id = await store.enqueue("q", {"blob": "k"}, key="blob:k", max_attempts=3)
    assert item_id is not None
    for attempt, delay in [(1, 1.0), (2, 2.0)]:
        [item] = await store.claim("q")
        assert (item.item_id, item.attempts) == (item_id, attempt)
        assert await store.retry_later(item.item_id, error=f"boom {attempt}", backoff=NO_BACKOFF)
        clock.advance(delay - 0.1)
        assert await store.claim("q") == []
        clock.advance(0.1)
    [item] = await store.claim("q")
    assert item.attempts == 3 and item.last_error == "boom 2"
    assert not await store.retry_later(item.item_id, error="boom 3", backoff=NO_BACKOFF)
    clock.advance(10_000)
    assert await store.claim("q") == []
    dead = await store.list_dead("q")
    assert [(d.item_id, d.state, d.last_error) for d in dead] == [
        (item_id, QueueState.DEAD, "boom 3")
    ]
    assert (
        await store.enqueue("q", {"blob": "k"}, key="blob:k") == item_id
    )  # a dead item is revived
    assert await store.queue_depth("q") == {"ready": 1}


async def test_dead_items_can_be_revived(store: SqlMetadataStore) -> None:
    item_id = await store.enqueue("q", {}, max_attempts=1)
    assert item_id is not None
    [item] = await store.claim("q")
    assert not await store.retry_later(item.item_id, error="fatal", backoff=NO_BACKOFF)
    assert await store.claim("q") == []
    await store.revive(item_id)
    with pytest.raises(NotFound):
        await store.revive(item_id)
    [again] = await store.claim("q")
    assert again.attempts == 1


async def test_item_whose_last_lease_expired_goes_dead(
    store: SqlMetadataStore, clock: FakeClock
) -> None:
    await store.enqueue("q", {}, max_attempts=1)
    assert len(await store.claim("q", lease_seconds=5)) == 1
    clock.advance(10)  # the worker died holding the last attempt
    assert await store.claim("q") == []
    assert len(await store.list_dead("q")) == 1


async def test_concurrent_claims_never_share_an_item(store_factory: StoreFactory) -> None:
    stores = [store_factory() for _ in range(3)]
    if stores[0].kind == "sqlite":
        stores = stores[:1]
    for s in stores:
        await s.open()
    for n in range(60):
        await stores[0].enqueue("q", {"n": n})
    batches = await asyncio.gather(
        *(stores[i % len(stores)].claim("q", limit=7) for i in range(12))
    )
    ids = [item.item_id for batch in batches for item in batch]
    assert len(ids) == len(set(ids)) == 60


# -- multipart uploads ----------------------------------------------------------------


async def upload_part(
    store: SqlMetadataStore, upload_id: str, number: int, chunk_ids: Sequence[str]
) -> str:
    vid = await write_version(store, "bk", "big", chunk_ids, kind=VersionKind.PART)
    await store.put_part(
        upload_id, number, vid, size=100 * len(chunk_ids), etag=f"e{number}-{chunk_ids[0]}"
    )
    return vid


async def test_multipart_complete_is_metadata_only(
    pool: SqlMetadataStore, clock: FakeClock
) -> None:
    await pool.create_upload(
        MultipartUpload("up", "bk", "big", clock(), {"Content-Type": "video/mp4"}, {"a": "b"})
    )
    with pytest.raises(AlreadyExists):
        await pool.create_upload(MultipartUpload("up", "bk", "big", clock()))
    await upload_part(pool, "up", 1, ["p1a", "p1b"])
    await upload_part(pool, "up", 2, ["p2-old"])
    await upload_part(pool, "up", 2, ["p2"])  # re-upload replaces the part
    await upload_part(pool, "up", 3, ["p3"])
    await upload_part(pool, "up", 4, ["unused"])
    layouts = await pool.get_upload_layout("up")
    assert {n: [p.chunk.chunk_id for p in layout] for n, layout in layouts.items()} == {
        1: ["p1a", "p1b"],
        2: ["p2"],
        3: ["p3"],
        4: ["unused"],
    }
    assert [loc.backend for loc in layouts[1][0].locations] == ["b1"]
    parts = await pool.list_parts("up", marker=1, limit=2)
    assert [(p.part_number, p.size, p.etag) for p in parts] == [
        (2, 100, "e2-p2"),
        (3, 100, "e3-p3"),
    ]
    with pytest.raises(InvalidPart, match="part 2"):
        await pool.complete_upload("up", new_sortable_id(), [(1, "e1-p1a"), (2, "wrong")], etag="x")
    with pytest.raises(InvalidPart, match="part 5"):
        await pool.complete_upload("up", new_sortable_id(), [(1, "e1-p1a"), (5, "e5")], etag="x")
    vid = new_sortable_id()
    result = await pool.complete_upload(
        "up", vid, [(1, '"e1-p1a"'), (2, "e2-p2"), (3, "e3-p3")], etag="md5-3"
    )
    assert result.is_current
    current = await pool.get_current("bk", "big")
    assert current is not None
    assert (current.size, current.etag, current.headers, current.user_metadata) == (
        400,
        "md5-3",
        {"Content-Type": "video/mp4"},
        {"a": "b"},
    )
    layout = await pool.get_layout(vid)
    assert [(p.ref.seq, p.ref.offset, p.chunk.chunk_id, p.chunk.refcount) for p in layout] == [
        (0, 0, "p1a", 1),
        (1, 100, "p1b", 1),
        (2, 200, "p2", 1),
        (3, 300, "p3", 1),
    ]
    assert await pool.get_upload("up") is None
    assert await pool.list_parts("up") == []
    assert await gc_ids(pool, clock) == {"p2-old", "unused"}
    with pytest.raises(NotFound):
        await pool.complete_upload("up", new_sortable_id(), [(1, "e1-p1a")], etag="x")


async def test_multipart_abort_frees_parts(pool: SqlMetadataStore, clock: FakeClock) -> None:
    await pool.create_upload(MultipartUpload("up", "bk", "big", clock()))
    await upload_part(pool, "up", 1, ["a"])
    await upload_part(pool, "up", 2, ["b"])
    await pool.abort_upload("up")
    await pool.abort_upload("up")
    assert await gc_ids(pool, clock) == {"a", "b"}
    with pytest.raises(NotFound):
        await upload_part(pool, "up", 3, ["c"])


async def test_list_uploads_pages_by_key_and_id(pool: SqlMetadataStore, clock: FakeClock) -> None:
    for key, uid in [("a/1", "u1"), ("a/1", "u2"), ("a/2", "u3"), ("b", "u4")]:
        await pool.create_upload(MultipartUpload(uid, "bk", key, clock()))
    first = await pool.list_uploads("bk", prefix="a/", limit=2)
    assert [(u.key, u.upload_id) for u in first] == [("a/1", "u1"), ("a/1", "u2")]
    rest = await pool.list_uploads("bk", prefix="a/", key_marker="a/1", upload_id_marker="u2")
    assert [(u.key, u.upload_id) for u in rest] == [("a/2", "u3")]


# -- listing --------------------------------------------------------------------------


async def test_listing_with_prefix_delimiter_and_pages(pool: SqlMetadataStore) -> None:
    keys = [f"dir{d}/file{f:03d}" for d in range(3) for f in range(40)] + [
        f"top{i}" for i in range(30)
    ]
    keys += ["dir1/sub/deep", "dir10", "dir1"]
    for n, key in enumerate(keys):
        await put_object(pool, "bk", key, [f"c{n}"])
    # everything, paged by 7
    seen: list[str] = []
    marker = None
    while True:
        page = await pool.list_objects("bk", start_after=marker, limit=7)
        seen += [e.key for e in page.entries]
        assert not page.common_prefixes
        if not page.truncated:
            break
        marker = page.next_marker
    assert seen == sorted(keys)
    # delimiter at the top level, paged by 4
    names: list[str] = []
    marker = None
    while True:
        page = await pool.list_objects("bk", delimiter="/", start_after=marker, limit=4)
        names += [e.key for e in page.entries] + list(page.common_prefixes)
        if not page.truncated:
            break
        marker = page.next_marker
    assert sorted(names) == sorted(
        ["dir0/", "dir1/", "dir2/", "dir10", "dir1", *[f"top{i}" for i in range(30)]]
    )
    assert len(names) == len(set(names))
    # inside one directory
    page = await pool.list_objects("bk", prefix="dir1/", delimiter="/", limit=1000)
    assert page.common_prefixes == ("dir1/sub/",)
    assert len(page.entries) == 40 and not page.truncated
    empty = await pool.list_objects("bk", prefix="nothing/")
    assert (empty.entries, empty.common_prefixes, empty.truncated) == ((), (), False)


async def test_listing_orders_by_utf8_bytes(pool: SqlMetadataStore) -> None:
    keys = ["b", "a", "Z", "é", "中文", "😀", "a b", "a+b", "a%2F"]
    for n, key in enumerate(keys):
        await put_object(pool, "bk", key, [f"u{n}"])
    page = await pool.list_objects("bk")
    assert [e.key for e in page.entries] == sorted(keys, key=lambda k: k.encode("utf-8"))
    entry = page.entries[0]
    assert (
        entry.size == 100
        and entry.etag.startswith("etag-")
        and entry.last_modified.tzinfo is not None
    )


async def test_listing_resumes_after_a_key_inside_a_prefix(pool: SqlMetadataStore) -> None:
    for n, key in enumerate(["a/1", "a/2", "b"]):
        await put_object(pool, "bk", key, [f"r{n}"])
    page = await pool.list_objects("bk", delimiter="/", start_after="a/1")
    assert (page.common_prefixes, [e.key for e in page.entries]) == (("a/",), ["b"])
    page = await pool.list_objects("bk", delimiter="/", start_after="a/")
    assert (page.common_prefixes, [e.key for e in page.entries]) == ((), ["b"])


async def test_directory_listing_carries_versions_and_markers(pool: SqlMetadataStore) -> None:
    keys = ["d/", "d/a", "d/b/", "d/b/x", "d/c/y", "d/c/z", "d/e", "d/é", "d/f/", "dz", "d"]
    vids = {}
    for n, key in enumerate(keys):
        vids[key] = await put_object(pool, "bk", key, [f"l{n}"])
    page = await pool.list_directory("bk", prefix="d/")
    assert not page.truncated and page.next_marker is None
    got = [(r.key, r.is_prefix, r.version.version_id if r.version else None) for r in page.rows]
    assert got == [
        ("d/", False, vids["d/"]),
        ("d/a", False, vids["d/a"]),
        ("d/b/", True, vids["d/b/"]),  # a marker
        ("d/c/", True, None),  # keys under it, no marker
        ("d/e", False, vids["d/e"]),
        ("d/f/", True, vids["d/f/"]),  # an empty directory
        ("d/é", False, vids["d/é"]),
    ]
    first = page.rows[1].version
    assert first is not None and first.size == 100 and first.key == "d/a"
    # paged by 2, resuming after files and after common prefixes
    seen: list[str] = []
    marker = None
    while True:
        part = await pool.list_directory("bk", prefix="d/", start_after=marker, limit=2)
        assert len(part.rows) <= 2
        seen += [r.key for r in part.rows]
        if not part.truncated:
            break
        marker = part.next_marker
    assert seen == [g[0] for g in got]
    empty = await pool.list_directory("bk", prefix="nothing/")
    assert (empty.rows, empty.truncated) == ((), False)
    with pytest.raises(ValueError, match="limit"):
        await pool.list_directory("bk", prefix="d/", limit=0)


# -- locks and failures ---------------------------------------------------------------


async def test_singleton_lock(store_factory: StoreFactory) -> None:
    a = store_factory()
    await a.open()
    b = a if a.kind == "sqlite" else store_factory()
    if b is not a:
        await b.open()
    held = await a.try_lock("gc-worker")
    assert held is not None
    assert await b.try_lock("gc-worker") is None
    other = await b.try_lock("janitor")
    assert other is not None
    await held.release()
    await held.release()
    again = await b.try_lock("gc-worker")
    assert again is not None
    await again.release()
    await other.release()


async def test_second_sqlite_process_is_refused(tmp_path: object) -> None:
    from pathlib import Path

    from appliance.meta.errors import StoreLocked
    from appliance.meta.sqlite import SqliteMetadataStore

    path = Path(str(tmp_path)) / "one.db"
    first = SqliteMetadataStore(path)
    await first.open()
    try:
        with pytest.raises(StoreLocked, match="single instance"):
            await SqliteMetadataStore(path).open()
    finally:
        await first.close()
    again = SqliteMetadataStore(path)
    await again.open()
    await again.close()


async def test_garbage_sqlite_file_is_unavailable(tmp_path: object) -> None:
    from pathlib import Path

    from appliance.meta.sqlite import SqliteMetadataStore

    path = Path(str(tmp_path)) / "bad.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreUnavailable, match=r"bad\.db"):
        await SqliteMetadataStore(path).open()


async def test_unreachable_postgres_is_unavailable() -> None:
    from appliance.meta.postgres import PostgresMetadataStore

    store = PostgresMetadataStore("postgresql://cairn:cairn@127.0.0.1:1/nothing", connect_timeout=2)
    with pytest.raises(StoreUnavailable, match="PostgreSQL"):
        await store.open()


async def test_conditional_commits_are_atomic(pool: SqlMetadataStore) -> None:
    from appliance.meta.errors import PreconditionFailed
    from appliance.meta.models import WritePrecondition

    create_only = WritePrecondition(if_none_match=True)
    ids = [await write_version(pool, "bk", "cond", [f"c{i}"]) for i in range(8)]
    results = await asyncio.gather(
        *(
            pool.commit_version(v, size=100, etag=f"e{i}", precondition=create_only)
            for i, v in enumerate(ids)
        ),
        return_exceptions=True,
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(r, PreconditionFailed) for r in results if isinstance(r, BaseException))
    current = await pool.get_current("bk", "cond")
    assert current is not None and current.version_id == winners[0].version_id
    for vid in ids:  # losers stay UPLOADING for their writer to abort
        if vid != current.version_id:
            assert (await pool.abort_version(vid)) != ()
    nxt = await write_version(pool, "bk", "cond", ["n1"])
    with pytest.raises(PreconditionFailed):
        await pool.commit_version(
            nxt, size=1, etag="x", precondition=WritePrecondition(if_match="other")
        )
    await pool.commit_version(
        nxt, size=1, etag="x", precondition=WritePrecondition(if_match=current.etag)
    )
    assert (await pool.get_current("bk", "cond")).etag == "x"  # type: ignore[union-attr]


async def test_delete_objects_in_one_transaction(pool: SqlMetadataStore, clock: FakeClock) -> None:
    for n in range(5):
        await put_object(pool, "bk", f"d{n}", [f"dc{n}"])
    assert await pool.delete_objects("bk", ["d0", "d1", "missing", "d3"]) == ["d0", "d1", "d3"]
    page = await pool.list_objects("bk")
    assert [e.key for e in page.entries] == ["d2", "d4"]
    assert await gc_ids(pool, clock) == {"dc0", "dc1", "dc3"}


# -- data keys (encryption) and background rewrites -----------------------------------


async def test_wrapped_keys_scan_rewrap_and_count(pool: SqlMetadataStore) -> None:
    vid = new_sortable_id()
    await pool.begin_version(vid, "bk", "enc")
    for seq, (cid, key_id) in enumerate(
        [("c1", "old"), ("c2", "new"), ("c3", "old"), ("c4", None), ("c5", "older")]
    ):
        new = NewChunk(cid, 10, b"\x00" * 32, 60, b"w-" + cid.encode() if key_id else None, key_id)
        loc = Location(cid, "b1", f"blobs/{cid}", 60)
        await pool.add_chunk(vid, ChunkRef(seq, seq * 10, 10, cid), new, [(loc, None)])
    await pool.commit_version(vid, size=50, etag="e")
    assert await pool.count_chunks_by_key() == {"old": 2, "new": 1, None: 1, "older": 1}
    first = await pool.list_wrapped_keys(not_key_id="new", limit=2)
    assert [(w.chunk_id, w.wrapped_dek, w.key_id) for w in first] == [
        ("c1", b"w-c1", "old"),
        ("c3", b"w-c3", "old"),
    ]
    rest = await pool.list_wrapped_keys(not_key_id="new", after="c3")
    assert [w.chunk_id for w in rest] == ["c5"]
    updates = [
        KeyUpdate("c1", "old", b"n-c1", "new"),
        KeyUpdate("c3", "stale-guess", b"n-c3", "new"),  # compare-and-set: not applied
        KeyUpdate("c5", "older", b"n-c5", "new"),
    ]
    assert await pool.set_wrapped_keys(updates) == 2
    assert await pool.set_wrapped_keys(updates) == 0  # idempotent
    assert await pool.count_chunks_by_key() == {"old": 1, "new": 3, None: 1}
    layout = await pool.get_layout(vid)
    assert (layout[0].chunk.wrapped_dek, layout[0].chunk.key_id) == (b"n-c1", "new")
    assert [w.chunk_id for w in await pool.list_wrapped_keys(not_key_id="new")] == ["c3"]
    # unreferenced chunks are not rotated or counted
    await pool.delete_object("bk", "enc")
    assert await pool.list_wrapped_keys(not_key_id="new") == []
    assert await pool.count_chunks_by_key() == {}


async def test_count_objects(pool: SqlMetadataStore) -> None:
    assert await pool.bucket_usage("bk") == (0, 0)
    await put_object(pool, "bk", "a", ["a1", "a2"])
    await put_object(pool, "bk", "b", ["b1"])
    assert await pool.bucket_usage("bk") == (2, 300)
    assert await pool.all_bucket_usage() == {"bk": (2, 300)}


async def test_if_version_id_precondition(pool: SqlMetadataStore) -> None:
    first = await put_object(pool, "bk", "k", ["k1"])
    rewrite = await write_version(pool, "bk", "k", ["k2"])
    meanwhile = await put_object(pool, "bk", "k", ["k3"])  # a client write wins the race
    with pytest.raises(PreconditionFailed):
        await pool.commit_version(
            rewrite, size=100, etag="e", precondition=WritePrecondition(if_version_id=first)
        )
    await pool.abort_version(rewrite)
    again = await write_version(pool, "bk", "k", ["k4"])
    result = await pool.commit_version(
        again, size=100, etag="e", precondition=WritePrecondition(if_version_id=meanwhile)
    )
    assert result.is_current and result.replaced_version_id == meanwhile


# -- tombstones ------------------------------------------------------------------------
def tombstone(version_id: str, backend: str = "b1") -> NewTombstone:
    cid = new_sortable_id()
    loc = Location(cid, backend, f"blobs/{version_id}/tombstone", 60)
    return NewTombstone(version_id, NewChunk(cid, 0, b"\0" * 32, 60), ((loc, None),))


async def used(store: SqlMetadataStore, backend: str = "b1") -> int:
    return {s.name: s.used_bytes for s in await store.get_space()}[backend]


async def test_a_delete_records_its_tombstone_with_its_quota(
    pool: SqlMetadataStore, clock: FakeClock
) -> None:
    vid = await put_object(pool, "bk", "k", ["c1"])
    before = await used(pool)
    with pytest.raises(Conflict):  # a tombstone must be newer than what it deletes
        await pool.delete_object("bk", "k", tombstone=tombstone(vid))
    assert (await pool.get_current("bk", "k")) is not None
    tomb = tombstone(new_sortable_id())
    assert await pool.delete_object("bk", "k", tombstone=tomb) == vid
    assert await used(pool) == before + 60  # the deleted chunk is only queued for the GC
    [found] = await pool.list_tombstones()
    assert (found.bucket, found.key, found.version_id) == ("bk", "k", tomb.version_id)
    assert found.chunk_id == tomb.chunk.chunk_id
    # an absent key records nothing (the caller removes the blob)
    assert await pool.delete_object("bk", "k", tombstone=tombstone(new_sortable_id())) is None
    assert len(await pool.list_tombstones()) == 1
    # the tombstone's chunk is never garbage while the tombstone is recorded
    assert tomb.chunk.chunk_id not in await gc_ids(pool, clock)
    # a commit of a version older than the delete loses to it
    older = await write_version(pool, "bk", "k", ["c2"], version_id=vid[:-1] + "Z")
    result = await pool.commit_version(older, size=100, etag="e")
    assert not result.is_current and await pool.get_current("bk", "k") is None
    assert len(await pool.list_tombstones()) == 1
    # a newer version retires it: its chunk is garbage at once
    newer = await put_object(pool, "bk", "k", ["c3"])
    assert (await pool.get_current("bk", "k")).version_id == newer  # type: ignore[union-attr]
    assert await pool.list_tombstones() == []
    assert tomb.chunk.chunk_id in await gc_ids(pool, clock)
    assert await pool.claim_garbage(tomb.chunk.chunk_id) == [tomb.locations[0][0]]


async def test_tombstones_replace_each_other_and_are_dropped(
    pool: SqlMetadataStore, clock: FakeClock
) -> None:
    await put_object(pool, "bk", "k", ["c1"])
    first = tombstone(new_sortable_id())
    await pool.delete_object("bk", "k", tombstone=first)
    await gc_ids(pool, clock)
    # the same key deleted again (a version raced in): one row, the newest tombstone
    older = await write_version(pool, "bk", "k", ["c2"])
    await pool.commit_version(older, size=100, etag="e")
    second = tombstone(new_sortable_id())
    await pool.delete_object("bk", "k", tombstone=second)
    assert [t.version_id for t in await pool.list_tombstones()] == [second.version_id]
    assert first.chunk.chunk_id in await gc_ids(pool, clock)
    # DeleteObjects records one per existing key
    await put_object(pool, "bk", "a", ["c3"])
    await put_object(pool, "bk", "b", ["c4"])
    ta, tb, tc = (tombstone(new_sortable_id()) for _ in range(3))
    deleted = await pool.delete_objects(
        "bk", ["a", "b", "c"], tombstones={"a": ta, "b": tb, "c": tc}
    )
    assert deleted == ["a", "b"]
    listed = await pool.list_tombstones()
    assert {t.key for t in listed} == {"k", "a", "b"}
    page = await pool.list_tombstones(after=listed[0].version_id, limit=1)
    assert [t.version_id for t in page] == [listed[1].version_id]
    assert await pool.drop_tombstone(ta.version_id)
    assert not await pool.drop_tombstone(ta.version_id)
    assert {t.key for t in await pool.list_tombstones()} == {"k", "b"}
    assert ta.chunk.chunk_id in await gc_ids(pool, clock)


async def test_put_version_records_and_commits_a_one_chunk_object_at_once(
    pool: SqlMetadataStore,
) -> None:
    old = await put_object(pool, "bk", "one", ["c0"])
    vid = new_sortable_id()
    res = await pool.reserve("b1", 132, owner=vid)
    assert res is not None
    result = await pool.put_version(
        vid,
        "bk",
        "one",
        ref=ChunkRef(0, 0, 100, "c1"),
        chunk=chunk("c1"),
        locations=[(Location("c1", "b1", "blobs/c1", 132), res.reservation_id)],
        size=100,
        etag="e1",
        headers={"Content-Type": "text/plain"},
        user_metadata={"mode": "33188"},
    )
    assert result.is_current and result.replaced_version_id == old
    current = await pool.get_current("bk", "one")
    assert current is not None
    assert (current.version_id, current.state, current.size, current.etag) == (
        vid,
        VersionState.COMPLETE,
        100,
        "e1",
    )
    assert current.headers == {"Content-Type": "text/plain"}
    assert current.user_metadata == {"mode": "33188"}
    layout = await pool.get_layout(vid)
    assert [(p.chunk.chunk_id, p.chunk.refcount) for p in layout] == [("c1", 1)]
    assert [loc.blob_key for loc in layout[0].locations] == ["blobs/c1"]
    space = {s.name: s for s in await pool.get_space()}["b1"]
    assert space.reserved_bytes == 0  # the reservation became usage
    with pytest.raises(Conflict):
        await pool.abort_version(vid)  # committed: only UPLOADING versions abort


async def test_put_version_records_nothing_when_it_fails(
    pool: SqlMetadataStore, clock: FakeClock
) -> None:
    from appliance.meta.errors import PreconditionFailed
    from appliance.meta.models import WritePrecondition

    await put_object(pool, "bk", "taken", ["c0"])
    used = {s.name: s for s in await pool.get_space()}["b1"].used_bytes

    async def attempt(vid: str, bucket: str, key: str, cid: str, **kw: object) -> None:
        res = await pool.reserve("b1", 132, owner=vid)
        assert res is not None
        await pool.put_version(
            vid,
            bucket,
            key,
            ref=ChunkRef(0, 0, 100, cid),
            chunk=chunk(cid),
            locations=[(Location(cid, "b1", f"blobs/{cid}", 132), res.reservation_id)],
            size=100,
            etag="e",
            **kw,  # type: ignore[arg-type]
        )

    v1, v2 = new_sortable_id(), new_sortable_id()
    with pytest.raises(NotFound):
        await attempt(v1, "nobucket", "k", "c1")
    with pytest.raises(PreconditionFailed):
        await attempt(v2, "bk", "taken", "c2", precondition=WritePrecondition(if_none_match=True))
    for vid, cid in ((v1, "c1"), (v2, "c2")):
        assert await pool.get_version(vid) is None
        assert await pool.get_chunk_replicas(cid) is None
    space = {s.name: s for s in await pool.get_space()}["b1"]
    assert (space.used_bytes, space.reserved_bytes) == (used, 264)
    clock.advance(3600)
    assert await pool.list_stale_versions(clock.now) == []  # nothing for the janitor
    for vid in (v1, v2):  # the caller's abort releases the reservations
        assert await pool.abort_version(vid) == ()
    space = {s.name: s for s in await pool.get_space()}["b1"]
    assert (space.used_bytes, space.reserved_bytes) == (used, 0)
    taken = await pool.get_current("bk", "taken")
    assert taken is not None and taken.etag.startswith("etag-")
