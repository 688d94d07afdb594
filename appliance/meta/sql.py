"""The SQL core shared by the SQLite and PostgreSQL stores.

Every public method runs one transaction through ``_run``, which retries on the
database's transient conflicts (deadlocks, serialization failures, a busy SQLite)
and maps lost connections to ``StoreUnavailable``. Subclasses supply the connection
handling (``_transaction``) and a ``Dialect``.
"""

from __future__ import annotations

import abc
import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from appliance.clock import from_micros, to_micros, utcnow
from appliance.meta.backoff import Backoff
from appliance.meta.dialect import Dialect, migrations, split_statements
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
    BackendSpace,
    BackendSpec,
    Bucket,
    Chunk,
    ChunkPlacement,
    ChunkRef,
    ChunkReplicas,
    CommitResult,
    Credential,
    DirListing,
    DirRow,
    KeyUpdate,
    ListEntry,
    ListPage,
    Location,
    MultipartUpload,
    NewChunk,
    NewTombstone,
    ObjectVersion,
    Part,
    Permission,
    QueueItem,
    QueueState,
    Reservation,
    Tombstone,
    UsageCounters,
    UsageDelta,
    VersionKind,
    VersionState,
    WrappedKey,
    WritePrecondition,
)
from appliance.meta.store import GC_QUEUE, LeaderLock

Row = Mapping[str, Any]
T = TypeVar("T")

_MAX_CODE_POINT = "\U0010ffff"
_LIST_BATCH = 200
_TX_ATTEMPTS = 8


class Tx(Protocol):
    """One open transaction. Queries use ``$n`` placeholders (rewritten per dialect)."""

    async def execute(self, query: str, *args: Any) -> int:
        """Run a statement; return the number of rows it changed."""
        ...

    async def executemany(self, query: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def fetch(self, query: str, *args: Any) -> list[Row]: ...

    async def fetchrow(self, query: str, *args: Any) -> Row | None: ...

    async def script(self, statements: Sequence[str]) -> None: ...


def _dumps(value: Mapping[str, Any]) -> str:
    return json.dumps(dict(value), sort_keys=True, separators=(",", ":"))


def _loads(text: str) -> dict[str, Any]:
    loaded = json.loads(text)
    if not isinstance(loaded, dict):
        raise ValueError("stored JSON is not an object")
    return loaded


def _version(row: Row) -> ObjectVersion:
    return ObjectVersion(
        version_id=row["version_id"],
        bucket=row["bucket"],
        key=row["key"],
        state=VersionState(row["state"]),
        kind=VersionKind(row["kind"]),
        created_at=from_micros(row["created_at"]),
        size=row["size"],
        etag=row["etag"],
        headers=_loads(row["headers"]),
        user_metadata=_loads(row["user_metadata"]),
        completed_at=None if row["completed_at"] is None else from_micros(row["completed_at"]),
    )


def _queue_item(row: Row) -> QueueItem:
    return QueueItem(
        item_id=row["item_id"],
        queue=row["queue"],
        key=row["item_key"],
        payload=_loads(row["payload"]),
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        not_before=from_micros(row["not_before"]),
        state=QueueState(row["state"]),
        last_error=row["last_error"],
        created_at=from_micros(row["created_at"]),
    )


def _upload(row: Row) -> MultipartUpload:
    return MultipartUpload(
        upload_id=row["upload_id"],
        bucket=row["bucket"],
        key=row["key"],
        created_at=from_micros(row["created_at"]),
        headers=_loads(row["headers"]),
        user_metadata=_loads(row["user_metadata"]),
    )


def _common_prefix(key: str, prefix: str, delimiter: str | None) -> str | None:
    """The common prefix ``key`` rolls up into under ``delimiter``, if any."""
    if not delimiter:
        return None
    cut = key.find(delimiter, len(prefix))
    return None if cut < 0 else key[: cut + len(delimiter)]


_PLACEMENT_COLUMNS = (
    'r.seq, r."offset" AS ref_offset, r.length, r.chunk_id, r.chunk_offset, '
    "c.size, c.sha256, c.stored_size AS chunk_stored, c.refcount, c.created_at, "
    "c.wrapped_dek, c.key_id, l.backend, l.blob_key, l.stored_size AS loc_stored"
)
_PLACEMENT_JOINS = (
    "JOIN chunks c ON c.chunk_id = r.chunk_id LEFT JOIN locations l ON l.chunk_id = r.chunk_id"
)


def _placements(rows: Sequence[Row]) -> dict[int, list[ChunkPlacement]]:
    """Group placement rows (ordered by group, seq, backend) by their ``grp`` column."""
    groups: dict[int, list[ChunkPlacement]] = {}
    for row in rows:
        placements = groups.setdefault(int(row["grp"]), [])
        loc: tuple[Location, ...] = ()
        if row["backend"] is not None:
            loc = (Location(row["chunk_id"], row["backend"], row["blob_key"], row["loc_stored"]),)
        if placements and placements[-1].ref.seq == row["seq"]:
            last = placements[-1]
            placements[-1] = ChunkPlacement(last.ref, last.chunk, last.locations + loc)
            continue
        placements.append(
            ChunkPlacement(
                ref=ChunkRef(
                    row["seq"],
                    row["ref_offset"],
                    row["length"],
                    row["chunk_id"],
                    row["chunk_offset"],
                ),
                chunk=Chunk(
                    chunk_id=row["chunk_id"],
                    size=row["size"],
                    sha256=bytes(row["sha256"]),
                    stored_size=row["chunk_stored"],
                    refcount=row["refcount"],
                    created_at=from_micros(row["created_at"]),
                    wrapped_dek=None if row["wrapped_dek"] is None else bytes(row["wrapped_dek"]),
                    key_id=row["key_id"],
                ),
                locations=loc,
            )
        )
    return groups


class SqlMetadataStore(abc.ABC):
    """MetadataStore over a SQL database; see ``appliance.meta.store`` for the contract."""

    dialect: Dialect

    def __init__(
        self,
        *,
        gc_delay: timedelta = timedelta(hours=1),
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._gc_delay = gc_delay
        self._clock = clock

    @property
    def kind(self) -> str:
        return self.dialect.name

    # -- plumbing --------------------------------------------------------------------
    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and migrate; see ``MetadataStore.open``."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and locks; idempotent."""

    @abc.abstractmethod
    def _transaction(self) -> AbstractAsyncContextManager[Tx]:
        """Open a write transaction (committed on normal exit, rolled back on error)."""

    @abc.abstractmethod
    def _is_retryable(self, exc: BaseException) -> bool:
        """True for conflicts where re-running the whole transaction is safe."""

    @abc.abstractmethod
    def _is_foreign_key_violation(self, exc: BaseException) -> bool:
        """True when a statement failed because a referenced row does not exist."""

    @abc.abstractmethod
    def _translate(self, exc: BaseException) -> BaseException | None:
        """Map a driver error to a store error (``StoreUnavailable``...), or None."""

    async def _run(self, work: Callable[[Tx], Awaitable[T]]) -> T:
        """Run ``work`` in one transaction, retrying transient conflicts."""
        for attempt in range(_TX_ATTEMPTS):
            committing = False
            try:
                async with self._transaction() as tx:
                    result = await work(tx)
                    committing = True
                return result
            except Exception as exc:  # mapped below; store errors pass through
                if self._is_retryable(exc) and attempt + 1 < _TX_ATTEMPTS:
                    await asyncio.sleep(0.005 * 2**attempt)
                    continue
                mapped = self._translate(exc)
                failure = mapped if mapped is not None else exc
                if isinstance(failure, StoreUnavailable) and not committing:
                    failure.uncommitted = True
                if mapped is not None:
                    raise mapped from exc
                raise
        raise AssertionError("unreachable")

    def _now(self) -> int:
        return to_micros(self._clock())

    async def _migrate(self, tx: Tx, current: int) -> None:
        shipped = migrations()
        newest = shipped[-1][0] if shipped else 0
        if current > newest:
            raise SchemaTooNew(
                f"the metadata database is at schema version {current}, but this Cairn "
                f"knows versions up to {newest}: upgrade Cairn (a database is never "
                "migrated backwards)"
            )
        for number, text in shipped:
            if number <= current:
                continue
            await tx.script(split_statements(self.dialect.render_migration(text)))
            await tx.execute(
                "INSERT INTO settings (name, value) VALUES ('schema_version', $1) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                str(number),
            )

    async def schema_version(self) -> int:
        async def work(tx: Tx) -> int:
            row = await tx.fetchrow("SELECT value FROM settings WHERE name = 'schema_version'")
            return 0 if row is None else int(row["value"])

        return await self._run(work)

    # -- settings --------------------------------------------------------------------
    async def get_setting(self, name: str) -> str | None:
        async def work(tx: Tx) -> str | None:
            row = await tx.fetchrow("SELECT value FROM settings WHERE name = $1", name)
            return None if row is None else str(row["value"])

        return await self._run(work)

    async def set_setting(self, name: str, value: str) -> None:
        async def work(tx: Tx) -> None:
            await tx.execute(
                "INSERT INTO settings (name, value) VALUES ($1, $2) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                name,
                value,
            )

        await self._run(work)

    async def setdefault_setting(self, name: str, value: str) -> str:
        async def work(tx: Tx) -> str:
            await tx.execute(
                "INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                name,
                value,
            )
            row = await tx.fetchrow("SELECT value FROM settings WHERE name = $1", name)
            assert row is not None
            return str(row["value"])

        return await self._run(work)

    # -- buckets and credentials -----------------------------------------------------
    async def create_bucket(self, name: str) -> Bucket:
        async def work(tx: Tx) -> Bucket:
            now = self._now()
            changed = await tx.execute(
                "INSERT INTO buckets (name, created_at) VALUES ($1, $2) "
                "ON CONFLICT (name) DO NOTHING",
                name,
                now,
            )
            if not changed:
                raise AlreadyExists(f"bucket {name!r} already exists")
            return Bucket(name=name, created_at=from_micros(now))

        return await self._run(work)

    async def get_bucket(self, name: str) -> Bucket | None:
        async def work(tx: Tx) -> Bucket | None:
            row = await tx.fetchrow("SELECT name, created_at FROM buckets WHERE name = $1", name)
            return None if row is None else Bucket(row["name"], from_micros(row["created_at"]))

        return await self._run(work)

    async def list_buckets(self) -> list[Bucket]:
        async def work(tx: Tx) -> list[Bucket]:
            rows = await tx.fetch("SELECT name, created_at FROM buckets ORDER BY name")
            return [Bucket(r["name"], from_micros(r["created_at"])) for r in rows]

        return await self._run(work)

    async def delete_bucket(self, name: str) -> None:
        async def work(tx: Tx) -> None:
            row = await tx.fetchrow(
                f"SELECT name FROM buckets WHERE name = $1{self.dialect.for_update}", name
            )
            if row is None:
                raise NotFound(f"bucket {name!r} does not exist")
            for table in ("objects", "multipart_uploads", "versions"):
                if await tx.fetchrow(f"SELECT 1 AS x FROM {table} WHERE bucket = $1 LIMIT 1", name):
                    raise BucketNotEmpty(f"bucket {name!r} is not empty")
            await tx.execute("DELETE FROM grants WHERE bucket = $1", name)
            await tx.execute("DELETE FROM buckets WHERE name = $1", name)

        await self._run(work)

    async def bucket_usage(self, name: str) -> tuple[int, int]:
        async def work(tx: Tx) -> tuple[int, int]:
            row = await tx.fetchrow(
                "SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS total FROM objects "
                "WHERE bucket = $1",
                name,
            )
            assert row is not None
            return int(row["n"]), int(row["total"])

        return await self._run(work)

    async def all_bucket_usage(self) -> dict[str, tuple[int, int]]:
        async def work(tx: Tx) -> dict[str, tuple[int, int]]:
            rows = await tx.fetch(
                "SELECT bucket, COUNT(*) AS n, COALESCE(SUM(size), 0) AS total FROM objects "
                "GROUP BY bucket"
            )
            return {r["bucket"]: (int(r["n"]), int(r["total"])) for r in rows}

        return await self._run(work)

    async def put_credential(self, credential: Credential) -> None:
        async def work(tx: Tx) -> None:
            await tx.execute(
                "INSERT INTO credentials (access_key, secret, description, created_at) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT (access_key) DO UPDATE SET "
                "secret = excluded.secret, description = excluded.description",
                credential.access_key,
                credential.secret,
                credential.description,
                to_micros(credential.created_at),
            )
            await tx.execute("DELETE FROM grants WHERE access_key = $1", credential.access_key)
            await tx.executemany(
                "INSERT INTO grants (access_key, bucket, permissions) VALUES ($1, $2, $3)",
                [
                    (credential.access_key, bucket, ",".join(sorted(perms)))
                    for bucket, perms in credential.grants.items()
                ],
            )

        await self._run(work)

    async def _credentials(self, tx: Tx, access_key: str | None) -> list[Credential]:
        where, args = ("WHERE access_key = $1", [access_key]) if access_key else ("", [])
        rows = await tx.fetch(
            f"SELECT access_key, secret, description, created_at FROM credentials {where} "
            "ORDER BY access_key",
            *args,
        )
        grants = await tx.fetch(
            f"SELECT access_key, bucket, permissions FROM grants {where}", *args
        )
        by_key: dict[str, dict[str, frozenset[Permission]]] = {}
        for g in grants:
            perms = frozenset(Permission(p) for p in g["permissions"].split(",") if p)
            by_key.setdefault(g["access_key"], {})[g["bucket"]] = perms
        return [
            Credential(
                access_key=r["access_key"],
                secret=r["secret"],
                description=r["description"],
                created_at=from_micros(r["created_at"]),
                grants=by_key.get(r["access_key"], {}),
            )
            for r in rows
        ]

    async def get_credential(self, access_key: str) -> Credential | None:
        async def work(tx: Tx) -> Credential | None:
            found = await self._credentials(tx, access_key)
            return found[0] if found else None

        return await self._run(work)

    async def list_credentials(self) -> list[Credential]:
        return await self._run(lambda tx: self._credentials(tx, None))

    async def delete_credential(self, access_key: str) -> None:
        async def work(tx: Tx) -> None:
            await tx.execute("DELETE FROM grants WHERE access_key = $1", access_key)
            await tx.execute("DELETE FROM credentials WHERE access_key = $1", access_key)

        await self._run(work)

    # -- versions --------------------------------------------------------------------
    async def begin_version(
        self,
        version_id: str,
        bucket: str,
        key: str,
        *,
        kind: VersionKind = VersionKind.OBJECT,
        headers: Mapping[str, str] | None = None,
        user_metadata: Mapping[str, str] | None = None,
    ) -> ObjectVersion:
        async def work(tx: Tx) -> ObjectVersion:
            await self._insert_version(tx, version_id, bucket, key, kind, headers, user_metadata)
            row = await tx.fetchrow("SELECT * FROM versions WHERE version_id = $1", version_id)
            assert row is not None
            return _version(row)

        return await self._run(work)

    async def _insert_version(
        self,
        tx: Tx,
        version_id: str,
        bucket: str,
        key: str,
        kind: VersionKind,
        headers: Mapping[str, str] | None,
        user_metadata: Mapping[str, str] | None,
        *,
        complete: tuple[int, str] | None = None,
    ) -> int:
        """Insert an UPLOADING version, or with ``complete`` = (size, etag) a COMPLETE
        one (``put_version``: its chunk is recorded in the same transaction). Returns
        its ``created_at``. Raises ``NotFound`` (no bucket), ``AlreadyExists``."""
        now = self._now()
        state = VersionState.UPLOADING if complete is None else VersionState.COMPLETE
        size, etag = (0, "") if complete is None else complete
        try:
            changed = await tx.execute(
                "INSERT INTO versions (version_id, bucket, key, kind, state, headers, "
                "user_metadata, created_at, size, etag, completed_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) "
                "ON CONFLICT (version_id) DO NOTHING",
                version_id,
                bucket,
                key,
                kind.value,
                state.value,
                _dumps(headers or {}),
                _dumps(user_metadata or {}),
                now,
                size,
                etag,
                None if complete is None else now,
            )
        except Exception as exc:
            # the row's one foreign key is its bucket: checked by the insert itself,
            # which saves a query per version
            if self._is_foreign_key_violation(exc):
                raise NotFound(f"bucket {bucket!r} does not exist") from exc
            raise
        if not changed:
            raise AlreadyExists(f"version {version_id} already exists")
        return now

    async def _uploading(self, tx: Tx, version_id: str, kind: VersionKind | None = None) -> Row:
        row = await tx.fetchrow(
            f"SELECT * FROM versions WHERE version_id = $1{self.dialect.for_update}", version_id
        )
        if row is None:
            raise Conflict(f"version {version_id} does not exist (aborted?)")
        if row["state"] != VersionState.UPLOADING.value:
            raise Conflict(f"version {version_id} is {row['state']}, not UPLOADING")
        if kind is not None and row["kind"] != kind.value:
            raise Conflict(f"version {version_id} is a {row['kind']} version, not {kind.value}")
        return row

    async def _take_from(self, tx: Tx, reservation_id: int, backend: str, nbytes: int) -> int:
        """Take ``nbytes`` off reservation ``reservation_id`` (a chunk's own, or a lease
        several chunks draw on) and delete it once empty; return the bytes it held for
        the caller. A reservation smaller than ``nbytes`` is deleted whole and its size
        returned; an unknown one gives 0."""
        row = await tx.fetchrow(
            "UPDATE reservations SET nbytes = nbytes - $3 WHERE reservation_id = $1 "
            "AND backend = $2 AND nbytes > $3 RETURNING nbytes",
            reservation_id,
            backend,
            nbytes,
        )
        if row is not None:
            return nbytes
        row = await tx.fetchrow(
            "DELETE FROM reservations WHERE reservation_id = $1 AND backend = $2 RETURNING nbytes",
            reservation_id,
            backend,
        )
        return 0 if row is None else int(row["nbytes"])

    async def _settle(self, tx: Tx, reservation_id: int | None, location: Location) -> None:
        """Turn the blob's part of a reservation into usage: the blob is on its backend."""
        reserved = 0
        if reservation_id is not None:
            reserved = await self._take_from(
                tx, reservation_id, location.backend, location.stored_size
            )
        await tx.execute(
            "UPDATE backend_space SET reserved_bytes = reserved_bytes - $2, "
            "used_bytes = used_bytes + $3 WHERE name = $1",
            location.backend,
            reserved,
            location.stored_size,
        )

    async def add_chunk(
        self,
        version_id: str,
        ref: ChunkRef,
        chunk: NewChunk,
        locations: Sequence[tuple[Location, int | None]],
    ) -> None:
        async def work(tx: Tx) -> None:
            await self._uploading(tx, version_id)
            await self._record_chunk(tx, version_id, ref, chunk, locations)

        await self._run(work)

    async def _record_chunk(
        self,
        tx: Tx,
        version_id: str,
        ref: ChunkRef,
        chunk: NewChunk,
        locations: Sequence[tuple[Location, int | None]],
    ) -> None:
        await self._insert_chunk(tx, chunk)
        await self._insert_refs(tx, version_id, [ref])
        for location, reservation_id in locations:
            await self._insert_location(tx, location, reservation_id)

    async def _insert_chunk(self, tx: Tx, chunk: NewChunk, *, refcount: int = 1) -> None:
        """Record a new chunk, by default with refcount 1 (its first ref is inserted
        with it); a tombstone's chunk has none."""
        await tx.execute(
            "INSERT INTO chunks (chunk_id, size, sha256, stored_size, wrapped_dek, key_id, "
            "refcount, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            chunk.chunk_id,
            chunk.size,
            chunk.sha256,
            chunk.stored_size,
            chunk.wrapped_dek,
            chunk.key_id,
            refcount,
            self._now(),
        )

    async def _insert_refs(self, tx: Tx, version_id: str, refs: Sequence[ChunkRef]) -> None:
        await tx.executemany(
            'INSERT INTO chunk_refs (version_id, seq, "offset", length, chunk_id, chunk_offset) '
            "VALUES ($1, $2, $3, $4, $5, $6)",
            [(version_id, r.seq, r.offset, r.length, r.chunk_id, r.chunk_offset) for r in refs],
        )

    async def _insert_location(
        self, tx: Tx, location: Location, reservation_id: int | None
    ) -> None:
        changed = await tx.execute(
            "INSERT INTO locations (chunk_id, backend, blob_key, stored_size) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (chunk_id, backend) DO NOTHING",
            location.chunk_id,
            location.backend,
            location.blob_key,
            location.stored_size,
        )
        if changed:
            await self._settle(tx, reservation_id, location)
        elif reservation_id is not None:
            await self._give_back(tx, reservation_id, location.backend, location.stored_size)

    async def add_refs(self, version_id: str, refs: Sequence[ChunkRef]) -> None:
        async def work(tx: Tx) -> None:
            await self._uploading(tx, version_id)
            await self._incref(tx, [r.chunk_id for r in refs])
            await self._insert_refs(tx, version_id, refs)

        await self._run(work)

    async def _incref(self, tx: Tx, chunk_ids: Sequence[str]) -> None:
        counts: dict[str, int] = {}
        for chunk_id in chunk_ids:
            counts[chunk_id] = counts.get(chunk_id, 0) + 1
        for chunk_id, n in sorted(counts.items()):
            changed = await tx.execute(
                "UPDATE chunks SET refcount = refcount + $2 WHERE chunk_id = $1 AND refcount > 0",
                chunk_id,
                n,
            )
            if not changed:
                raise Conflict(f"chunk {chunk_id} is gone or being deleted")

    async def _drop_version(self, tx: Tx, version_id: str) -> list[str]:
        """Delete a version and its refs; queue chunks left unreferenced. Returns them."""
        counts = await tx.fetch(
            "SELECT chunk_id, COUNT(*) AS n FROM chunk_refs WHERE version_id = $1 "
            "GROUP BY chunk_id ORDER BY chunk_id",
            version_id,
        )
        freed: list[str] = []
        for row in counts:
            left = await tx.fetchrow(
                "UPDATE chunks SET refcount = refcount - $2 WHERE chunk_id = $1 RETURNING refcount",
                row["chunk_id"],
                row["n"],
            )
            if left is not None and left["refcount"] <= 0:
                freed.append(row["chunk_id"])
        await tx.execute("DELETE FROM chunk_refs WHERE version_id = $1", version_id)
        await tx.execute("DELETE FROM versions WHERE version_id = $1", version_id)
        not_before = to_micros(self._clock() + self._gc_delay)
        for chunk_id in freed:
            await self._enqueue(
                tx, GC_QUEUE, {"chunk_id": chunk_id}, f"chunk:{chunk_id}", not_before, 10
            )
        return freed

    async def _give_back(self, tx: Tx, reservation_id: int, backend: str, nbytes: int) -> None:
        """Release ``nbytes`` of a reservation (all of it when it holds no more)."""
        taken = await self._take_from(tx, reservation_id, backend, nbytes)
        if taken:
            await tx.execute(
                "UPDATE backend_space SET reserved_bytes = reserved_bytes - $2 WHERE name = $1",
                backend,
                taken,
            )

    async def _release(self, tx: Tx, where: str, *args: Any) -> int:
        rows = await tx.fetch(
            f"DELETE FROM reservations WHERE {where} RETURNING backend, nbytes", *args
        )
        for row in rows:
            await tx.execute(
                "UPDATE backend_space SET reserved_bytes = reserved_bytes - $2 WHERE name = $1",
                row["backend"],
                row["nbytes"],
            )
        return len(rows)

    async def _make_current(
        self,
        tx: Tx,
        version: Row,
        size: int,
        etag: str,
        precondition: WritePrecondition | None = None,
        created_at: int | None = None,
    ) -> CommitResult:
        """Point the key at ``version`` if it is the newest; drop whichever loses.
        ``version`` needs ``version_id``, ``bucket``, ``key`` and, unless given as
        ``created_at``, ``created_at``.

        With a ``precondition`` the version must also become current, and the current
        object it replaces must match; otherwise ``PreconditionFailed``.
        """
        version_id = version["version_id"]
        bucket, key = version["bucket"], version["key"]
        modified_at = version["created_at"] if created_at is None else created_at
        tomb = await tx.fetchrow(
            "SELECT version_id, chunk_id FROM tombstones WHERE bucket = $1 AND key = $2"
            f"{self.dialect.for_update}",
            bucket,
            key,
        )
        if tomb is not None and tomb["version_id"] > version_id:
            # a newer delete of the key: this version loses, as to a newer version
            if precondition is not None:
                raise PreconditionFailed("a newer delete of this key happened meanwhile")
            freed = await self._drop_version(tx, version_id)
            return CommitResult(version_id, False, None, tuple(freed))
        if tomb is not None:
            await self._retire_tombstone(tx, tomb["version_id"], tomb["chunk_id"])
        if precondition is not None and precondition.if_match is not None:
            row = await tx.fetchrow(
                f"SELECT etag FROM objects WHERE bucket = $1 AND key = $2{self.dialect.for_update}",
                bucket,
                key,
            )
            if row is None or row["etag"].strip('"') != precondition.if_match.strip('"'):
                raise PreconditionFailed("the current object does not match If-Match")
        if precondition is not None and precondition.if_version_id is not None:
            row = await tx.fetchrow(
                "SELECT version_id FROM objects WHERE bucket = $1 AND key = $2"
                f"{self.dialect.for_update}",
                bucket,
                key,
            )
            if row is None or row["version_id"] != precondition.if_version_id:
                raise PreconditionFailed("the object changed since the rewrite began")
        inserted = await tx.execute(
            "INSERT INTO objects (bucket, key, version_id, size, etag, modified_at) "
            "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (bucket, key) DO NOTHING",
            bucket,
            key,
            version_id,
            size,
            etag,
            modified_at,
        )
        if inserted:
            return CommitResult(version_id, True, None, ())
        if precondition is not None and precondition.if_none_match:
            raise PreconditionFailed("an object already exists at this key (If-None-Match: *)")
        current = await tx.fetchrow(
            "SELECT version_id FROM objects WHERE bucket = $1 AND key = $2"
            f"{self.dialect.for_update}",
            bucket,
            key,
        )
        assert current is not None
        if current["version_id"] > version_id:
            if precondition is not None:
                raise PreconditionFailed("a newer write of this key committed meanwhile")
            freed = await self._drop_version(tx, version_id)
            return CommitResult(version_id, False, None, tuple(freed))
        await tx.execute(
            "UPDATE objects SET version_id = $3, size = $4, etag = $5, modified_at = $6 "
            "WHERE bucket = $1 AND key = $2",
            bucket,
            key,
            version_id,
            size,
            etag,
            modified_at,
        )
        freed = await self._drop_version(tx, current["version_id"])
        return CommitResult(version_id, True, current["version_id"], tuple(freed))

    async def _complete(
        self,
        tx: Tx,
        version_id: str,
        size: int,
        etag: str,
        headers: Mapping[str, str] | None,
        user_metadata: Mapping[str, str] | None,
    ) -> None:
        sets = ["state = $2", "size = $3", "etag = $4", "completed_at = $5"]
        args: list[Any] = [version_id, VersionState.COMPLETE.value, size, etag, self._now()]
        if headers is not None:
            args.append(_dumps(headers))
            sets.append(f"headers = ${len(args)}")
        if user_metadata is not None:
            args.append(_dumps(user_metadata))
            sets.append(f"user_metadata = ${len(args)}")
        await tx.execute(f"UPDATE versions SET {', '.join(sets)} WHERE version_id = $1", *args)
        await self._release(tx, "owner = $1", version_id)

    async def commit_version(
        self,
        version_id: str,
        *,
        size: int,
        etag: str,
        headers: Mapping[str, str] | None = None,
        user_metadata: Mapping[str, str] | None = None,
        precondition: WritePrecondition | None = None,
    ) -> CommitResult:
        async def work(tx: Tx) -> CommitResult:
            row = await self._uploading(tx, version_id, VersionKind.OBJECT)
            await self._complete(tx, version_id, size, etag, headers, user_metadata)
            return await self._make_current(tx, row, size, etag, precondition)

        return await self._run(work)

    async def put_version(
        self,
        version_id: str,
        bucket: str,
        key: str,
        *,
        ref: ChunkRef,
        chunk: NewChunk,
        locations: Sequence[tuple[Location, int | None]],
        size: int,
        etag: str,
        headers: Mapping[str, str] | None = None,
        user_metadata: Mapping[str, str] | None = None,
        precondition: WritePrecondition | None = None,
    ) -> CommitResult:
        async def work(tx: Tx) -> CommitResult:
            # inserted COMPLETE at once: nothing outside this transaction sees it before
            created_at = await self._insert_version(
                tx,
                version_id,
                bucket,
                key,
                VersionKind.OBJECT,
                headers,
                user_metadata,
                complete=(size, etag),
            )
            await self._record_chunk(tx, version_id, ref, chunk, locations)
            await self._release(tx, "owner = $1", version_id)
            row = {"version_id": version_id, "bucket": bucket, "key": key}
            return await self._make_current(tx, row, size, etag, precondition, created_at)

        return await self._run(work)

    async def abort_version(self, version_id: str) -> tuple[str, ...]:
        async def work(tx: Tx) -> tuple[str, ...]:
            row = await tx.fetchrow(
                f"SELECT state FROM versions WHERE version_id = $1{self.dialect.for_update}",
                version_id,
            )
            await self._release(tx, "owner = $1", version_id)
            if row is None:
                return ()
            if row["state"] != VersionState.UPLOADING.value:
                raise Conflict(f"version {version_id} is {row['state']}; only UPLOADING aborts")
            return tuple(await self._drop_version(tx, version_id))

        return await self._run(work)

    async def get_version(self, version_id: str) -> ObjectVersion | None:
        async def work(tx: Tx) -> ObjectVersion | None:
            row = await tx.fetchrow("SELECT * FROM versions WHERE version_id = $1", version_id)
            return None if row is None else _version(row)

        return await self._run(work)

    async def get_current(self, bucket: str, key: str) -> ObjectVersion | None:
        async def work(tx: Tx) -> ObjectVersion | None:
            row = await tx.fetchrow(
                "SELECT v.* FROM objects o JOIN versions v ON v.version_id = o.version_id "
                "WHERE o.bucket = $1 AND o.key = $2",
                bucket,
                key,
            )
            return None if row is None else _version(row)

        return await self._run(work)

    async def set_current_header(
        self, bucket: str, key: str, name: str, value: str | None
    ) -> ObjectVersion:
        async def work(tx: Tx) -> ObjectVersion:
            row = await tx.fetchrow(
                f"SELECT version_id FROM objects WHERE bucket = $1 AND key = $2"
                f"{self.dialect.for_update}",
                bucket,
                key,
            )
            if row is None:
                raise NotFound(f"no object {key!r} in bucket {bucket!r}")
            version = await tx.fetchrow(
                "SELECT * FROM versions WHERE version_id = $1", row["version_id"]
            )
            assert version is not None
            headers = _loads(version["headers"])
            if value is None:
                headers.pop(name, None)
            else:
                headers[name] = value
            updated = await tx.fetchrow(
                "UPDATE versions SET headers = $2 WHERE version_id = $1 RETURNING *",
                row["version_id"],
                _dumps(headers),
            )
            assert updated is not None
            return _version(updated)

        return await self._run(work)

    async def get_layout(self, version_id: str) -> list[ChunkPlacement]:
        async def work(tx: Tx) -> list[ChunkPlacement]:
            rows = await tx.fetch(
                f"SELECT 0 AS grp, {_PLACEMENT_COLUMNS} FROM chunk_refs r {_PLACEMENT_JOINS} "
                "WHERE r.version_id = $1 ORDER BY r.seq, l.backend",
                version_id,
            )
            return _placements(rows).get(0, [])

        return await self._run(work)

    async def get_upload_layout(self, upload_id: str) -> dict[int, list[ChunkPlacement]]:
        async def work(tx: Tx) -> dict[int, list[ChunkPlacement]]:
            rows = await tx.fetch(
                f"SELECT p.part_number AS grp, {_PLACEMENT_COLUMNS} FROM parts p "
                f"JOIN chunk_refs r ON r.version_id = p.version_id {_PLACEMENT_JOINS} "
                "WHERE p.upload_id = $1 ORDER BY p.part_number, r.seq, l.backend",
                upload_id,
            )
            return _placements(rows)

        return await self._run(work)

    async def delete_objects(
        self,
        bucket: str,
        keys: Sequence[str],
        *,
        tombstones: Mapping[str, NewTombstone] | None = None,
    ) -> list[str]:
        async def work(tx: Tx) -> list[str]:
            deleted: list[str] = []
            for key in keys:
                tomb = tombstones.get(key) if tombstones else None
                if await self._delete_current(tx, bucket, key, tomb) is not None:
                    deleted.append(key)
            return deleted

        return await self._run(work)

    async def delete_object(
        self, bucket: str, key: str, *, tombstone: NewTombstone | None = None
    ) -> str | None:
        async def work(tx: Tx) -> str | None:
            return await self._delete_current(tx, bucket, key, tombstone)

        return await self._run(work)

    async def _delete_current(
        self, tx: Tx, bucket: str, key: str, tombstone: NewTombstone | None
    ) -> str | None:
        """Delete the key's current version (recording ``tombstone``); its id or None."""
        row = await tx.fetchrow(
            "DELETE FROM objects WHERE bucket = $1 AND key = $2 RETURNING version_id",
            bucket,
            key,
        )
        if row is None:
            return None
        version_id = str(row["version_id"])
        if tombstone is not None:
            if tombstone.version_id <= version_id:
                raise Conflict(
                    f"tombstone {tombstone.version_id} is not newer than version {version_id}"
                )
            await self._record_tombstone(tx, bucket, key, tombstone)
        await self._drop_version(tx, version_id)
        return version_id

    async def _record_tombstone(
        self, tx: Tx, bucket: str, key: str, tombstone: NewTombstone
    ) -> None:
        old = await tx.fetchrow(
            f"SELECT version_id, chunk_id FROM tombstones WHERE bucket = $1 AND key = $2"
            f"{self.dialect.for_update}",
            bucket,
            key,
        )
        if old is not None:
            await self._retire_tombstone(tx, old["version_id"], old["chunk_id"])
        chunk = tombstone.chunk
        await self._insert_chunk(tx, chunk, refcount=0)
        for location, reservation_id in tombstone.locations:
            await self._insert_location(tx, location, reservation_id)
        await tx.execute(
            "INSERT INTO tombstones (bucket, key, version_id, chunk_id, created_at) "
            "VALUES ($1, $2, $3, $4, $5)",
            bucket,
            key,
            tombstone.version_id,
            chunk.chunk_id,
            self._now(),
        )

    async def _retire_tombstone(self, tx: Tx, version_id: str, chunk_id: str) -> None:
        """Forget a tombstone row and queue its chunk for deletion at once."""
        await tx.execute("DELETE FROM tombstones WHERE version_id = $1", version_id)
        await self._enqueue(
            tx, GC_QUEUE, {"chunk_id": chunk_id}, f"chunk:{chunk_id}", self._now(), 10
        )

    async def list_tombstones(self, *, after: str = "", limit: int = 100) -> list[Tombstone]:
        async def work(tx: Tx) -> list[Tombstone]:
            rows = await tx.fetch(
                "SELECT bucket, key, version_id, chunk_id, created_at FROM tombstones "
                "WHERE version_id > $1 ORDER BY version_id LIMIT $2",
                after,
                limit,
            )
            return [
                Tombstone(
                    r["bucket"],
                    r["key"],
                    r["version_id"],
                    r["chunk_id"],
                    from_micros(r["created_at"]),
                )
                for r in rows
            ]

        return await self._run(work)

    async def drop_tombstone(self, version_id: str) -> bool:
        async def work(tx: Tx) -> bool:
            row = await tx.fetchrow(
                f"SELECT chunk_id FROM tombstones WHERE version_id = $1{self.dialect.for_update}",
                version_id,
            )
            if row is None:
                return False
            await self._retire_tombstone(tx, version_id, row["chunk_id"])
            return True

        return await self._run(work)

    async def list_objects(
        self,
        bucket: str,
        *,
        prefix: str = "",
        delimiter: str | None = None,
        start_after: str | None = None,
        limit: int = 1000,
    ) -> ListPage:
        if limit < 1:
            raise ValueError("limit must be at least 1")

        async def work(tx: Tx) -> ListPage:
            entries: list[ListEntry] = []
            prefixes: list[str] = []
            after = start_after if start_after and start_after > prefix else None
            if after is not None and _common_prefix(after, prefix, delimiter) == after:
                after += _MAX_CODE_POINT  # resume past a common prefix given earlier
            last_marker: str | None = None
            while True:
                bound, arg = ("key > $2", after) if after is not None else ("key >= $2", prefix)
                rows = await tx.fetch(
                    "SELECT key, version_id, size, etag, modified_at FROM objects "
                    f"WHERE bucket = $1 AND {bound} ORDER BY key LIMIT $3",
                    bucket,
                    arg,
                    _LIST_BATCH,
                )
                if not rows:
                    return ListPage(tuple(entries), tuple(prefixes), False, None)
                for row in rows:
                    key = row["key"]
                    if not key.startswith(prefix):
                        return ListPage(tuple(entries), tuple(prefixes), False, None)
                    if len(entries) + len(prefixes) == limit:
                        return ListPage(tuple(entries), tuple(prefixes), True, last_marker)
                    common = _common_prefix(key, prefix, delimiter)
                    if common is None:
                        entries.append(
                            ListEntry(
                                key,
                                row["version_id"],
                                row["size"],
                                row["etag"],
                                from_micros(row["modified_at"]),
                            )
                        )
                        last_marker = after = key
                        continue
                    prefixes.append(common)
                    last_marker = common
                    after = common + _MAX_CODE_POINT
                    break

        return await self._run(work)

    async def list_directory(
        self,
        bucket: str,
        *,
        prefix: str,
        delimiter: str = "/",
        start_after: str | None = None,
        limit: int = 1000,
    ) -> DirListing:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if not delimiter:
            raise ValueError("a directory listing needs a delimiter")

        async def work(tx: Tx) -> DirListing:
            rows: list[DirRow] = []
            after = start_after if start_after and start_after > prefix else None
            if after is not None and _common_prefix(after, prefix, delimiter) == after:
                after += _MAX_CODE_POINT  # resume past a common prefix given earlier
            while True:
                bound, arg = ("o.key > $2", after) if after is not None else ("o.key >= $2", prefix)
                found = await tx.fetch(
                    "SELECT v.* FROM objects o JOIN versions v ON v.version_id = o.version_id "
                    f"WHERE o.bucket = $1 AND {bound} ORDER BY o.key LIMIT $3",
                    bucket,
                    arg,
                    _LIST_BATCH,
                )
                if not found:
                    return DirListing(tuple(rows), False, None)
                for row in found:
                    key = row["key"]
                    if not key.startswith(prefix):
                        return DirListing(tuple(rows), False, None)
                    if len(rows) == limit:
                        return DirListing(tuple(rows), True, rows[-1].key)
                    common = _common_prefix(key, prefix, delimiter)
                    if common is None:
                        rows.append(DirRow(key, False, _version(row)))
                        after = key
                        continue
                    # the first key under a common prefix is its marker, if it has one
                    marker = _version(row) if key == common else None
                    rows.append(DirRow(common, True, marker))
                    after = common + _MAX_CODE_POINT
                    break

        return await self._run(work)

    async def list_stale_versions(self, older_than: datetime, limit: int = 100) -> list[str]:
        async def work(tx: Tx) -> list[str]:
            rows = await tx.fetch(
                "SELECT v.version_id FROM versions v WHERE v.state = $1 AND v.created_at < $2 "
                "AND NOT EXISTS (SELECT 1 FROM chunk_refs r JOIN chunks c "
                "ON c.chunk_id = r.chunk_id WHERE r.version_id = v.version_id "
                "AND c.created_at >= $2) ORDER BY v.created_at LIMIT $3",
                VersionState.UPLOADING.value,
                to_micros(older_than),
                limit,
            )
            return [r["version_id"] for r in rows]

        return await self._run(work)

    # -- chunks and locations --------------------------------------------------------
    async def add_location(self, location: Location, reservation_id: int | None) -> None:
        async def work(tx: Tx) -> None:
            row = await tx.fetchrow(
                f"SELECT refcount FROM chunks WHERE chunk_id = $1{self.dialect.for_update}",
                location.chunk_id,
            )
            if row is None or row["refcount"] <= 0:
                raise Conflict(f"chunk {location.chunk_id} is gone or being deleted")
            await self._insert_location(tx, location, reservation_id)

        await self._run(work)

    async def get_locations(self, chunk_id: str) -> list[Location]:
        async def work(tx: Tx) -> list[Location]:
            rows = await tx.fetch(
                "SELECT chunk_id, backend, blob_key, stored_size FROM locations "
                "WHERE chunk_id = $1 ORDER BY backend",
                chunk_id,
            )
            return [
                Location(r["chunk_id"], r["backend"], r["blob_key"], r["stored_size"]) for r in rows
            ]

        return await self._run(work)

    async def get_chunk_replicas(self, chunk_id: str) -> ChunkReplicas | None:
        async def work(tx: Tx) -> ChunkReplicas | None:
            found = await self._chunk_replicas(tx, "c.chunk_id = $1", chunk_id, 1)
            return found[0] if found else None

        return await self._run(work)

    async def scan_chunks(self, *, after: str = "", limit: int = 500) -> list[ChunkReplicas]:
        async def work(tx: Tx) -> list[ChunkReplicas]:
            return await self._chunk_replicas(
                tx, "c.chunk_id > $1 AND c.refcount > 0", after, limit
            )

        return await self._run(work)

    async def _chunk_replicas(
        self, tx: Tx, where: str, arg: str, limit: int
    ) -> list[ChunkReplicas]:
        chunks = await tx.fetch(
            "SELECT chunk_id, size, sha256, stored_size, refcount, created_at, wrapped_dek, "
            f"key_id FROM chunks c WHERE {where} ORDER BY chunk_id LIMIT $2",
            arg,
            limit,
        )
        if not chunks:
            return []
        lo, hi = chunks[0]["chunk_id"], chunks[-1]["chunk_id"]
        locations: dict[str, list[Location]] = {}
        for r in await tx.fetch(
            "SELECT chunk_id, backend, blob_key, stored_size FROM locations "
            "WHERE chunk_id >= $1 AND chunk_id <= $2 ORDER BY chunk_id, backend",
            lo,
            hi,
        ):
            locations.setdefault(r["chunk_id"], []).append(
                Location(r["chunk_id"], r["backend"], r["blob_key"], r["stored_size"])
            )
        buckets: dict[str, list[str]] = {}
        for r in await tx.fetch(
            "SELECT DISTINCT r.chunk_id, v.bucket FROM chunk_refs r "
            "JOIN versions v ON v.version_id = r.version_id "
            "WHERE r.chunk_id >= $1 AND r.chunk_id <= $2 ORDER BY r.chunk_id, v.bucket",
            lo,
            hi,
        ):
            buckets.setdefault(r["chunk_id"], []).append(r["bucket"])
        return [
            ChunkReplicas(
                Chunk(
                    chunk_id=r["chunk_id"],
                    size=r["size"],
                    sha256=bytes(r["sha256"]),
                    stored_size=r["stored_size"],
                    refcount=r["refcount"],
                    created_at=from_micros(r["created_at"]),
                    wrapped_dek=None if r["wrapped_dek"] is None else bytes(r["wrapped_dek"]),
                    key_id=r["key_id"],
                ),
                tuple(locations.get(r["chunk_id"], ())),
                tuple(buckets.get(r["chunk_id"], ())),
            )
            for r in chunks
        ]

    async def list_locations(
        self, backend: str, *, after: str = "", limit: int = 1000
    ) -> list[Location]:
        async def work(tx: Tx) -> list[Location]:
            rows = await tx.fetch(
                "SELECT chunk_id, backend, blob_key, stored_size FROM locations "
                "WHERE backend = $1 AND blob_key > $2 ORDER BY blob_key LIMIT $3",
                backend,
                after,
                limit,
            )
            return [
                Location(r["chunk_id"], r["backend"], r["blob_key"], r["stored_size"]) for r in rows
            ]

        return await self._run(work)

    async def claim_garbage(self, chunk_id: str) -> list[Location] | None:
        async def work(tx: Tx) -> list[Location] | None:
            row = await tx.fetchrow(
                f"SELECT refcount FROM chunks WHERE chunk_id = $1{self.dialect.for_update}",
                chunk_id,
            )
            if row is None:
                return []
            if row["refcount"] > 0:
                return None
            rows = await tx.fetch(
                "SELECT chunk_id, backend, blob_key, stored_size FROM locations "
                "WHERE chunk_id = $1 ORDER BY backend",
                chunk_id,
            )
            if not rows:
                await tx.execute("DELETE FROM chunks WHERE chunk_id = $1", chunk_id)
            return [
                Location(r["chunk_id"], r["backend"], r["blob_key"], r["stored_size"]) for r in rows
            ]

        return await self._run(work)

    async def forget_location(self, chunk_id: str, backend: str) -> None:
        async def work(tx: Tx) -> None:
            row = await tx.fetchrow(
                "DELETE FROM locations WHERE chunk_id = $1 AND backend = $2 RETURNING stored_size",
                chunk_id,
                backend,
            )
            if row is not None:
                await tx.execute(
                    "UPDATE backend_space SET used_bytes = used_bytes - $2 WHERE name = $1",
                    backend,
                    row["stored_size"],
                )
            await tx.execute(
                "DELETE FROM chunks WHERE chunk_id = $1 AND refcount <= 0 AND NOT EXISTS "
                "(SELECT 1 FROM locations WHERE chunk_id = $1)",
                chunk_id,
            )

        await self._run(work)

    # -- quota -----------------------------------------------------------------------
    async def sync_backends(self, specs: Sequence[BackendSpec]) -> None:
        async def work(tx: Tx) -> None:
            for spec in specs:
                await tx.execute(
                    "INSERT INTO backend_space (name, quota_bytes) VALUES ($1, $2) "
                    "ON CONFLICT (name) DO UPDATE SET quota_bytes = excluded.quota_bytes",
                    spec.name,
                    spec.quota_bytes,
                )

        await self._run(work)

    async def get_space(self) -> list[BackendSpace]:
        async def work(tx: Tx) -> list[BackendSpace]:
            rows = await tx.fetch(
                "SELECT name, quota_bytes, used_bytes, reserved_bytes FROM backend_space "
                "ORDER BY name"
            )
            return [
                BackendSpace(r["name"], r["quota_bytes"], r["used_bytes"], r["reserved_bytes"])
                for r in rows
            ]

        return await self._run(work)

    async def reserve(self, backend: str, nbytes: int, *, owner: str) -> Reservation | None:
        if nbytes < 0:
            raise ValueError("cannot reserve a negative number of bytes")

        async def work(tx: Tx) -> Reservation | None:
            changed = await tx.execute(
                "UPDATE backend_space SET reserved_bytes = reserved_bytes + $2 WHERE name = $1 "
                "AND (quota_bytes IS NULL OR used_bytes + reserved_bytes + $2 <= quota_bytes)",
                backend,
                nbytes,
            )
            if not changed:
                if await tx.fetchrow("SELECT 1 AS x FROM backend_space WHERE name = $1", backend):
                    return None
                raise NotFound(f"backend {backend!r} is not known to the store")
            now = self._now()
            row = await tx.fetchrow(
                "INSERT INTO reservations (backend, nbytes, owner, created_at) "
                "VALUES ($1, $2, $3, $4) RETURNING reservation_id",
                backend,
                nbytes,
                owner,
                now,
            )
            assert row is not None
            return Reservation(row["reservation_id"], backend, nbytes, owner, from_micros(now))

        return await self._run(work)

    async def release_reservation(
        self, reservation_id: int, *, backend: str | None = None, nbytes: int | None = None
    ) -> None:
        if nbytes is None or backend is None:
            await self._run(lambda tx: self._release(tx, "reservation_id = $1", reservation_id))
            return
        name, part = backend, nbytes
        await self._run(lambda tx: self._give_back(tx, reservation_id, name, part))

    async def release_stale_reservations(
        self, older_than: datetime, *, owner_prefix: str | None = None
    ) -> int:
        if owner_prefix is None:
            return await self._run(
                lambda tx: self._release(tx, "created_at < $1", to_micros(older_than))
            )
        return await self._run(
            lambda tx: self._release(
                tx,
                "created_at < $1 AND substr(owner, 1, $3) = $2",
                to_micros(older_than),
                owner_prefix,
                len(owner_prefix),
            )
        )

    # -- usage counters --------------------------------------------------------------
    async def add_usage(self, deltas: Sequence[UsageDelta]) -> None:
        async def work(tx: Tx) -> None:
            await tx.executemany(
                "INSERT INTO usage (backend, month, requests, egress_bytes, ingress_bytes) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (backend, month) DO UPDATE SET "
                "requests = usage.requests + excluded.requests, "
                "egress_bytes = usage.egress_bytes + excluded.egress_bytes, "
                "ingress_bytes = usage.ingress_bytes + excluded.ingress_bytes",
                [
                    (d.backend, d.month, d.requests, d.egress_bytes, d.ingress_bytes)
                    for d in sorted(deltas, key=lambda d: (d.backend, d.month))
                ],
            )

        await self._run(work)

    async def get_usage(self, month: str) -> list[UsageCounters]:
        async def work(tx: Tx) -> list[UsageCounters]:
            rows = await tx.fetch(
                "SELECT backend, month, requests, egress_bytes, ingress_bytes FROM usage "
                "WHERE month = $1 ORDER BY backend",
                month,
            )
            return [
                UsageCounters(
                    r["backend"], r["month"], r["requests"], r["egress_bytes"], r["ingress_bytes"]
                )
                for r in rows
            ]

        return await self._run(work)

    # -- durable queues --------------------------------------------------------------
    async def _enqueue(
        self,
        tx: Tx,
        queue: str,
        payload: Mapping[str, object],
        key: str | None,
        not_before: int,
        max_attempts: int,
    ) -> int | None:
        row = await tx.fetchrow(
            "INSERT INTO queue_items (queue, item_key, payload, state, attempts, max_attempts, "
            "not_before, created_at) VALUES ($1, $2, $3, $4, 0, $5, $6, $7) "
            "ON CONFLICT (queue, item_key) DO UPDATE SET state = excluded.state, attempts = 0, "
            "payload = excluded.payload, not_before = excluded.not_before, last_error = NULL, "
            "max_attempts = excluded.max_attempts WHERE queue_items.state = $8 "
            "RETURNING item_id",
            queue,
            key,
            _dumps(payload),
            QueueState.READY.value,
            max_attempts,
            not_before,
            self._now(),
            QueueState.DEAD.value,
        )
        return None if row is None else int(row["item_id"])

    async def enqueue(
        self,
        queue: str,
        payload: Mapping[str, object],
        *,
        key: str | None = None,
        not_before: datetime | None = None,
        max_attempts: int = 10,
    ) -> int | None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        when = self._now() if not_before is None else to_micros(not_before)
        return await self._run(
            lambda tx: self._enqueue(tx, queue, payload, key, when, max_attempts)
        )

    async def claim(
        self, queue: str, *, limit: int = 10, lease_seconds: float = 300
    ) -> list[QueueItem]:
        async def work(tx: Tx) -> list[QueueItem]:
            now = self._now()
            await tx.execute(
                "UPDATE queue_items SET state = $1, last_error = COALESCE(last_error, $2) "
                "WHERE queue = $3 AND state = $4 AND not_before <= $5 AND attempts >= max_attempts",
                QueueState.DEAD.value,
                "lease expired on the last attempt",
                queue,
                QueueState.READY.value,
                now,
            )
            rows = await tx.fetch(
                "SELECT item_id FROM queue_items WHERE queue = $1 AND state = $2 "
                "AND not_before <= $3 ORDER BY not_before, item_id "
                f"LIMIT $4{self.dialect.skip_locked}",
                queue,
                QueueState.READY.value,
                now,
                limit,
            )
            claimed: list[QueueItem] = []
            lease_until = now + int(lease_seconds * 1_000_000)
            for row in rows:
                updated = await tx.fetchrow(
                    "UPDATE queue_items SET attempts = attempts + 1, not_before = $2 "
                    "WHERE item_id = $1 RETURNING *",
                    row["item_id"],
                    lease_until,
                )
                if updated is not None:
                    claimed.append(_queue_item(updated))
            return claimed

        return await self._run(work)

    async def ack(self, item_id: int) -> None:
        await self._run(
            lambda tx: tx.execute("DELETE FROM queue_items WHERE item_id = $1", item_id)
        )

    async def retry_later(self, item_id: int, *, error: str, backoff: Backoff) -> bool:
        async def work(tx: Tx) -> bool:
            row = await tx.fetchrow(
                f"SELECT attempts, max_attempts FROM queue_items WHERE item_id = $1"
                f"{self.dialect.for_update}",
                item_id,
            )
            if row is None:
                return False
            if row["attempts"] >= row["max_attempts"]:
                await tx.execute(
                    "UPDATE queue_items SET state = $2, last_error = $3 WHERE item_id = $1",
                    item_id,
                    QueueState.DEAD.value,
                    error[:4000],
                )
                return False
            retry_at = backoff.next_time(row["attempts"], self._clock())
            await tx.execute(
                "UPDATE queue_items SET not_before = $2, last_error = $3 WHERE item_id = $1",
                item_id,
                to_micros(retry_at),
                error[:4000],
            )
            return True

        return await self._run(work)

    async def list_dead(self, queue: str, limit: int = 100) -> list[QueueItem]:
        async def work(tx: Tx) -> list[QueueItem]:
            rows = await tx.fetch(
                "SELECT * FROM queue_items WHERE queue = $1 AND state = $2 "
                "ORDER BY item_id LIMIT $3",
                queue,
                QueueState.DEAD.value,
                limit,
            )
            return [_queue_item(r) for r in rows]

        return await self._run(work)

    async def revive(self, item_id: int) -> None:
        async def work(tx: Tx) -> None:
            changed = await tx.execute(
                "UPDATE queue_items SET state = $2, attempts = 0, not_before = $3 "
                "WHERE item_id = $1 AND state = $4",
                item_id,
                QueueState.READY.value,
                self._now(),
                QueueState.DEAD.value,
            )
            if not changed:
                raise NotFound(f"no dead queue item {item_id}")

        await self._run(work)

    async def queue_depth(self, queue: str) -> dict[str, int]:
        async def work(tx: Tx) -> dict[str, int]:
            rows = await tx.fetch(
                "SELECT state, COUNT(*) AS n FROM queue_items WHERE queue = $1 GROUP BY state",
                queue,
            )
            return {str(r["state"]): int(r["n"]) for r in rows}

        return await self._run(work)

    # -- multipart uploads -----------------------------------------------------------
    async def create_upload(self, upload: MultipartUpload) -> None:
        async def work(tx: Tx) -> None:
            if (
                await tx.fetchrow("SELECT 1 AS x FROM buckets WHERE name = $1", upload.bucket)
                is None
            ):
                raise NotFound(f"bucket {upload.bucket!r} does not exist")
            changed = await tx.execute(
                "INSERT INTO multipart_uploads (upload_id, bucket, key, headers, user_metadata, "
                "created_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (upload_id) DO NOTHING",
                upload.upload_id,
                upload.bucket,
                upload.key,
                _dumps(upload.headers),
                _dumps(upload.user_metadata),
                to_micros(upload.created_at),
            )
            if not changed:
                raise AlreadyExists(f"upload {upload.upload_id} already exists")

        await self._run(work)

    async def get_upload(self, upload_id: str) -> MultipartUpload | None:
        async def work(tx: Tx) -> MultipartUpload | None:
            row = await tx.fetchrow(
                "SELECT * FROM multipart_uploads WHERE upload_id = $1", upload_id
            )
            return None if row is None else _upload(row)

        return await self._run(work)

    async def list_uploads(
        self,
        bucket: str,
        *,
        prefix: str = "",
        key_marker: str | None = None,
        upload_id_marker: str | None = None,
        limit: int = 1000,
    ) -> list[MultipartUpload]:
        async def work(tx: Tx) -> list[MultipartUpload]:
            if key_marker is None:
                rows = await tx.fetch(
                    "SELECT * FROM multipart_uploads WHERE bucket = $1 AND key >= $2 "
                    "ORDER BY key, upload_id LIMIT $3",
                    bucket,
                    prefix,
                    limit,
                )
            else:
                rows = await tx.fetch(
                    "SELECT * FROM multipart_uploads WHERE bucket = $1 AND key >= $2 "
                    "AND (key > $3 OR (key = $3 AND upload_id > $4)) "
                    "ORDER BY key, upload_id LIMIT $5",
                    bucket,
                    prefix,
                    key_marker,
                    upload_id_marker or "",
                    limit,
                )
            found: list[MultipartUpload] = []
            for row in rows:  # keys under the prefix form a leading run of the ordered rows
                if not row["key"].startswith(prefix):
                    break
                found.append(_upload(row))
            return found

        return await self._run(work)

    async def _locked_upload(self, tx: Tx, upload_id: str) -> Row:
        row = await tx.fetchrow(
            f"SELECT * FROM multipart_uploads WHERE upload_id = $1{self.dialect.for_update}",
            upload_id,
        )
        if row is None:
            raise NotFound(f"upload {upload_id} does not exist")
        return row

    async def put_part(
        self,
        upload_id: str,
        part_number: int,
        version_id: str,
        *,
        size: int,
        etag: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        async def work(tx: Tx) -> None:
            await self._locked_upload(tx, upload_id)
            await self._uploading(tx, version_id, VersionKind.PART)
            await self._complete(tx, version_id, size, etag, headers, None)
            old = await tx.fetchrow(
                "SELECT version_id FROM parts WHERE upload_id = $1 AND part_number = $2",
                upload_id,
                part_number,
            )
            await tx.execute(
                "INSERT INTO parts (upload_id, part_number, version_id, size, etag, created_at) "
                "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (upload_id, part_number) DO UPDATE "
                "SET version_id = excluded.version_id, size = excluded.size, "
                "etag = excluded.etag, created_at = excluded.created_at",
                upload_id,
                part_number,
                version_id,
                size,
                etag,
                self._now(),
            )
            if old is not None:
                await self._drop_version(tx, old["version_id"])

        await self._run(work)

    async def list_parts(self, upload_id: str, *, marker: int = 0, limit: int = 1000) -> list[Part]:
        async def work(tx: Tx) -> list[Part]:
            rows = await tx.fetch(
                "SELECT p.*, v.headers AS part_headers FROM parts p "
                "JOIN versions v ON v.version_id = p.version_id "
                "WHERE p.upload_id = $1 AND p.part_number > $2 "
                "ORDER BY p.part_number LIMIT $3",
                upload_id,
                marker,
                limit,
            )
            return [
                Part(
                    r["upload_id"],
                    r["part_number"],
                    r["version_id"],
                    r["size"],
                    r["etag"],
                    from_micros(r["created_at"]),
                    _loads(r["part_headers"]),
                )
                for r in rows
            ]

        return await self._run(work)

    async def complete_upload(
        self,
        upload_id: str,
        version_id: str,
        parts: Sequence[tuple[int, str]],
        *,
        etag: str,
        manifest: tuple[NewChunk, Sequence[tuple[Location, int | None]]] | None = None,
        precondition: WritePrecondition | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> CommitResult:
        async def work(tx: Tx) -> CommitResult:
            upload = await self._locked_upload(tx, upload_id)
            headers = upload["headers"]
            if extra_headers:
                headers = _dumps({**_loads(headers), **extra_headers})
            stored = {
                r["part_number"]: r
                for r in await tx.fetch("SELECT * FROM parts WHERE upload_id = $1", upload_id)
            }
            part_refs: dict[int, list[Row]] = {}
            for ref in await tx.fetch(
                'SELECT p.part_number, r."offset", r.length, r.chunk_id, r.chunk_offset '
                "FROM parts p JOIN chunk_refs r ON r.version_id = p.version_id "
                "WHERE p.upload_id = $1 ORDER BY p.part_number, r.seq",
                upload_id,
            ):
                part_refs.setdefault(int(ref["part_number"]), []).append(ref)
            refs: list[ChunkRef] = []
            offset = 0
            for number, part_etag in parts:
                part = stored.get(number)
                if part is None:
                    raise InvalidPart(number, "was not uploaded")
                if part["etag"].strip('"') != part_etag.strip('"'):
                    raise InvalidPart(number, "etag does not match the uploaded part")
                for ref in part_refs.get(number, []):
                    refs.append(
                        ChunkRef(
                            len(refs), offset, ref["length"], ref["chunk_id"], ref["chunk_offset"]
                        )
                    )
                    offset += ref["length"]
            now = self._now()
            await tx.execute(
                "INSERT INTO versions (version_id, bucket, key, kind, state, size, etag, headers, "
                "user_metadata, created_at, completed_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                version_id,
                upload["bucket"],
                upload["key"],
                VersionKind.OBJECT.value,
                VersionState.COMPLETE.value,
                offset,
                etag,
                headers,
                upload["user_metadata"],
                upload["created_at"],
                now,
            )
            await self._incref(tx, [r.chunk_id for r in refs])
            if manifest is not None:
                record, locations = manifest
                await self._insert_chunk(tx, record)
                refs.append(ChunkRef(len(refs), offset, 0, record.chunk_id))
                for location, reservation_id in locations:
                    await self._insert_location(tx, location, reservation_id)
            await self._insert_refs(tx, version_id, refs)
            freed = await self._drop_upload(tx, upload_id)
            version = await tx.fetchrow("SELECT * FROM versions WHERE version_id = $1", version_id)
            assert version is not None
            result = await self._make_current(tx, version, offset, etag, precondition)
            return CommitResult(
                result.version_id,
                result.is_current,
                result.replaced_version_id,
                tuple(freed) + result.freed_chunk_ids,
            )

        return await self._run(work)

    async def abort_upload(self, upload_id: str) -> None:
        async def work(tx: Tx) -> None:
            row = await tx.fetchrow(
                "SELECT upload_id FROM multipart_uploads WHERE upload_id = $1"
                f"{self.dialect.for_update}",
                upload_id,
            )
            if row is not None:
                await self._drop_upload(tx, upload_id)

        await self._run(work)

    async def _drop_upload(self, tx: Tx, upload_id: str) -> list[str]:
        """Delete an upload, its parts and their versions; return the chunks freed."""
        rows = await tx.fetch(
            "DELETE FROM parts WHERE upload_id = $1 RETURNING version_id", upload_id
        )
        freed: list[str] = []
        for row in sorted(rows, key=lambda r: str(r["version_id"])):
            freed += await self._drop_version(tx, row["version_id"])
        await tx.execute("DELETE FROM multipart_uploads WHERE upload_id = $1", upload_id)
        return freed

    # -- locks -----------------------------------------------------------------------
    # -- data keys (encryption) ------------------------------------------------------
    async def list_wrapped_keys(
        self, *, not_key_id: str, after: str = "", limit: int = 500
    ) -> list[WrappedKey]:
        async def work(tx: Tx) -> list[WrappedKey]:
            rows = await tx.fetch(
                "SELECT chunk_id, wrapped_dek, key_id FROM chunks "
                "WHERE wrapped_dek IS NOT NULL AND key_id IS NOT NULL AND key_id <> $1 "
                "AND refcount > 0 AND chunk_id > $2 ORDER BY chunk_id LIMIT $3",
                not_key_id,
                after,
                limit,
            )
            return [WrappedKey(r["chunk_id"], bytes(r["wrapped_dek"]), r["key_id"]) for r in rows]

        return await self._run(work)

    async def set_wrapped_keys(self, updates: Sequence[KeyUpdate]) -> int:
        async def work(tx: Tx) -> int:
            changed = 0
            for u in updates:
                changed += await tx.execute(
                    "UPDATE chunks SET wrapped_dek = $1, key_id = $2 "
                    "WHERE chunk_id = $3 AND key_id = $4",
                    u.wrapped_dek,
                    u.key_id,
                    u.chunk_id,
                    u.old_key_id,
                )
            return changed

        return await self._run(work)

    async def count_chunks_by_key(self) -> dict[str | None, int]:
        async def work(tx: Tx) -> dict[str | None, int]:
            rows = await tx.fetch(
                "SELECT key_id, COUNT(*) AS n FROM chunks WHERE refcount > 0 GROUP BY key_id"
            )
            return {r["key_id"]: int(r["n"]) for r in rows}

        return await self._run(work)

    @abc.abstractmethod
    async def try_lock(self, name: str) -> LeaderLock | None: ...
