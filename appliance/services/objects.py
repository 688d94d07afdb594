"""ObjectService: streamed writes and reads of whole objects (DESIGN sections 3, 4, 6).

A write cuts the body into chunks of the pool's chunk size as it arrives, hashes them
(MD5 for the ETag over the whole body, SHA-256 per chunk) in the CPU pool, and writes up
to ``write_ahead`` chunks at once while the body keeps streaming in. Chunk 0 is written
last, once every other chunk is stored, so its header carries the final size, ETag and
chunk count (docs/FORMAT.md). One metadata transaction then commits the version.
Any failure aborts the version: nothing becomes visible, and written blobs go to GC.

A read fetches up to ``read_ahead`` chunks ahead in parallel and yields them in order,
touching only the chunks (and byte ranges within them) that the request covers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from appliance.clock import utcnow
from appliance.data.blobformat import (
    ChunkHeader,
    Manifest,
    ManifestEntry,
    ObjectIdentity,
    chunk_blob_key,
    manifest_blob_key,
)
from appliance.data.buffers import HEADROOM, BufferPool, HeadroomBuffer, payload_view
from appliance.data.chunkstore import ChunkStorage, WrittenChunk
from appliance.data.cpu import CpuPool
from appliance.errors import (
    BadDigest,
    IncompleteBody,
    InvalidObjectName,
    MetadataUnavailable,
    NoSuchBucket,
    NoSuchKey,
    PreconditionFailed,
)
from appliance.ids import new_sortable_id, successor_id
from appliance.meta import errors as meta_errors
from appliance.meta.errors import AlreadyExists, Conflict, MetaError, NotFound, StoreUnavailable
from appliance.meta.models import (
    Bucket,
    ChunkPlacement,
    ChunkRef,
    ListPage,
    ObjectVersion,
    VersionKind,
    VersionState,
    WritePrecondition,
)
from appliance.meta.store import REPLICATE_QUEUE, MetadataStore
from appliance.services.blobfallback import BlobFallback
from appliance.services.tombstones import Tombstones

log = logging.getLogger("cairn.objects")

MAX_KEY_BYTES = 1024
INLINE_HASH_LIMIT = 256 * 1024
"""Chunks smaller than this are hashed on the loop: cheaper than a thread hop."""


def check_key(key: str) -> None:
    """Raise ``InvalidObjectName`` for keys S3 or the metadata store cannot hold."""
    if not key:
        raise InvalidObjectName("the key must not be empty")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidObjectName(f"the key is longer than {MAX_KEY_BYTES} bytes")
    if "\x00" in key:
        raise InvalidObjectName("the key must not contain NUL characters")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidObjectName("the key is not valid UTF-8") from exc


@dataclass(frozen=True, slots=True)
class WriteResult:
    version_id: str
    size: int
    etag: str
    """Hex MD5 of the body (unquoted)."""
    md5: bytes = field(repr=False, default=b"")
    unrecorded: tuple[ChunkRef, WrittenChunk] | None = field(repr=False, default=None)
    """Chunk 0, stored but not recorded (``ChunkedWriter.write(record_identity=False)``)."""


@dataclass(frozen=True, slots=True)
class ObjectHandle:
    """An opened version: its metadata and the chunk layout to read from."""

    version: ObjectVersion
    layout: tuple[ChunkPlacement, ...]


Bytes = bytes | bytearray | memoryview


def _sha256(data: Bytes) -> bytes:
    return hashlib.sha256(data).digest()


async def queue_missing_replicas(store: MetadataStore, written: WrittenChunk) -> None:
    """Queue the replicas a recorded chunk still owes (beyond the write quorum) for the
    replication worker. A store error only costs a log line: the replication scan finds
    every chunk below its factor anyway."""
    if not written.missing:
        return
    chunk_id = written.chunk.chunk_id
    try:
        await store.enqueue(REPLICATE_QUEUE, {"chunk_id": chunk_id}, key=f"chunk:{chunk_id}")
    except MetaError as exc:
        log.warning("could not queue replicas of chunk %s (the scan will): %s", chunk_id, exc)


def _when_done(steps: Sequence[asyncio.Future[Any] | None], then: Callable[[bool], None]) -> None:
    """Call ``then(all_succeeded)`` once every step (None ones skipped) is done."""
    futures = [step for step in steps if step is not None]
    left = len(futures)
    failed = False

    def one_done(fut: asyncio.Future[Any]) -> None:
        nonlocal left, failed
        left -= 1
        failed = failed or fut.cancelled() or fut.exception() is not None
        if left == 0:
            then(not failed)

    for fut in futures:
        fut.add_done_callback(one_done)


async def _done(value: bytes) -> bytes:
    return value


async def _cleanup(awaitable: Awaitable[object]) -> None:
    """Run cleanup to the end even if the caller is cancelled meanwhile."""
    task = asyncio.ensure_future(awaitable)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


class ChunkedWriter:
    """Writes one version's body as chunks; shared by objects and multipart parts."""

    def __init__(
        self,
        store: MetadataStore,
        chunks: ChunkStorage,
        cpu: CpuPool,
        *,
        chunk_size: int,
        write_ahead: int,
        buffers: BufferPool | None = None,
    ) -> None:
        self._store = store
        self._chunks = chunks
        self._cpu = cpu
        self._chunk_size = chunk_size
        self._write_ahead = max(1, write_ahead)
        self._buffers = buffers or BufferPool(0)

    def prefix(self, bucket: str, key: str) -> str:
        """The blob prefix of an object (hidden names for encrypted buckets)."""
        return self._chunks.blob_prefix(bucket, key)

    async def write(
        self,
        version: ObjectVersion,
        body: AsyncIterable[bytes | bytearray],
        *,
        size: int | None,
        identity: bool,
        late_headers: Callable[[], Mapping[str, str]] | None = None,
        etag: str | None = None,
        body_md5: bool = True,
        late_metadata: Callable[[], Mapping[str, str]] | None = None,
        record_identity: bool = True,
    ) -> WriteResult:
        """Stream ``body`` into chunks of ``version`` (already begun, UPLOADING).

        Without ``record_identity`` chunk 0 (written last, with the identity) is stored
        but not recorded: it comes back as ``WriteResult.unrecorded`` for the caller to
        record with its commit (``ObjectService.put_object`` of a one-chunk body; the
        version then need not exist in the store yet), and to delete if that fails.

        ``late_metadata()``, when given, replaces the version's user metadata in chunk 0's
        identity (known only once the body is read, e.g. a file's mtime).

        A ``bytearray`` piece of exactly one chunk that arrives on a chunk boundary is
        taken over without a copy: the caller must not reuse it.

        Without ``body_md5`` the body is not MD5-hashed (the slowest step of a large
        write); the ETag is then multipart-style, the MD5 of the chunks' SHA-256
        digests followed by ``-<chunk count>``, and ``WriteResult.md5`` is empty.

        With ``identity`` chunk 0 is held back and written last carrying the object's
        identity (and ``late_headers()``, known once the body is read, e.g. checksums).
        Raises ``IncompleteBody`` when the body length differs from ``size``,
        the chunk store's errors, and ``MetadataUnavailable``. The caller aborts the
        version on any error. ``etag`` replaces the body's MD5 in chunk 0's identity
        (rewrites keep a multipart ETag).
        """
        md5 = hashlib.md5()
        prefix = self.prefix(version.bucket, version.key)
        slots = asyncio.Semaphore(self._write_ahead)
        pending: set[asyncio.Task[tuple[ChunkRef, WrittenChunk] | None]] = set()
        md5_chain: asyncio.Task[None] | None = None
        held: tuple[bytearray | HeadroomBuffer, asyncio.Future[bytes]] | None = None
        index = 0
        offset = 0
        buffer = bytearray()
        filled = 0
        room = 0
        digests: list[Awaitable[bytes]] = []
        pool = self._buffers

        async def md5_after(prev: asyncio.Task[None] | None, data: Bytes) -> None:
            if prev is not None:
                await prev
            await self._cpu.run(md5.update, data)

        def check_failures() -> None:
            for task in [t for t in pending if t.done()]:
                pending.discard(task)
                task.result()  # re-raise the first failure at once

        async def submit(data: bytearray | HeadroomBuffer) -> None:
            nonlocal md5_chain, held, index, offset
            digest: asyncio.Future[bytes]
            raw = payload_view(data)
            if not body_md5:
                digest = asyncio.ensure_future(
                    self._cpu.run(_sha256, raw)
                    if len(raw) >= INLINE_HASH_LIMIT
                    else _done(_sha256(raw))
                )
            elif len(raw) < INLINE_HASH_LIMIT and (md5_chain is None or md5_chain.done()):
                # small: hashing inline is cheaper than two thread hops
                md5.update(raw)
                digest = asyncio.get_running_loop().create_future()
                digest.set_result(_sha256(raw))
            else:
                # MD5 runs over the chunks in order; each chunk's SHA-256 in parallel.
                md5_chain = asyncio.ensure_future(md5_after(md5_chain, raw))
                digest = asyncio.ensure_future(self._cpu.run(_sha256, raw))
            del raw
            digests.append(digest)
            this_index, this_offset = index, offset
            index += 1
            offset += len(data)
            if this_index == 0 and identity:
                held = (data, digest)
                return
            await slots.acquire()
            check_failures()
            task = asyncio.ensure_future(
                self._write_one(version, prefix, this_index, this_offset, data, digest, None)
            )
            pending.add(task)

            def finished(ok: bool) -> None:
                # a chunk's slot is free once it is written *and* hashed, so chunks that
                # wait for the MD5 chain count against ``write_ahead`` too; its buffer is
                # reused only after success (a cancelled thread may still read it)
                slots.release()
                if ok and isinstance(data, HeadroomBuffer):
                    pool.give(data.buf)

            _when_done([task, digest, md5_chain], finished)

        try:
            async for piece in body:
                if not filled and isinstance(piece, bytearray) and len(piece) == self._chunk_size:
                    await submit(piece)  # a whole chunk handed over: taken without a copy
                    if size is not None and offset > size:
                        raise IncompleteBody(f"the body is longer than the declared {size} bytes")
                    continue
                view = memoryview(piece)
                while view:
                    if not filled:
                        # a body that fills the chunk gets a reused buffer with room for
                        # the blob header (no page faults, no copy to frame it); a short
                        # tail grows a small one
                        fixed = size is not None and size - offset >= self._chunk_size
                        room = HEADROOM if fixed else 0
                        buffer = pool.take(room + self._chunk_size) if fixed else bytearray()
                    take = min(len(view), self._chunk_size - filled)
                    if room:
                        buffer[room + filled : room + filled + take] = view[:take]
                    else:
                        buffer += view[:take]
                    filled += take
                    view = view[take:]
                    if filled == self._chunk_size:
                        full = HeadroomBuffer(buffer, room, filled) if room else buffer
                        buffer, filled = bytearray(), 0  # handed over, no copy
                        await submit(full)
                if size is not None and offset + filled > size:
                    raise IncompleteBody(f"the body is longer than the declared {size} bytes")
            if filled or index == 0:
                await submit(HeadroomBuffer(buffer, room, filled) if room else buffer)
            if size is not None and offset != size:
                raise IncompleteBody(f"the body ended after {offset} of {size} bytes")
            if pending:
                await asyncio.gather(*pending)
            pending.clear()
            if md5_chain is not None:
                await md5_chain
            if body_md5:
                body_etag = md5.hexdigest()
            else:
                joined = b"".join([await d for d in digests])
                body_etag = f"{hashlib.md5(joined).hexdigest()}-{index}"
            unrecorded: tuple[ChunkRef, WrittenChunk] | None = None
            if held is not None:
                data, digest = held
                ident = ObjectIdentity(
                    bucket=version.bucket,
                    key=version.key,
                    size=offset,
                    etag=etag if etag is not None else body_etag,
                    chunk_count=index,
                    headers={**version.headers, **(late_headers() if late_headers else {})},
                    user_metadata=late_metadata() if late_metadata else version.user_metadata,
                )
                unrecorded = await self._write_one(
                    version, prefix, 0, 0, data, digest, ident, record=record_identity
                )
                held = None
                if isinstance(data, HeadroomBuffer):
                    pool.give(data.buf)
            return WriteResult(
                version.version_id,
                offset,
                body_etag,
                md5.digest() if body_md5 else b"",
                unrecorded,
            )
        except BaseException:
            # Let chunk writes in flight finish and record themselves (at most
            # ``write_ahead``): a write cut off between its blob PUT and its metadata
            # row would leave a blob nobody knows about. The caller's abort frees them.
            leftovers: list[asyncio.Future[Any]] = [*pending]
            if md5_chain is not None:
                leftovers.append(md5_chain)
            for leftover in leftovers:
                with contextlib.suppress(BaseException):
                    await leftover
            raise

    async def _write_one(
        self,
        version: ObjectVersion,
        prefix: str,
        index: int,
        offset: int,
        data: bytearray | HeadroomBuffer,
        digest: Awaitable[bytes],
        identity: ObjectIdentity | None,
        *,
        record: bool = True,
    ) -> tuple[ChunkRef, WrittenChunk] | None:
        """Store one chunk and record it; without ``record``, return it unrecorded."""
        chunk_id = new_sortable_id()
        header = ChunkHeader(
            chunk_id=chunk_id,
            version_id=version.version_id,
            index=index,
            size=len(data),
            sha256=await digest,
            identity=identity,
        )
        written = await self._chunks.write_chunk(
            header, data, chunk_blob_key(prefix, version.version_id, index), bucket=version.bucket
        )
        ref = ChunkRef(index, offset, len(data), chunk_id)
        if not record:
            return ref, written
        await self.record(version.version_id, ref, written)
        return None

    async def write_chunk(
        self, version: ObjectVersion, index: int, offset: int, data: bytearray
    ) -> None:
        """Write ``data`` as chunk ``index`` at object ``offset`` of an UPLOADING version
        and record it (a ref with ``seq`` = ``index``), without an object identity: the
        version is then described by a manifest (``ObjectService.commit_by_reference``).
        Raises the chunk store's errors and ``MetadataUnavailable``."""
        digest = asyncio.get_running_loop().create_future()
        digest.set_result(_sha256(data))
        prefix = self.prefix(version.bucket, version.key)
        await self._write_one(version, prefix, index, offset, data, digest, None)

    async def record(self, version_id: str, ref: ChunkRef, written: WrittenChunk) -> None:
        """Record a written chunk in an UPLOADING version, or delete its blobs."""
        try:
            await self._store.add_chunk(version_id, ref, written.chunk, written.locations)
        except (Conflict, StoreUnavailable) as exc:
            # Not recorded: the blobs are ours to remove, and their reservations (what
            # the store cannot take now goes with the version's abort or the janitor).
            with contextlib.suppress(Exception):
                await self._chunks.undo(written.locations)
            if isinstance(exc, StoreUnavailable):
                raise MetadataUnavailable(str(exc)) from exc
            raise
        await queue_missing_replicas(self._store, written)


class ObjectService:
    """Buckets' objects: put, open/read, delete, list. Errors: ``appliance.errors``."""

    def __init__(
        self,
        store: MetadataStore,
        chunks: ChunkStorage,
        cpu: CpuPool,
        *,
        chunk_size: int,
        write_ahead: int = 3,
        read_ahead: int = 4,
        buffers: BufferPool | None = None,
        fallback: BlobFallback | None = None,
        tombstones: Tombstones | None = None,
    ) -> None:
        self._store = store
        self.chunks = chunks
        self.fallback = fallback
        """Opens current versions from blobs while the store is unreachable."""
        self.tombstones = tombstones
        """Deletes write tombstones, so the fallback never brings a deleted key back."""
        self._read_ahead = max(1, read_ahead)
        self._chunk_size = chunk_size
        self.writer = ChunkedWriter(
            store,
            chunks,
            cpu,
            chunk_size=chunk_size,
            write_ahead=write_ahead,
            buffers=buffers,
        )

    # -- buckets ---------------------------------------------------------------------
    async def list_buckets(self) -> list[Bucket]:
        return await self._store.list_buckets()

    async def set_stored_header(
        self, bucket: str, key: str, name: str, value: str | None
    ) -> ObjectVersion:
        """Change one stored header of the current version in place (object tags).

        Raises ``NoSuchBucket`` or ``NoSuchKey``."""
        await self.get_bucket(bucket)
        try:
            return await self._store.set_current_header(bucket, key, name, value)
        except NotFound as exc:
            raise NoSuchKey(key) from exc

    async def bucket_exists(self, bucket: str) -> bool:
        return await self._store.get_bucket(bucket) is not None

    async def get_bucket(self, bucket: str) -> Bucket:
        found = await self._store.get_bucket(bucket)
        if found is None:
            raise NoSuchBucket(bucket)
        return found

    # -- writes ----------------------------------------------------------------------
    async def begin(
        self,
        bucket: str,
        key: str,
        *,
        kind: VersionKind,
        headers: Mapping[str, str] | None = None,
        user_metadata: Mapping[str, str] | None = None,
    ) -> ObjectVersion:
        """Start an UPLOADING version. Raises ``NoSuchBucket``, ``InvalidObjectName``."""
        check_key(key)
        try:
            return await self._store.begin_version(
                new_sortable_id(),
                bucket,
                key,
                kind=kind,
                headers=headers,
                user_metadata=user_metadata,
            )
        except NotFound as exc:
            raise NoSuchBucket(bucket) from exc

    async def abort(self, version_id: str) -> None:
        """Abort a version after a failed write; never raises (the janitor retries)."""
        try:
            await _cleanup(self._store.abort_version(version_id))
        except Exception as exc:
            log.warning("could not abort version %s (the janitor will): %s", version_id, exc)

    async def put_object(
        self,
        bucket: str,
        key: str,
        body: AsyncIterable[bytes | bytearray],
        *,
        size: int | None,
        headers: Mapping[str, str] | None = None,
        user_metadata: Mapping[str, str] | None = None,
        content_md5: bytes | None = None,
        late_headers: Callable[[], Mapping[str, str]] | None = None,
        precondition: WritePrecondition | None = None,
        body_md5: bool = True,
        late_metadata: Callable[[], Mapping[str, str]] | None = None,
    ) -> WriteResult:
        """Store ``body`` as the new current version of ``key``.

        ``late_metadata()`` is called once the body is fully read; its result replaces
        ``user_metadata`` (the FUSE frontend streams a file while it is being written).

        ``body_md5`` False skips the MD5 of the body (see ``ChunkedWriter.write``; the
        FUSE frontend's large files).

        ``late_headers()`` is called once the body is fully read and its result is
        stored with the object's headers (checksums computed from the body).
        ``precondition`` (If-None-Match / If-Match) is checked atomically at commit:
        ``PreconditionFailed`` leaves the key as it was.

        A body of at most one chunk with a known ``size`` takes two store transactions
        instead of four: its chunk is stored (reserving quota), then the version is
        recorded and committed at once (``MetadataStore.put_version``).

        Raises ``NoSuchBucket``, ``InvalidObjectName``, ``IncompleteBody``, ``BadDigest``
        (Content-MD5), ``NoCapacity``, ``BackendsUnavailable``, ``MetadataUnavailable``.
        """
        if size is not None and size <= self._chunk_size:
            return await self._put_one_chunk(
                bucket,
                key,
                body,
                size=size,
                headers=headers,
                user_metadata=user_metadata,
                content_md5=content_md5,
                late_headers=late_headers,
                precondition=precondition,
                late_metadata=late_metadata,
            )
        version = await self.begin(
            bucket, key, kind=VersionKind.OBJECT, headers=headers, user_metadata=user_metadata
        )
        try:
            result = await self.writer.write(
                version,
                body,
                size=size,
                identity=True,
                late_headers=late_headers,
                body_md5=body_md5 or content_md5 is not None,
                late_metadata=late_metadata,
            )
            if content_md5 is not None and content_md5 != result.md5:
                raise BadDigest("the Content-MD5 you specified did not match what was received")
            extra = late_headers() if late_headers else {}
            try:
                await self._store.commit_version(
                    version.version_id,
                    size=result.size,
                    etag=result.etag,
                    headers={**version.headers, **extra} if extra else None,
                    user_metadata=late_metadata() if late_metadata else None,
                    precondition=precondition,
                )
            except meta_errors.PreconditionFailed as exc:
                raise PreconditionFailed(str(exc)) from exc
        except (BadDigest, PreconditionFailed):
            await self.withdraw(version.version_id)
            raise
        except BaseException:
            await self.abort(version.version_id)
            raise
        return result

    async def _put_one_chunk(
        self,
        bucket: str,
        key: str,
        body: AsyncIterable[bytes | bytearray],
        *,
        size: int,
        headers: Mapping[str, str] | None,
        user_metadata: Mapping[str, str] | None,
        content_md5: bytes | None,
        late_headers: Callable[[], Mapping[str, str]] | None,
        precondition: WritePrecondition | None,
        late_metadata: Callable[[], Mapping[str, str]] | None,
    ) -> WriteResult:
        """``put_object`` of a one-chunk body: the version exists in the store only once
        committed. On failure the chunk's blobs are removed unless the version turns out
        committed (a cancellation that arrived after the commit)."""
        check_key(key)
        version = ObjectVersion(
            new_sortable_id(),
            bucket,
            key,
            VersionState.UPLOADING,
            VersionKind.OBJECT,
            utcnow(),
            headers=dict(headers or {}),
            user_metadata=dict(user_metadata or {}),
        )
        stored: WrittenChunk | None = None
        unrecorded = True  # until put_version may have committed
        try:
            result = await self.writer.write(
                version,
                body,
                size=size,
                identity=True,
                late_headers=late_headers,
                late_metadata=late_metadata,
                record_identity=False,
            )
            assert result.unrecorded is not None
            ref, stored = result.unrecorded
            if content_md5 is not None and content_md5 != result.md5:
                raise BadDigest("the Content-MD5 you specified did not match what was received")
            extra = late_headers() if late_headers else {}
            try:
                unrecorded = False
                await self._store.put_version(
                    version.version_id,
                    bucket,
                    key,
                    ref=ref,
                    chunk=stored.chunk,
                    locations=stored.locations,
                    size=result.size,
                    etag=result.etag,
                    headers={**version.headers, **extra},
                    user_metadata=late_metadata() if late_metadata else version.user_metadata,
                    precondition=precondition,
                )
            except meta_errors.PreconditionFailed as exc:
                raise PreconditionFailed(str(exc)) from exc
            except NotFound as exc:
                raise NoSuchBucket(bucket) from exc
            except StoreUnavailable as exc:
                unrecorded = exc.uncommitted
                raise MetadataUnavailable(str(exc)) from exc
            except meta_errors.MetaError:
                unrecorded = True  # refused: the transaction rolled back
                raise
        except BaseException:
            await _cleanup(self._undo_one_chunk(version.version_id, stored, unrecorded))
            raise
        await queue_missing_replicas(self._store, stored)
        return result

    async def _undo_one_chunk(
        self, version_id: str, stored: WrittenChunk | None, unrecorded: bool
    ) -> None:
        """Release the reservations of a failed one-chunk put and delete its blobs, unless
        the version was committed after all (``unrecorded``: surely not). Never raises
        (the janitor releases stale reservations)."""
        try:
            await self._store.abort_version(version_id)
        except Conflict:
            return  # committed: its blobs are the version's
        except Exception as exc:
            log.warning("could not abort version %s (the janitor will): %s", version_id, exc)
            if not unrecorded:
                return  # unknown outcome: a leftover blob is safer than a missing one
        if stored is not None:
            # deletes the blobs and gives back what a lease lent them (the version's own
            # reservations went with the abort)
            with contextlib.suppress(Exception):
                await self.chunks.undo(stored.locations)

    async def withdraw(self, version_id: str) -> None:
        """Abort a version that definitely failed after its chunk 0 was written (bad
        Content-MD5, a precondition) and delete chunk 0's blobs at once, not after the GC
        delay: a version whose chunk 0 is present is complete for reads from blobs
        (docs/replication.md). Never raises (what is left goes the usual way, by GC)."""
        try:
            layout = await self._store.get_layout(version_id)
        except MetaError:
            layout = []
        await self.abort(version_id)
        for placement in layout:
            if placement.ref.seq != 0:
                continue
            chunk_id = placement.chunk.chunk_id
            try:
                for location in await self._store.claim_garbage(chunk_id) or []:
                    if await self.chunks.delete_blob(location.backend, location.blob_key):
                        await self._store.forget_location(chunk_id, location.backend)
            except MetaError as exc:
                log.warning("could not remove chunk 0 of version %s now: %s", version_id, exc)

    async def copy_object(
        self,
        source: ObjectHandle,
        bucket: str,
        key: str,
        *,
        headers: Mapping[str, str] | None = None,
        user_metadata: Mapping[str, str] | None = None,
    ) -> ObjectVersion:
        """Make ``bucket/key`` a copy of an opened version by reference: no byte moves.

        The new version names the source's chunks and gets a manifest blob under its own
        prefix (docs/FORMAT.md). ``headers``/``user_metadata`` None keep the source's.
        Raises ``NoSuchBucket``, ``InvalidObjectName``, ``NoSuchKey`` (the source was
        deleted and collected meanwhile), and the chunk store's errors.
        """
        src = source.version
        keep_headers = dict(src.headers) if headers is None else dict(headers)
        keep_meta = dict(src.user_metadata) if user_metadata is None else dict(user_metadata)
        version = await self.begin(
            bucket, key, kind=VersionKind.OBJECT, headers=keep_headers, user_metadata=keep_meta
        )
        try:
            refs: list[ChunkRef] = []
            entries: list[ManifestEntry] = []
            for placement in source.layout:
                ref = placement.ref
                if ref.length == 0:
                    continue  # a manifest or an empty chunk: nothing to read
                refs.append(
                    ChunkRef(len(refs), ref.offset, ref.length, ref.chunk_id, ref.chunk_offset)
                )
                blob_key = placement.locations[0].blob_key if placement.locations else ""
                entries.append(
                    ManifestEntry(
                        ref.offset,
                        ref.length,
                        ref.chunk_id,
                        ref.chunk_offset,
                        blob_key,
                        placement.chunk.size,
                        placement.chunk.sha256,
                    )
                )
            try:
                if refs:
                    await self._store.add_refs(version.version_id, refs)
            except Conflict as exc:
                raise NoSuchKey(src.key) from exc
            manifest = Manifest(
                version.version_id,
                ObjectIdentity(
                    bucket, key, src.size, src.etag, len(entries), keep_headers, keep_meta
                ),
                tuple(entries),
            )
            prefix = self.writer.prefix(bucket, key)
            written = await self.chunks.write_manifest(
                manifest,
                manifest_blob_key(prefix, version.version_id),
                new_sortable_id(),
                bucket=bucket,
            )
            await self.writer.record(
                version.version_id,
                ChunkRef(len(refs), src.size, 0, written.chunk.chunk_id),
                written,
            )
            await self._store.commit_version(version.version_id, size=src.size, etag=src.etag)
        except BaseException:
            await self.abort(version.version_id)
            raise
        committed = await self._store.get_version(version.version_id)
        return committed if committed is not None else version

    async def rewrite_object(self, handle: ObjectHandle) -> bool:
        """Write an opened current version's bytes again as a new version with the same
        headers, user metadata and ETag, through the chunk store's current policy
        (encryption conversion). The new version id is the successor of the old one, so
        a client write that began later still wins. Streams; never holds the object.

        Returns False (and changes nothing) when the key changed meanwhile. Raises
        ``NoCapacity``, ``BackendsUnavailable``, ``DataCorrupted``, ``KeyUnavailable``,
        ``MetadataUnavailable``.
        """
        src = handle.version
        try:
            version = await self._store.begin_version(
                successor_id(src.version_id),
                src.bucket,
                src.key,
                kind=VersionKind.OBJECT,
                headers=src.headers,
                user_metadata=src.user_metadata,
            )
        except AlreadyExists:
            return False
        except NotFound as exc:
            raise NoSuchBucket(src.bucket) from exc
        try:
            await self.writer.write(
                version, self.read(handle), size=src.size, identity=True, etag=src.etag
            )
            await self._store.commit_version(
                version.version_id,
                size=src.size,
                etag=src.etag,
                precondition=WritePrecondition(if_version_id=src.version_id),
            )
        except meta_errors.PreconditionFailed:
            await self.abort(version.version_id)
            return False
        except BaseException:
            await self.abort(version.version_id)
            raise
        return True

    async def commit_by_reference(
        self, version: ObjectVersion, *, size: int, etag: str
    ) -> ObjectVersion:
        """Commit an UPLOADING version whose refs are all recorded (new chunks written
        with ``ChunkedWriter.write_chunk``, existing ones added with ``add_refs``): write
        its manifest blob (docs/FORMAT.md), record it as the last ref, and commit.

        The caller aborts the version when this raises (chunk store errors, store errors).
        """
        layout = await self._store.get_layout(version.version_id)
        entries = tuple(
            ManifestEntry(
                p.ref.offset,
                p.ref.length,
                p.ref.chunk_id,
                p.ref.chunk_offset,
                p.locations[0].blob_key if p.locations else "",
                p.chunk.size,
                p.chunk.sha256,
            )
            for p in layout
            if p.ref.length > 0
        )
        manifest = Manifest(
            version.version_id,
            ObjectIdentity(
                version.bucket,
                version.key,
                size,
                etag,
                len(entries),
                dict(version.headers),
                dict(version.user_metadata),
            ),
            entries,
        )
        prefix = self.writer.prefix(version.bucket, version.key)
        written = await self.chunks.write_manifest(
            manifest,
            manifest_blob_key(prefix, version.version_id),
            new_sortable_id(),
            bucket=version.bucket,
        )
        seq = max((p.ref.seq for p in layout), default=-1) + 1
        await self.writer.record(
            version.version_id, ChunkRef(seq, size, 0, written.chunk.chunk_id), written
        )
        await self._store.commit_version(version.version_id, size=size, etag=etag)
        committed = await self._store.get_version(version.version_id)
        return committed if committed is not None else version

    async def delete_objects(self, bucket: str, keys: Sequence[str]) -> None:
        """Remove up to 1,000 keys in one metadata transaction (all or nothing)."""
        await self.get_bucket(bucket)
        if self.tombstones is None:
            await self._store.delete_objects(bucket, keys)
        else:
            await self.tombstones.delete(bucket, keys)

    async def delete_object(self, bucket: str, key: str) -> None:
        """Remove the current version of ``key``; absent keys succeed (S3 semantics)."""
        await self.get_bucket(bucket)
        await self.remove(bucket, key)

    async def remove(self, bucket: str, key: str) -> bool:
        """Remove the current version of ``key`` (with its tombstone) without checking
        the bucket; True when there was one."""
        if self.tombstones is None:
            return await self._store.delete_object(bucket, key) is not None
        return bool(await self.tombstones.delete(bucket, [key]))

    # -- reads -----------------------------------------------------------------------
    async def head_object(self, bucket: str, key: str) -> ObjectVersion:
        """Raises ``NoSuchKey`` or ``NoSuchBucket``."""
        try:
            version = await self._store.get_current(bucket, key)
        except StoreUnavailable:
            if self.fallback is None:
                raise
            return (await self._open_from_blobs(bucket, key)).version
        if version is None:
            await self.get_bucket(bucket)
            raise NoSuchKey(key)
        return version

    async def open_object(self, bucket: str, key: str) -> ObjectHandle:
        """The current version and its layout, ready to read. While the store is
        unreachable, from the key's blobs (``BlobFallback``) unless cached."""
        try:
            version = await self._store.get_current(bucket, key)
            if version is not None:
                layout = await self._store.get_layout(version.version_id)
                return ObjectHandle(version, tuple(layout))
        except StoreUnavailable:
            if self.fallback is None:
                raise
            return await self._open_from_blobs(bucket, key)
        await self.get_bucket(bucket)
        raise NoSuchKey(key)

    async def _open_from_blobs(self, bucket: str, key: str) -> ObjectHandle:
        assert self.fallback is not None
        found = await self.fallback.open(bucket, key)
        if found is None:
            with contextlib.suppress(StoreUnavailable):  # bucket not cached: answer for the key
                await self.get_bucket(bucket)
            raise NoSuchKey(key)
        return ObjectHandle(*found)

    def read(
        self, handle: ObjectHandle, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes | bytearray]:
        """Stream bytes ``[start, end)`` of an opened version (end defaults to its size)."""
        stop = handle.version.size if end is None else min(end, handle.version.size)
        return self._read_ranges(_plan(handle.layout, start, stop))

    async def _read_ranges(
        self, plan: Sequence[tuple[ChunkPlacement, int, int]]
    ) -> AsyncIterator[bytes | bytearray]:
        # Each read delivers into its own box and its task returns None: a finished task
        # (and the loop's handle waking us up) would otherwise hold the buffer a moment
        # longer, and a consumer could not recycle it (BufferPool.give_if_unshared).
        window: list[tuple[asyncio.Task[None], list[bytes | bytearray]]] = []
        next_index = 0

        async def read_into(
            box: list[bytes | bytearray], placement: ChunkPlacement, a: int, b: int
        ) -> None:
            box.append(await self.chunks.read(placement.chunk, placement.locations, a, b))

        def fill() -> None:
            nonlocal next_index
            while len(window) < self._read_ahead and next_index < len(plan):
                placement, a, b = plan[next_index]
                box: list[bytes | bytearray] = []
                window.append((asyncio.ensure_future(read_into(box, placement, a, b)), box))
                next_index += 1

        try:
            fill()
            while window:
                task, box = window[0]
                await task
                window.pop(0)
                fill()
                # yielded from the box, the buffer keeps no reference in this frame
                yield box.pop()
        finally:
            for task, _ in window:
                task.cancel()
            for task, _ in window:
                with contextlib.suppress(BaseException):
                    await task

    # -- listing ---------------------------------------------------------------------
    async def list_objects(
        self,
        bucket: str,
        *,
        prefix: str = "",
        delimiter: str | None = None,
        start_after: str | None = None,
        limit: int = 1000,
    ) -> ListPage:
        await self.get_bucket(bucket)
        return await self._store.list_objects(
            bucket, prefix=prefix, delimiter=delimiter, start_after=start_after, limit=limit
        )


def _plan(
    layout: Sequence[ChunkPlacement], start: int, end: int
) -> list[tuple[ChunkPlacement, int, int]]:
    """Which chunk byte ranges cover object bytes ``[start, end)``, in order."""
    plan = []
    for placement in layout:
        ref = placement.ref
        lo = max(start, ref.offset)
        hi = min(end, ref.offset + ref.length)
        if lo >= hi:
            continue
        first = ref.chunk_offset + (lo - ref.offset)
        plan.append((placement, first, first + (hi - lo)))
    return plan
