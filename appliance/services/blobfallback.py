"""Reads without the metadata store: a key's current version found from its blobs.

The second tier of reads while the metadata store is unreachable (DESIGN section 4,
docs/replication.md "When the metadata store is unreachable"): every blob describes
itself (docs/FORMAT.md), so the current version of a key is found by listing the key's
prefixes on every backend:

- the prefixes are those writes use: SHA-256 of bucket and key, and the HMAC with the
  pool secret (encrypted buckets). Both are listed, since a bucket whose encryption
  changed holds versions under both; the secret is kept in memory from startup;
- blob names are ``<prefix>/<version id>/<name>`` and version ids sort by creation
  time, so versions are tried newest first: a ``tombstone`` means the key was deleted
  (None); a ``manifest`` or a ``000000`` whose header carries the object identity with
  every other chunk listed is the version served; anything else (a multipart part, a
  version still being written or half collected) is skipped;
- a backend that cannot be listed may hold the newest version: when more backends are
  unlisted than the bucket's write quorum minus one (every acknowledged chunk 0,
  manifest and tombstone has at least the quorum's replicas), ``MetadataUnavailable``
  (503) is raised rather than risking an older version.

The result is a version and a layout like the store's (replicas = the backends where
each blob was listed), read by the normal streaming path: ranges, failover, decryption,
cache. Headers are read with small ranged GETs; sealed identities and manifests are
opened with the data key from the blob header (the master key ring is in memory).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from appliance.crypto.store import EncryptingChunkStore
from appliance.data.blobformat import (
    CHUNK0_NAME,
    FORMAT_VERSION_SEALED,
    MANIFEST_NAME,
    TOMBSTONE_NAME,
    BlobFormatError,
    ChunkHeader,
    Manifest,
    ObjectIdentity,
    decode_chunk_header,
    decode_manifest,
    decode_manifest_body,
    decode_sealed_manifest,
    decode_sealed_part,
    header_size,
    object_prefix,
)
from appliance.errors import BackendsUnavailable, DataCorrupted, MetadataUnavailable
from appliance.ids import sortable_id_time_ms
from appliance.meta.models import (
    Chunk,
    ChunkPlacement,
    ChunkRef,
    Location,
    ObjectVersion,
    VersionKind,
    VersionState,
)
from appliance.placement.pool import PoolState
from appliance.placement.replication import ReplicationPolicy
from backends.base import ByteRange
from backends.errors import BackendError, BlobNotFound

log = logging.getLogger("cairn.fallback")

HEAD_PROBE = 4096
"""Bytes fetched first when reading a blob header (most headers fit)."""
VERSION_ID_LENGTH = 26


@dataclass
class VersionBlobs:
    """The blobs of one version under one prefix: blob name -> backends holding it."""

    prefix: str
    blobs: dict[str, dict[str, int]] = field(default_factory=dict)
    """Blob name (``000000``, ``manifest``, ``tombstone``) -> {backend: stored size}."""


@dataclass
class PrefixListing:
    """What listing a key's prefixes on every backend found."""

    versions: dict[str, VersionBlobs] = field(default_factory=dict)
    """By version id."""
    unlisted: dict[str, str] = field(default_factory=dict)
    """Backends that could not be listed, with the reason."""

    def newest_first(self) -> list[str]:
        return sorted(self.versions, reverse=True)


class BlobFallback:
    """Finds and describes a key's current version from its blobs (module docstring)."""

    def __init__(
        self,
        pool: PoolState,
        crypto: EncryptingChunkStore,
        replication: ReplicationPolicy,
        *,
        list_timeout: float = 10.0,
        concurrency: int = 8,
    ) -> None:
        self._pool = pool
        self._crypto = crypto
        self._replication = replication
        self._list_timeout = list_timeout
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self.served = 0
        """Versions opened from blobs (for logs and tests)."""

    # -- listing ---------------------------------------------------------------------
    def prefixes(self, bucket: str, key: str) -> tuple[str, ...]:
        """Every prefix a version of the key may live under (clear and hidden names)."""
        plain = object_prefix(bucket, key)
        hidden = object_prefix(bucket, key, self._crypto.policy.secret)
        return (plain,) if hidden == plain else (plain, hidden)

    async def scan(self, bucket: str, key: str) -> PrefixListing:
        """List the key's prefixes on every configured backend, at once."""
        listing = PrefixListing()
        names = self._pool.names()
        prefixes = self.prefixes(bucket, key)
        jobs = [(name, prefix) for name in names for prefix in prefixes]
        results = await asyncio.gather(
            *(self._list(name, prefix) for name, prefix in jobs), return_exceptions=True
        )
        for (name, prefix), result in zip(jobs, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, BackendError | TimeoutError):
                    raise result
                listing.unlisted[name] = str(result) or type(result).__name__
                continue
            for version_id, blob, size in result:
                found = listing.versions.setdefault(version_id, VersionBlobs(prefix))
                found.blobs.setdefault(blob, {})[name] = size
        return listing

    async def _list(self, name: str, prefix: str) -> list[tuple[str, str, int]]:
        """(version id, blob name, stored size) of the blobs under ``prefix`` on ``name``."""
        found: list[tuple[str, str, int]] = []
        start = len(prefix) + 1
        async with asyncio.timeout(self._list_timeout):
            async for info in self._pool.backend(name).list(prefix + "/"):
                version_id, _, blob = info.key[start:].partition("/")
                if len(version_id) == VERSION_ID_LENGTH and blob and "/" not in blob:
                    found.append((version_id, blob, info.size))
        return found

    def check_listed(self, bucket: str, listing: PrefixListing) -> None:
        """Raise ``MetadataUnavailable`` when the unlisted backends may hide a newer
        version: more of them than the bucket's write quorum minus one."""
        allowed = self._replication.quorum_for(bucket) - 1
        if len(listing.unlisted) > allowed:
            detail = "; ".join(f"{n}: {why}" for n, why in sorted(listing.unlisted.items()))
            raise MetadataUnavailable(
                "the metadata store is unavailable and the newest version cannot be "
                f"told from the blobs: backends not listed: {detail}"
            )

    # -- opening ---------------------------------------------------------------------
    async def open(
        self, bucket: str, key: str
    ) -> tuple[ObjectVersion, tuple[ChunkPlacement, ...]] | None:
        """The key's current version and layout from its blobs; None when it has none
        (never written, or deleted: a tombstone is the newest).

        Raises ``MetadataUnavailable`` (backends that may hold a newer version could not
        be listed), ``BackendsUnavailable`` (the headers of the version found could not
        be read), ``KeyUnavailable`` (a sealed identity without its master key).
        """
        listing = await self.scan(bucket, key)
        self.check_listed(bucket, listing)
        for version_id in listing.newest_first():
            found = listing.versions[version_id]
            if TOMBSTONE_NAME in found.blobs:
                return None
            try:
                opened = await self._open_version(bucket, key, version_id, found)
            except (BlobFormatError, DataCorrupted) as exc:
                log.warning(
                    "fallback: version %s of %s/%s is unreadable, trying older: %s",
                    version_id,
                    bucket,
                    key,
                    exc,
                )
                continue
            if opened is not None:
                self.served += 1
                log.info("fallback: serving %s/%s version %s from blobs", bucket, key, version_id)
                return opened
        return None

    async def _open_version(
        self, bucket: str, key: str, version_id: str, found: VersionBlobs
    ) -> tuple[ObjectVersion, tuple[ChunkPlacement, ...]] | None:
        if MANIFEST_NAME in found.blobs:
            manifest = await self._read_manifest(found, version_id)
            if not _is(manifest.identity, bucket, key):
                return None
            refs = await self._manifest_layout(manifest)
            return _version(version_id, manifest.identity), refs
        if CHUNK0_NAME not in found.blobs:
            return None
        first = await self._read_chunk(found, version_id, 0)
        identity = first[1]
        if identity is None or not _is(identity, bucket, key):
            return None  # a part, or a version described by a manifest not written yet
        names = [f"{i:06d}" for i in range(identity.chunk_count)]
        if any(name not in found.blobs for name in names):
            return None  # chunks missing: never complete, or being collected
        rest = await asyncio.gather(
            *(self._read_chunk(found, version_id, i) for i in range(1, identity.chunk_count))
        )
        layout: list[ChunkPlacement] = []
        offset = 0
        for index, (chunk, _ident, locations) in enumerate([first, *rest]):
            layout.append(
                ChunkPlacement(
                    ChunkRef(index, offset, chunk.size, chunk.chunk_id), chunk, locations
                )
            )
            offset += chunk.size
        if offset != identity.size:
            raise BlobFormatError(f"chunks hold {offset} bytes, the identity says {identity.size}")
        return _version(version_id, identity), tuple(layout)

    # -- blobs -----------------------------------------------------------------------
    async def _read_chunk(
        self, found: VersionBlobs, version_id: str, index: int
    ) -> tuple[Chunk, ObjectIdentity | None, tuple[Location, ...]]:
        name = f"{index:06d}"
        holders = found.blobs[name]
        blob_key = f"{found.prefix}/{version_id}/{name}"
        header, _ = await self._header(blob_key, holders)
        if header.version_id != version_id or header.index != index:
            raise BlobFormatError(f"blob {blob_key} names version {header.version_id}")
        chunk, identity = await self._describe(header, max(holders.values()))
        return chunk, identity, _locations(chunk.chunk_id, blob_key, holders)

    async def _describe(
        self, header: ChunkHeader, stored_size: int
    ) -> tuple[Chunk, ObjectIdentity | None]:
        """The chunk record a header stands for (opening a sealed header's part)."""
        sha256, identity = header.sha256, header.identity
        if header.encrypted:
            assert header.wrapped_dek is not None and header.key_id is not None
            assert header.sealed is not None
            plain = await self._crypto.open_sealed(
                header.chunk_id, header.wrapped_dek, header.key_id, header.sealed
            )
            sha256, identity = decode_sealed_part(plain)
        chunk = Chunk(
            chunk_id=header.chunk_id,
            size=header.size,
            sha256=sha256,
            stored_size=stored_size,
            refcount=1,
            created_at=_created(header.version_id),
            wrapped_dek=header.wrapped_dek,
            key_id=header.key_id,
        )
        return chunk, identity

    async def _read_manifest(self, found: VersionBlobs, version_id: str) -> Manifest:
        holders = found.blobs[MANIFEST_NAME]
        blob_key = f"{found.prefix}/{version_id}/{MANIFEST_NAME}"
        data = await self._fetch_head(blob_key, holders)
        if data[4] == FORMAT_VERSION_SEALED:
            sealed = decode_sealed_manifest(data)
            plain = await self._crypto.open_sealed(
                sealed.chunk_id, sealed.wrapped_dek, sealed.key_id, sealed.sealed
            )
            manifest = decode_manifest_body(plain)
        else:
            manifest = decode_manifest(data)
        if manifest.version_id != version_id:
            raise BlobFormatError(f"manifest {blob_key} names version {manifest.version_id}")
        return manifest

    async def _manifest_layout(self, manifest: Manifest) -> tuple[ChunkPlacement, ...]:
        """Placements of a manifest's refs: each referenced blob found on the backends
        (a HEAD on each) and described by its header."""
        blobs = sorted({e.blob_key for e in manifest.entries if e.blob_key})
        described = dict(
            zip(blobs, await asyncio.gather(*(self._find_blob(b) for b in blobs)), strict=True)
        )
        layout: list[ChunkPlacement] = []
        for seq, entry in enumerate(manifest.entries):
            if entry.blob_key not in described:
                raise BlobFormatError(f"manifest ref {seq} names no blob")
            chunk, locations = described[entry.blob_key]
            if chunk.chunk_id != entry.chunk_id or chunk.size != entry.chunk_size:
                raise BlobFormatError(f"blob {entry.blob_key} is not chunk {entry.chunk_id}")
            ref = ChunkRef(seq, entry.offset, entry.length, entry.chunk_id, entry.chunk_offset)
            layout.append(ChunkPlacement(ref, chunk, locations))
        return tuple(layout)

    async def _find_blob(self, blob_key: str) -> tuple[Chunk, tuple[Location, ...]]:
        """A blob named by a manifest: the backends holding it and its chunk record."""
        names = self._pool.names()
        sizes = await asyncio.gather(*(self._head(n, blob_key) for n in names))
        holders = {n: size for n, size in zip(names, sizes, strict=True) if size is not None}
        if not holders:
            raise BackendsUnavailable(f"no backend holds {blob_key}, named by a manifest")
        header, _ = await self._header(blob_key, holders)
        chunk, _identity = await self._describe(header, max(holders.values()))
        return chunk, _locations(chunk.chunk_id, blob_key, holders)

    async def _head(self, name: str, blob_key: str) -> int | None:
        try:
            async with self._slots, asyncio.timeout(self._list_timeout):
                return (await self._pool.backend(name).head(blob_key)).size
        except BlobNotFound:
            return None
        except (BackendError, TimeoutError) as exc:
            log.warning("fallback: cannot look for %s on %s: %s", blob_key, name, exc)
            return None

    async def _header(self, blob_key: str, holders: dict[str, int]) -> tuple[ChunkHeader, int]:
        data = await self._fetch_head(blob_key, holders)
        return decode_chunk_header(data)

    async def _fetch_head(self, blob_key: str, holders: dict[str, int]) -> bytes:
        """The whole header of a blob (a manifest's is the whole blob), from the first
        backend that answers. Raises ``BackendsUnavailable``, ``BlobFormatError``."""
        problems: list[str] = []
        for name in holders:
            try:
                async with self._slots, asyncio.timeout(self._list_timeout):
                    data = await self._get(name, blob_key, 0, HEAD_PROBE)
                    total = header_size(data)
                    if total > len(data):
                        data = await self._get(name, blob_key, 0, total)
            except (BackendError, TimeoutError) as exc:
                problems.append(f"{name}: {exc}")
                continue
            return data
        raise BackendsUnavailable(f"cannot read the header of {blob_key}: " + "; ".join(problems))

    async def _get(self, name: str, blob_key: str, start: int, end: int) -> bytes:
        stream = await self._pool.backend(name).get(blob_key, ByteRange(start, end))
        try:
            return b"".join([piece async for piece in stream])
        finally:
            await stream.aclose()


def _is(identity: ObjectIdentity, bucket: str, key: str) -> bool:
    return identity.bucket == bucket and identity.key == key


def _created(version_id: str) -> datetime:
    try:
        return datetime.fromtimestamp(sortable_id_time_ms(version_id) / 1000, UTC)
    except ValueError:
        return datetime.now(UTC)


def _version(version_id: str, identity: ObjectIdentity) -> ObjectVersion:
    created = _created(version_id)
    return ObjectVersion(
        version_id=version_id,
        bucket=identity.bucket,
        key=identity.key,
        state=VersionState.COMPLETE,
        kind=VersionKind.OBJECT,
        created_at=created,
        size=identity.size,
        etag=identity.etag,
        headers=dict(identity.headers),
        user_metadata=dict(identity.user_metadata),
        completed_at=created,
    )


def _locations(chunk_id: str, blob_key: str, holders: dict[str, int]) -> tuple[Location, ...]:
    return tuple(Location(chunk_id, name, blob_key, size) for name, size in holders.items())


__all__: Sequence[str] = ["BlobFallback", "PrefixListing", "VersionBlobs"]
