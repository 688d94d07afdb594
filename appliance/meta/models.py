"""Domain records of the metadata store (DESIGN section 3).

bucket -> object (bucket, key) -> current version -> ordered chunk refs -> chunk
(immutable, refcounted) -> locations (backend, blob key). All instants are aware UTC.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime


class VersionState(enum.StrEnum):
    """Life of a version: written as UPLOADING, made COMPLETE by one transaction."""

    UPLOADING = "UPLOADING"
    COMPLETE = "COMPLETE"
    ABORTED = "ABORTED"


class VersionKind(enum.StrEnum):
    """An object version proper, or the data of one multipart part."""

    OBJECT = "object"
    PART = "part"


class Permission(enum.StrEnum):
    """What a credential may do in a bucket."""

    READ = "read"
    WRITE = "write"
    LIST = "list"
    DELETE = "delete"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Bucket:
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Credential:
    """An access key. ``secret`` is stored as given: the service layer seals it."""

    access_key: str
    secret: str
    created_at: datetime
    description: str = ""
    grants: Mapping[str, frozenset[Permission]] = field(default_factory=dict)
    """Permissions per bucket name; ``"*"`` stands for every bucket."""


@dataclass(frozen=True, slots=True)
class ObjectVersion:
    """One version of an object (or of a multipart part)."""

    version_id: str
    bucket: str
    key: str
    state: VersionState
    kind: VersionKind
    created_at: datetime
    size: int = 0
    etag: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Content-Type, Cache-Control and the other stored HTTP headers."""
    user_metadata: Mapping[str, str] = field(default_factory=dict)
    completed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class NewChunk:
    """A chunk about to be recorded; refcount starts at the refs that name it."""

    chunk_id: str
    size: int
    sha256: bytes
    stored_size: int
    wrapped_dek: bytes | None = None
    key_id: str | None = None


@dataclass(frozen=True, slots=True)
class Chunk:
    chunk_id: str
    size: int
    sha256: bytes
    stored_size: int
    refcount: int
    created_at: datetime
    wrapped_dek: bytes | None = None
    key_id: str | None = None


@dataclass(frozen=True, slots=True)
class Location:
    """One replica of a chunk: a blob on a backend."""

    chunk_id: str
    backend: str
    blob_key: str
    stored_size: int


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """Bytes ``[chunk_offset, chunk_offset+length)`` of a chunk at ``offset`` of a version."""

    seq: int
    offset: int
    length: int
    chunk_id: str
    chunk_offset: int = 0


@dataclass(frozen=True, slots=True)
class ChunkReplicas:
    """A chunk, its replicas, and the buckets whose versions reference it (for the
    replication factor it wants; empty for a chunk no version references)."""

    chunk: Chunk
    locations: tuple[Location, ...]
    buckets: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ChunkPlacement:
    """What a reader needs for one ref: the ref, its chunk and where replicas are."""

    ref: ChunkRef
    chunk: Chunk
    locations: tuple[Location, ...]


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """Configured facts about a backend that the store keeps (quota, limits)."""

    name: str
    quota_bytes: int | None


@dataclass(frozen=True, slots=True)
class BackendSpace:
    """A backend's quota ledger: bytes stored, bytes reserved by writes in flight."""

    name: str
    quota_bytes: int | None
    used_bytes: int
    reserved_bytes: int

    @property
    def free_bytes(self) -> int | None:
        """Room left for new reservations; None when the quota is unlimited."""
        if self.quota_bytes is None:
            return None
        return max(0, self.quota_bytes - self.used_bytes - self.reserved_bytes)


@dataclass(frozen=True, slots=True)
class Reservation:
    reservation_id: int
    backend: str
    nbytes: int
    owner: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class UsageDelta:
    """Counts to add to a backend's monthly usage (month is ``YYYY-MM``, UTC)."""

    backend: str
    month: str
    requests: int = 0
    egress_bytes: int = 0
    ingress_bytes: int = 0


@dataclass(frozen=True, slots=True)
class UsageCounters:
    backend: str
    month: str
    requests: int
    egress_bytes: int
    ingress_bytes: int


class QueueState(enum.StrEnum):
    READY = "ready"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class QueueItem:
    """A durable unit of background work. ``attempts`` counts claims so far."""

    item_id: int
    queue: str
    key: str | None
    payload: Mapping[str, object]
    attempts: int
    max_attempts: int
    not_before: datetime
    state: QueueState
    last_error: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class MultipartUpload:
    upload_id: str
    bucket: str
    key: str
    created_at: datetime
    headers: Mapping[str, str] = field(default_factory=dict)
    user_metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Part:
    upload_id: str
    part_number: int
    version_id: str
    size: int
    etag: str
    created_at: datetime
    headers: Mapping[str, str] = field(default_factory=dict)
    """What the part's upload stored with it (e.g. its ``x-amz-checksum-*``)."""


@dataclass(frozen=True, slots=True)
class ListEntry:
    key: str
    version_id: str
    size: int
    etag: str
    last_modified: datetime


@dataclass(frozen=True, slots=True)
class ListPage:
    """One page of a listing; ``next_marker`` resumes after the last key or prefix given."""

    entries: tuple[ListEntry, ...]
    common_prefixes: tuple[str, ...]
    truncated: bool
    next_marker: str | None


@dataclass(frozen=True, slots=True)
class DirRow:
    """One name of a directory listing (``MetadataStore.list_directory``).

    ``key`` is an object's key, or a common prefix (ending with the delimiter) with
    ``is_prefix``. ``version`` is the object's current version; for a common prefix, the
    current version of the key equal to the prefix (a directory marker), or None.
    """

    key: str
    is_prefix: bool
    version: ObjectVersion | None


@dataclass(frozen=True, slots=True)
class DirListing:
    """One page of ``list_directory``; ``next_marker`` resumes after the last row."""

    rows: tuple[DirRow, ...]
    truncated: bool
    next_marker: str | None


@dataclass(frozen=True, slots=True)
class CommitResult:
    """Outcome of a commit: whether this version is now current, and what it replaced."""

    version_id: str
    is_current: bool
    replaced_version_id: str | None
    freed_chunk_ids: tuple[str, ...]
    """Chunks whose refcount reached zero in this transaction (queued for deletion)."""


@dataclass(frozen=True, slots=True)
class WritePrecondition:
    """A conditional write: ``if_none_match`` (``*``: the key must not exist),
    ``if_match`` (the current object's ETag must be this) or ``if_version_id`` (the
    current version must be this one: background rewrites)."""

    if_none_match: bool = False
    if_match: str | None = None
    if_version_id: str | None = None


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A chunk's wrapped data key and the id of the master key that wrapped it."""

    chunk_id: str
    wrapped_dek: bytes
    key_id: str


@dataclass(frozen=True, slots=True)
class KeyUpdate:
    """Re-wrapped data key of a chunk; applied only while its key id is still ``old_key_id``."""

    chunk_id: str
    old_key_id: str
    wrapped_dek: bytes
    key_id: str


@dataclass(frozen=True, slots=True)
class NewTombstone:
    """A tombstone blob written for a delete (docs/FORMAT.md), to record with it: its
    version id (newer than the version deleted), its chunk (size 0) and its replicas,
    each with the reservation that paid for it."""

    version_id: str
    chunk: NewChunk
    locations: tuple[tuple[Location, int | None], ...]


@dataclass(frozen=True, slots=True)
class Tombstone:
    """The recorded tombstone of a deleted key (the newest delete of that key)."""

    bucket: str
    key: str
    version_id: str
    chunk_id: str
    created_at: datetime
