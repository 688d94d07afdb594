"""The ``MetadataStore`` protocol: the one door to metadata (DESIGN section 5).

Two implementations share one SQL core (``appliance.meta.sql``): SQLite, the embedded
default, and PostgreSQL for several instances. Every method is one transaction: it
either happens whole or not at all. Errors are those of ``appliance.meta.errors``;
a database that cannot be reached raises ``StoreUnavailable``.

Refcounts: a chunk's refcount is the number of chunk refs naming it. A change that
takes it to zero queues the chunk on the ``gc`` queue (key ``chunk:<id>``) after the
store's GC delay, in the same transaction.

Quota: ``reserve`` is the guard against two writers filling the same space. The
transaction that records a blob's location (``add_chunk``, ``add_location``) turns its
reservation into usage, so ``used_bytes`` always counts the bytes present on a backend
as far as the store knows; ``forget_location`` gives them back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Protocol

from appliance.meta.backoff import Backoff
from appliance.meta.models import (
    BackendSpace,
    BackendSpec,
    Bucket,
    ChunkPlacement,
    ChunkRef,
    ChunkReplicas,
    CommitResult,
    Credential,
    DirListing,
    KeyUpdate,
    ListPage,
    Location,
    MultipartUpload,
    NewChunk,
    NewTombstone,
    ObjectVersion,
    Part,
    QueueItem,
    Reservation,
    Tombstone,
    UsageCounters,
    UsageDelta,
    VersionKind,
    WrappedKey,
    WritePrecondition,
)

GC_QUEUE = "gc"
"""Queue of chunks whose refcount reached zero; payload ``{"chunk_id": ...}``."""
REPLICATE_QUEUE = "replicate"
"""Queue of chunks to bring to their replication factor: payload ``{"chunk_id": ...}``
(key ``chunk:<id>``), or ``{"chunk_id": ..., "bad": <backend>}`` for a replica that
failed verification or is missing (key ``chunk:<id>:<backend>``)."""


class LeaderLock(Protocol):
    """A held singleton lock; ``release`` is idempotent."""

    async def release(self) -> None: ...


class MetadataStore(Protocol):
    """Metadata for buckets, objects, chunks, quota, usage, queues and uploads."""

    @property
    def kind(self) -> str:
        """``"sqlite"`` or ``"postgres"``."""
        ...

    # -- lifecycle -------------------------------------------------------------------
    async def open(self) -> None:
        """Connect and apply pending migrations.

        Raises ``SchemaTooNew`` for a database written by a newer Cairn, ``StoreLocked``
        when another process holds an embedded database, ``StoreUnavailable`` otherwise.
        """
        ...

    async def close(self) -> None: ...

    async def schema_version(self) -> int: ...

    # -- settings --------------------------------------------------------------------
    async def get_setting(self, name: str) -> str | None: ...

    async def set_setting(self, name: str, value: str) -> None: ...

    async def setdefault_setting(self, name: str, value: str) -> str:
        """Store ``value`` unless a value exists; return the stored one (race-free)."""
        ...

    # -- buckets and credentials -----------------------------------------------------
    async def create_bucket(self, name: str) -> Bucket:
        """Raises ``AlreadyExists``."""
        ...

    async def get_bucket(self, name: str) -> Bucket | None: ...

    async def list_buckets(self) -> list[Bucket]: ...

    async def delete_bucket(self, name: str) -> None:
        """Delete an empty bucket and every grant naming it, in one transaction.

        Raises ``NotFound``, or ``BucketNotEmpty`` while objects or uploads remain."""
        ...

    async def bucket_usage(self, name: str) -> tuple[int, int]:
        """(object count, logical bytes) of the bucket's current objects; (0, 0) when absent."""
        ...

    async def all_bucket_usage(self) -> dict[str, tuple[int, int]]:
        """``bucket_usage`` of every bucket holding objects, in one query."""
        ...

    async def put_credential(self, credential: Credential) -> None:
        """Create or replace a credential and its grants (idempotent)."""
        ...

    async def get_credential(self, access_key: str) -> Credential | None: ...

    async def list_credentials(self) -> list[Credential]: ...

    async def delete_credential(self, access_key: str) -> None:
        """Idempotent."""
        ...

    # -- versions and objects --------------------------------------------------------
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
        """Record a new UPLOADING version. Raises ``NotFound`` (bucket), ``AlreadyExists``."""
        ...

    async def add_chunk(
        self,
        version_id: str,
        ref: ChunkRef,
        chunk: NewChunk,
        locations: Sequence[tuple[Location, int | None]],
    ) -> None:
        """Record a newly written chunk, its ref in the version and its replicas.

        Each location comes with the reservation that paid for it (or None); that
        reservation becomes usage. Raises ``Conflict`` unless the version is UPLOADING
        (the janitor may have aborted it): the caller then owns its blobs' cleanup.
        """
        ...

    async def add_refs(self, version_id: str, refs: Sequence[ChunkRef]) -> None:
        """Reference existing chunks from an UPLOADING version (copies, partial rewrites).

        Raises ``Conflict`` if the version is not UPLOADING or a chunk is unreferenced
        (refcount 0 chunks are on their way to deletion and cannot be revived).
        """
        ...

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
        """Make an UPLOADING object version COMPLETE and current if it is the newest.

        ``precondition`` is checked in the same transaction (``PreconditionFailed``,
        and the version stays UPLOADING for the caller to abort).

        Of two versions of one key the one with the larger version id wins, whatever
        order they commit in; the loser is dropped at once. Leftover reservations of
        the version are released. Raises ``NotFound`` or ``Conflict`` (not UPLOADING).
        """
        ...

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
        """Record a one-chunk object version whose chunk is already stored and commit it,
        in one transaction: ``begin_version``, ``add_chunk`` and ``commit_version``.

        Nothing is recorded when it raises ``NotFound`` (bucket), ``AlreadyExists``
        (the version id) or ``PreconditionFailed``: the chunk's blobs and reservations
        are then the caller's to remove (``abort_version`` releases the reservations).
        """
        ...

    async def abort_version(self, version_id: str) -> tuple[str, ...]:
        """Drop an UPLOADING version, its refs and reservations; idempotent.

        Returns the chunk ids freed. Raises ``Conflict`` for a COMPLETE version.
        """
        ...

    async def get_version(self, version_id: str) -> ObjectVersion | None: ...

    async def get_current(self, bucket: str, key: str) -> ObjectVersion | None: ...

    async def set_current_header(
        self, bucket: str, key: str, name: str, value: str | None
    ) -> ObjectVersion:
        """Set (or with None remove) one stored header of the key's current version, in
        place: no new version, ETag and dates unchanged (for object tags). Raises
        ``NotFound`` when the key has no current version."""
        ...

    async def get_layout(self, version_id: str) -> list[ChunkPlacement]:
        """Refs of a version in order, each with its chunk and replicas (one query)."""
        ...

    async def get_upload_layout(self, upload_id: str) -> dict[int, list[ChunkPlacement]]:
        """Every uploaded part's layout by part number (one query)."""
        ...

    async def delete_objects(
        self,
        bucket: str,
        keys: Sequence[str],
        *,
        tombstones: Mapping[str, NewTombstone] | None = None,
    ) -> list[str]:
        """Remove the current versions of ``keys`` in one transaction; return the keys
        that existed (absent keys are no error). ``tombstones`` by key are recorded as
        ``delete_object`` records its tombstone (those of absent keys are not)."""
        ...

    async def delete_object(
        self, bucket: str, key: str, *, tombstone: NewTombstone | None = None
    ) -> str | None:
        """Remove the current version of a key; return its id, or None if absent.

        ``tombstone`` (its blobs already written under the key's prefix) is recorded in
        the same transaction when a version was removed: it replaces the key's earlier
        tombstone (whose chunk goes to the gc queue) and its locations' reservations
        become usage. It must be newer than the version removed, else ``Conflict`` and
        nothing changes. When the key was absent nothing is recorded: the caller removes
        the tombstone's blobs. Until a newer version of the key commits, a commit of an
        older one loses to the tombstone (as to a newer version).
        """
        ...

    async def list_tombstones(self, *, after: str = "", limit: int = 100) -> list[Tombstone]:
        """Recorded tombstones with a version id greater than ``after``, in version id
        order (a resumable scan for the tombstone sweeper)."""
        ...

    async def drop_tombstone(self, version_id: str) -> bool:
        """Forget a tombstone no longer needed and queue its chunk for deletion (at once,
        not after the GC delay); False when it was already gone. Idempotent."""
        ...

    async def list_objects(
        self,
        bucket: str,
        *,
        prefix: str = "",
        delimiter: str | None = None,
        start_after: str | None = None,
        limit: int = 1000,
    ) -> ListPage:
        """List current objects in key order (UTF-8 byte order), grouping by delimiter.

        ``start_after`` may be a key or a common prefix returned earlier; a common
        prefix is skipped whole.
        """
        ...

    async def list_directory(
        self,
        bucket: str,
        *,
        prefix: str,
        delimiter: str = "/",
        start_after: str | None = None,
        limit: int = 1000,
    ) -> DirListing:
        """Like ``list_objects`` with a delimiter, but each row carries the current
        version (attributes and user metadata), and each common prefix the version of
        its marker key (the key equal to the prefix) if there is one: a directory page
        with everything ``readdir`` shows, in one query per page (a few more when it
        skips common prefixes). ``next_marker`` is the last row's key."""
        ...

    async def list_stale_versions(self, older_than: datetime, limit: int = 100) -> list[str]:
        """Ids of UPLOADING versions idle since before ``older_than`` (janitor input):
        created before it, and no chunk added since. A long upload that keeps adding
        chunks is never listed."""
        ...

    # -- chunks and locations --------------------------------------------------------
    async def add_location(self, location: Location, reservation_id: int | None) -> None:
        """Record another replica of an existing chunk (replication); idempotent."""
        ...

    async def get_locations(self, chunk_id: str) -> list[Location]: ...

    async def get_chunk_replicas(self, chunk_id: str) -> ChunkReplicas | None:
        """A chunk with its replicas and referencing buckets; None when it is unknown."""
        ...

    async def scan_chunks(self, *, after: str = "", limit: int = 500) -> list[ChunkReplicas]:
        """Referenced chunks (refcount > 0) with chunk id greater than ``after``, in chunk
        id order, with their replicas and buckets (a resumable scan)."""
        ...

    async def list_locations(
        self, backend: str, *, after: str = "", limit: int = 1000
    ) -> list[Location]:
        """Replicas recorded on ``backend`` with blob key greater than ``after``, in blob
        key order (a resumable scan, for consistency checks)."""
        ...

    async def claim_garbage(self, chunk_id: str) -> list[Location] | None:
        """Locations of a chunk if it is unreferenced (to delete), else None."""
        ...

    async def forget_location(self, chunk_id: str, backend: str) -> None:
        """Drop a replica record after its blob was deleted, returning its bytes to the
        backend's quota; drops the chunk when it has no refs and no replicas left.
        Idempotent."""
        ...

    # -- quota -----------------------------------------------------------------------
    async def sync_backends(self, specs: Sequence[BackendSpec]) -> None:
        """Create or update quota rows from the configuration; usage is kept."""
        ...

    async def get_space(self) -> list[BackendSpace]: ...

    async def reserve(self, backend: str, nbytes: int, *, owner: str) -> Reservation | None:
        """Reserve ``nbytes`` on ``backend`` atomically; None when it would exceed quota.

        Raises ``NotFound`` for an unknown backend.
        """
        ...

    async def release_reservation(
        self, reservation_id: int, *, backend: str | None = None, nbytes: int | None = None
    ) -> None:
        """Give back an unused reservation (the blob write failed); idempotent.

        With ``backend`` and ``nbytes``, give back only that part of it (a blob's share
        of a lease), deleting it once empty: each part must be given back once."""
        ...

    async def release_stale_reservations(
        self, older_than: datetime, *, owner_prefix: str | None = None
    ) -> int:
        """Release reservations made before ``older_than`` (only those whose owner starts
        with ``owner_prefix``, when given); return how many."""
        ...

    # -- usage counters --------------------------------------------------------------
    async def add_usage(self, deltas: Sequence[UsageDelta]) -> None: ...

    async def get_usage(self, month: str) -> list[UsageCounters]: ...

    # -- durable queues --------------------------------------------------------------
    async def enqueue(
        self,
        queue: str,
        payload: Mapping[str, object],
        *,
        key: str | None = None,
        not_before: datetime | None = None,
        max_attempts: int = 10,
    ) -> int | None:
        """Add an item; with a ``key`` an item already pending is kept (idempotent) and a
        dead one is revived. Returns the new item's id, or None if one was kept."""
        ...

    async def claim(
        self, queue: str, *, limit: int = 10, lease_seconds: float = 300
    ) -> list[QueueItem]:
        """Take ready items whose time has come; each is hidden for ``lease_seconds``
        and its ``attempts`` counts this claim. Items out of attempts go dead."""
        ...

    async def ack(self, item_id: int) -> None:
        """The item is done: delete it. Idempotent."""
        ...

    async def retry_later(self, item_id: int, *, error: str, backoff: Backoff) -> bool:
        """Record a failure; reschedule with backoff, or dead-letter after the last
        attempt. Returns True if it will be retried."""
        ...

    async def list_dead(self, queue: str, limit: int = 100) -> list[QueueItem]: ...

    async def revive(self, item_id: int) -> None:
        """Put a dead item back to ready with its attempts reset."""
        ...

    async def queue_depth(self, queue: str) -> dict[str, int]:
        """Count of items per state in ``queue``."""
        ...

    # -- multipart uploads -----------------------------------------------------------
    async def create_upload(self, upload: MultipartUpload) -> None:
        """Raises ``NotFound`` (bucket) or ``AlreadyExists``."""
        ...

    async def get_upload(self, upload_id: str) -> MultipartUpload | None: ...

    async def list_uploads(
        self,
        bucket: str,
        *,
        prefix: str = "",
        key_marker: str | None = None,
        upload_id_marker: str | None = None,
        limit: int = 1000,
    ) -> list[MultipartUpload]: ...

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
        """Complete an UPLOADING part version and attach it, replacing any earlier
        upload of that part number. Raises ``NotFound`` (upload) or ``Conflict``."""
        ...

    async def list_parts(
        self, upload_id: str, *, marker: int = 0, limit: int = 1000
    ) -> list[Part]: ...

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
        """Assemble the listed (part number, etag) pairs into a new current version by
        reference only: no bytes move. Unlisted parts are dropped. ``manifest`` is the
        version's manifest blob, recorded as a zero-length last ref (its reservations
        become usage). ``extra_headers`` are stored with the upload's headers.

        Raises ``NotFound`` (upload) or ``InvalidPart`` naming the first part that is
        missing or whose etag differs.
        """
        ...

    async def abort_upload(self, upload_id: str) -> None:
        """Drop an upload and its parts; idempotent."""
        ...

    # -- data keys (encryption) ------------------------------------------------------
    async def list_wrapped_keys(
        self, *, not_key_id: str, after: str = "", limit: int = 500
    ) -> list[WrappedKey]:
        """Chunks with a wrapped data key under a key id other than ``not_key_id`` and a
        chunk id greater than ``after``, in chunk id order (a resumable scan)."""
        ...

    async def set_wrapped_keys(self, updates: Sequence[KeyUpdate]) -> int:
        """Replace wrapped data keys, each only if the chunk's key id is still its
        ``old_key_id`` (so two rotations never undo each other); returns rows changed.
        Idempotent."""
        ...

    async def count_chunks_by_key(self) -> dict[str | None, int]:
        """Live chunks (refcount > 0) per master key id; ``None`` counts unencrypted
        chunks."""
        ...

    # -- singleton workers -----------------------------------------------------------
    async def try_lock(self, name: str) -> LeaderLock | None:
        """Take a named lock held until released or the process ends; None if taken."""
        ...
