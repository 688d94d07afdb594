"""MultipartService: S3 multipart uploads over the chunk store.

Each part is written like an object (streamed into chunks) as a ``part`` version under
the upload's key. Completion is metadata-only: the new version references the parts'
chunks, plus a small manifest blob under its own prefix so it can be recovered from the
backends alone (docs/FORMAT.md). No part byte is copied.
"""

from __future__ import annotations

import hashlib
import itertools
import secrets
from collections.abc import AsyncIterable, Callable, Mapping, Sequence
from dataclasses import dataclass

from appliance.clock import utcnow
from appliance.data.blobformat import Manifest, ManifestEntry, ObjectIdentity, manifest_blob_key
from appliance.errors import (
    BadDigest,
    EntityTooSmall,
    InvalidPart,
    InvalidPartOrder,
    InvalidRange,
    NoSuchBucket,
    NoSuchKey,
    NoSuchUpload,
    PreconditionFailed,
)
from appliance.ids import new_sortable_id
from appliance.meta import errors as meta_errors
from appliance.meta.models import (
    ChunkRef,
    MultipartUpload,
    Part,
    VersionKind,
    WritePrecondition,
)
from appliance.meta.store import MetadataStore
from appliance.services.objects import (
    ObjectHandle,
    ObjectService,
    WriteResult,
    check_key,
    queue_missing_replicas,
)

MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PART_NUMBER = 10_000


@dataclass(frozen=True, slots=True)
class CompletedUpload:
    bucket: str
    key: str
    version_id: str
    etag: str
    """``<hex md5 of the parts' md5s>-<part count>``, unquoted."""
    size: int


PART_SIZES_HEADER = "x-cairn-part-sizes"
"""Stored header of a multipart object: its parts' sizes, for GetObject ``partNumber``.
Headers named ``x-cairn-*`` are Cairn's own and never sent to clients."""


def encode_part_sizes(sizes: Sequence[int]) -> str:
    return ",".join(str(size) for size in sizes)


def part_range(headers: Mapping[str, str], size: int, number: int) -> tuple[int, int, int]:
    """(start, end, parts count) of part ``number`` of an object with these stored headers.

    An object stored in one piece has one part, the whole object. Raises ``InvalidRange``
    when the object has no such part."""
    raw = headers.get(PART_SIZES_HEADER)
    sizes = [int(s) for s in raw.split(",")] if raw else [size]
    if not 1 <= number <= len(sizes):
        raise InvalidRange(f"the object has {len(sizes)} parts, not {number}")
    start = sum(sizes[: number - 1])
    return start, start + sizes[number - 1], len(sizes)


def slice_layout(source: ObjectHandle, start: int, end: int) -> list[ChunkRef]:
    """Refs for bytes ``[start, end)`` of an opened object, offsets relative to ``start``:
    whole chunks where possible, a sub-range (``chunk_offset``, ``length``) where the
    range cuts a chunk. Zero-length refs (manifests) are left out."""
    refs: list[ChunkRef] = []
    for placement in source.layout:
        ref = placement.ref
        first, last = max(start, ref.offset), min(end, ref.offset + ref.length)
        if ref.length == 0 or first >= last:
            continue
        refs.append(
            ChunkRef(
                len(refs),
                first - start,
                last - first,
                ref.chunk_id,
                ref.chunk_offset + (first - ref.offset),
            )
        )
    return refs


class MultipartService:
    """Create, upload parts to, complete, abort and list multipart uploads."""

    def __init__(
        self, store: MetadataStore, objects: ObjectService, *, min_part_size: int = MIN_PART_SIZE
    ) -> None:
        self._store = store
        self._objects = objects
        self._min_part_size = min_part_size

    async def create(
        self,
        bucket: str,
        key: str,
        *,
        headers: Mapping[str, str] | None = None,
        user_metadata: Mapping[str, str] | None = None,
    ) -> MultipartUpload:
        """Start an upload. Raises ``NoSuchBucket``, ``InvalidObjectName``."""
        check_key(key)
        upload = MultipartUpload(
            upload_id=new_sortable_id() + secrets.token_urlsafe(24),
            bucket=bucket,
            key=key,
            created_at=utcnow(),
            headers=dict(headers or {}),
            user_metadata=dict(user_metadata or {}),
        )
        try:
            await self._store.create_upload(upload)
        except meta_errors.NotFound as exc:
            raise NoSuchBucket(bucket) from exc
        return upload

    async def get(
        self, upload_id: str, bucket: str | None = None, key: str | None = None
    ) -> MultipartUpload:
        """The upload, which must belong to ``bucket``/``key`` when given; else ``NoSuchUpload``."""
        upload = await self._store.get_upload(upload_id)
        if (
            upload is None
            or (bucket is not None and upload.bucket != bucket)
            or (key is not None and upload.key != key)
        ):
            raise NoSuchUpload(upload_id)
        return upload

    async def upload_part(
        self,
        upload: MultipartUpload,
        part_number: int,
        body: AsyncIterable[bytes],
        *,
        size: int | None,
        content_md5: bytes | None = None,
        late_headers: Callable[[], Mapping[str, str]] | None = None,
    ) -> WriteResult:
        """Store one part (replacing an earlier upload of that number). ``late_headers``
        is called once the body is read (checksums from aws-chunked trailers) and stored
        with the part.

        Raises ``NoSuchUpload`` (also when aborted meanwhile), ``IncompleteBody``,
        ``BadDigest`` and the chunk store's errors.
        """
        if not 1 <= part_number <= MAX_PART_NUMBER:
            raise InvalidPart(f"part number must be between 1 and {MAX_PART_NUMBER}")
        version = await self._objects.begin(upload.bucket, upload.key, kind=VersionKind.PART)
        try:
            result = await self._objects.writer.write(version, body, size=size, identity=False)
            if content_md5 is not None and content_md5 != result.md5:
                raise BadDigest("the Content-MD5 you specified did not match what was received")
            await self._store.put_part(
                upload.upload_id,
                part_number,
                version.version_id,
                size=result.size,
                etag=result.etag,
                headers=dict(late_headers()) if late_headers is not None else None,
            )
        except meta_errors.NotFound as exc:
            await self._objects.abort(version.version_id)
            raise NoSuchUpload(upload.upload_id) from exc
        except BaseException:
            await self._objects.abort(version.version_id)
            raise
        return result

    async def upload_part_copy(
        self, upload: MultipartUpload, part_number: int, source: ObjectHandle, start: int, end: int
    ) -> WriteResult:
        """Make part ``part_number`` the bytes ``[start, end)`` of an opened object, by
        reference: the part names the source's chunks (sub-ranges where the range cuts
        one), no byte is read or written.

        The part's ETag is an MD5 of the source version and range, not of the bytes
        (computing that would mean reading them); like any part ETag it is only given
        back at completion. Raises ``NoSuchUpload``, ``NoSuchKey`` (the source was
        deleted and collected meanwhile) and ``InvalidPart`` (bad part number).
        """
        if not 1 <= part_number <= MAX_PART_NUMBER:
            raise InvalidPart(f"part number must be between 1 and {MAX_PART_NUMBER}")
        if not 0 <= start <= end <= source.version.size:
            raise InvalidRange(f"[{start}, {end}) outside {source.version.size} bytes")
        version = await self._objects.begin(upload.bucket, upload.key, kind=VersionKind.PART)
        try:
            refs = slice_layout(source, start, end)
            if refs:
                try:
                    await self._store.add_refs(version.version_id, refs)
                except meta_errors.Conflict as exc:
                    raise NoSuchKey(source.version.key) from exc
            token = f"{source.version.version_id}:{source.version.etag}:{start}-{end}"
            etag = hashlib.md5(token.encode(), usedforsecurity=False).hexdigest()
            await self._store.put_part(
                upload.upload_id, part_number, version.version_id, size=end - start, etag=etag
            )
        except meta_errors.NotFound as exc:
            await self._objects.abort(version.version_id)
            raise NoSuchUpload(upload.upload_id) from exc
        except BaseException:
            await self._objects.abort(version.version_id)
            raise
        return WriteResult(version.version_id, end - start, etag)

    async def list_parts(
        self, upload: MultipartUpload, *, marker: int = 0, limit: int = 1000
    ) -> list[Part]:
        return await self._store.list_parts(upload.upload_id, marker=marker, limit=limit)

    async def _all_parts(self, upload_id: str) -> dict[int, Part]:
        found: dict[int, Part] = {}
        marker = 0
        while True:
            page = await self._store.list_parts(upload_id, marker=marker, limit=1000)
            found.update((p.part_number, p) for p in page)
            if len(page) < 1000:
                return found
            marker = page[-1].part_number

    async def complete(
        self,
        upload: MultipartUpload,
        parts: Sequence[tuple[int, str]],
        *,
        precondition: WritePrecondition | None = None,
        headers_from_parts: Callable[[Mapping[int, Part]], Mapping[str, str]] | None = None,
    ) -> CompletedUpload:
        """Assemble ``parts`` (number, ETag) into the key's new current version.
        ``headers_from_parts`` gets the upload's stored parts (read once, here) and
        returns headers to store with the object (e.g. its checksum); what it raises
        ends the completion before anything is written.

        Raises ``InvalidPart`` (none listed, missing, or ETag differs), ``InvalidPartOrder``,
        ``EntityTooSmall`` (a part but the last under the minimum), ``NoSuchUpload``.
        """
        if not parts:
            raise InvalidPart("you must specify at least one part")
        numbers = [n for n, _ in parts]
        if any(b <= a for a, b in itertools.pairwise(numbers)):
            raise InvalidPartOrder("the list of parts was not in ascending order")
        stored = await self._all_parts(upload.upload_id)
        extra_headers = headers_from_parts(stored) if headers_from_parts is not None else {}
        layouts = await self._store.get_upload_layout(upload.upload_id)
        md5s = b""
        entries: list[ManifestEntry] = []
        sizes: list[int] = []
        offset = 0
        for position, (number, etag) in enumerate(parts):
            part = stored.get(number)
            if part is None or part.etag != etag.strip().strip('"'):
                raise InvalidPart(f"part {number} was not uploaded or its ETag does not match")
            if position < len(parts) - 1 and part.size < self._min_part_size:
                raise EntityTooSmall(
                    f"part {number} is {part.size} bytes; all parts but the last must be "
                    f"at least {self._min_part_size} bytes"
                )
            md5s += bytes.fromhex(part.etag)
            for placement in layouts.get(number, []):
                ref = placement.ref
                blob_key = placement.locations[0].blob_key if placement.locations else ""
                entries.append(
                    ManifestEntry(
                        offset + ref.offset,
                        ref.length,
                        ref.chunk_id,
                        ref.chunk_offset,
                        blob_key,
                        placement.chunk.size,
                        placement.chunk.sha256,
                    )
                )
            offset += part.size
            sizes.append(part.size)
        etag = f"{hashlib.md5(md5s).hexdigest()}-{len(parts)}"
        version_id = new_sortable_id()
        manifest = Manifest(
            version_id,
            ObjectIdentity(
                upload.bucket,
                upload.key,
                offset,
                etag,
                len(entries),
                upload.headers,
                upload.user_metadata,
            ),
            tuple(entries),
        )
        prefix = self._objects.writer.prefix(upload.bucket, upload.key)
        chunks = self._objects.chunks
        written = await chunks.write_manifest(
            manifest, manifest_blob_key(prefix, version_id), new_sortable_id(), bucket=upload.bucket
        )
        try:
            await self._store.complete_upload(
                upload.upload_id,
                version_id,
                parts,
                etag=etag,
                manifest=(written.chunk, written.locations),
                precondition=precondition,
                extra_headers={
                    **extra_headers,
                    PART_SIZES_HEADER: encode_part_sizes(sizes),
                },
            )
        except BaseException as exc:
            await chunks.undo(written.locations)
            if isinstance(exc, meta_errors.InvalidPart):
                raise InvalidPart(str(exc)) from exc
            if isinstance(exc, meta_errors.PreconditionFailed):
                raise PreconditionFailed(str(exc)) from exc
            if isinstance(exc, meta_errors.NotFound):
                raise NoSuchUpload(upload.upload_id) from exc
            raise
        await queue_missing_replicas(self._store, written)
        return CompletedUpload(upload.bucket, upload.key, version_id, etag, offset)

    async def abort(self, upload: MultipartUpload) -> None:
        """Drop the upload and its parts (their chunks go to GC)."""
        await self._store.abort_upload(upload.upload_id)

    async def list_uploads(
        self,
        bucket: str,
        *,
        prefix: str = "",
        key_marker: str | None = None,
        upload_id_marker: str | None = None,
        limit: int = 1000,
    ) -> list[MultipartUpload]:
        await self._objects.get_bucket(bucket)
        return await self._store.list_uploads(
            bucket,
            prefix=prefix,
            key_marker=key_marker,
            upload_id_marker=upload_id_marker,
            limit=limit,
        )
