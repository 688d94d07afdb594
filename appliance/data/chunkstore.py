"""The chunk store: puts chunk blobs on backends and reads them back (DESIGN 3, 4, 6).

Writes reserve quota before each blob write and try the Router's candidates in turn, so
a full or failing backend sends the chunk to the next one. Reads try replicas in the
Router's order, verify what they can (length always; SHA-256 when the whole chunk is
read) and move on to the next replica on any error. Encryption and caching wrap this
class and keep its interface.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from appliance.data.blobformat import (
    ChunkHeader,
    Manifest,
    encode_chunk_header,
    encode_manifest,
    object_prefix,
)
from appliance.data.cpu import CpuPool
from appliance.errors import BackendsUnavailable, DataCorrupted, NoCapacity
from appliance.meta.models import Chunk, Location, NewChunk
from appliance.placement.pool import PoolState
from backends.base import BlobStream, ByteRange
from backends.errors import BackendError

log = logging.getLogger("cairn.chunks")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class WrittenChunk:
    """A chunk now on ``replicas`` backends; each location with its reservation id."""

    chunk: NewChunk
    locations: tuple[tuple[Location, int | None], ...]


class ChunkStorage(Protocol):
    """What services use to store chunks: ``ChunkStore`` and the wrappers around it
    (encryption, cache) all have this interface."""

    def blob_prefix(self, bucket: str, key: str) -> str: ...

    async def write_chunk(
        self,
        header: ChunkHeader,
        payload: bytes | bytearray | memoryview,
        blob_key: str,
        *,
        bucket: str | None = None,
    ) -> WrittenChunk: ...

    async def write_manifest(
        self, manifest: Manifest, blob_key: str, chunk_id: str, *, bucket: str | None = None
    ) -> WrittenChunk: ...

    async def undo(self, placed: Sequence[tuple[Location, int | None]]) -> None: ...

    async def delete_blob(self, backend: str, blob_key: str) -> bool: ...

    async def read(
        self, chunk: Chunk, locations: Sequence[Location], start: int, end: int
    ) -> bytes | bytearray: ...


class ChunkStore:
    """Writes and reads chunk blobs through the pool's backends."""

    def __init__(self, pool: PoolState, cpu: CpuPool, *, replicas: int = 1) -> None:
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        self._pool = pool
        self._cpu = cpu
        self._replicas = replicas

    @property
    def replicas(self) -> int:
        """Replicas written per chunk."""
        return self._replicas

    def blob_prefix(self, bucket: str, key: str) -> str:
        """The blob prefix of an object (``blobformat.object_prefix``, names in clear)."""
        return object_prefix(bucket, key)

    async def write_chunk(
        self,
        header: ChunkHeader,
        payload: bytes | bytearray | memoryview,
        blob_key: str,
        *,
        bucket: str | None = None,
    ) -> WrittenChunk:
        """Store one chunk (header + payload) as ``blob_key`` on ``replicas`` backends.

        ``bucket`` names the bucket the chunk is written for (wrappers use it for
        per-bucket policies; this class ignores it). Raises ``NoCapacity`` when no
        backend has room or cap left, and ``BackendsUnavailable`` when the candidates
        with room all failed. Nothing is left reserved or written when it raises.
        """
        blob = encode_chunk_header(header) + payload
        locations = await self.place(blob, blob_key, header.version_id, header.chunk_id)
        chunk = NewChunk(
            chunk_id=header.chunk_id,
            size=header.size,
            sha256=header.sha256,
            stored_size=len(blob),
            wrapped_dek=header.wrapped_dek,
            key_id=header.key_id,
        )
        return WrittenChunk(chunk, locations)

    async def write_manifest(
        self, manifest: Manifest, blob_key: str, chunk_id: str, *, bucket: str | None = None
    ) -> WrittenChunk:
        """Store a version's manifest blob; it is recorded as a zero-length chunk."""
        blob = encode_manifest(manifest)
        locations = await self.place(blob, blob_key, manifest.version_id, chunk_id)
        chunk = NewChunk(chunk_id, 0, hashlib.sha256(blob).digest(), len(blob))
        return WrittenChunk(chunk, locations)

    async def place(
        self, blob: bytes | bytearray, blob_key: str, owner: str, chunk_id: str
    ) -> tuple[tuple[Location, int | None], ...]:
        """Write a finished blob on ``replicas`` backends, reserving quota for ``owner``
        (a version id) first. Errors as ``write_chunk``; nothing is left on failure."""
        stored = len(blob)
        store = self._pool.store
        placed: list[tuple[Location, int | None]] = []
        tried: set[str] = set()
        failures: list[str] = []
        try:
            while len(placed) < self._replicas:
                view = await self._pool.view()
                candidates = self._pool.router.write_candidates(
                    view, stored, exclude=tried | {loc.backend for loc, _ in placed}
                )
                if not candidates:
                    break
                name = candidates[0]
                tried.add(name)
                reservation = await store.reserve(name, stored, owner=owner)
                if reservation is None:
                    self._pool.invalidate()
                    continue
                self._pool.account(name, stored)
                try:
                    await self._pool.backend(name).put(blob_key, blob, size=stored)
                except BackendError as exc:
                    await store.release_reservation(reservation.reservation_id)
                    self._pool.account(name, -stored)
                    failures.append(f"{name}: {exc}")
                    log.warning("chunk write to %s failed, trying the next backend: %s", name, exc)
                    continue
                placed.append(
                    (Location(chunk_id, name, blob_key, stored), reservation.reservation_id)
                )
        except BaseException:
            await self.undo(placed)
            raise
        if len(placed) < self._replicas:
            await self.undo(placed)
            if failures:
                raise BackendsUnavailable("could not store a chunk: " + "; ".join(failures))
            raise NoCapacity(
                f"no backend has room for {stored} more bytes "
                "(every backend is full, read-only or past a monthly cap)"
            )
        return tuple(placed)

    async def undo(self, placed: Sequence[tuple[Location, int | None]]) -> None:
        """Delete blobs that were written but will not be recorded; release their quota."""
        for location, reservation_id in placed:
            await self.delete_blob(location.backend, location.blob_key)
            if reservation_id is not None:
                await self._pool.store.release_reservation(reservation_id)

    async def _digest(self, data: bytes | bytearray) -> bytes:
        if len(data) < INLINE_HASH_LIMIT:
            return _sha256(data)
        return await self._cpu.run(_sha256, data)

    async def delete_blob(self, backend: str, blob_key: str) -> bool:
        """Best-effort delete; returns False (and logs) when the backend refused."""
        try:
            await self._pool.backend(backend).delete(blob_key)
        except BackendError as exc:
            log.warning("could not delete blob %s on %s: %s", blob_key, backend, exc)
            return False
        return True

    async def read(
        self, chunk: Chunk, locations: Sequence[Location], start: int, end: int
    ) -> bytes | bytearray:
        """Plaintext bytes ``[start, end)`` of ``chunk``, from the first replica that works.

        Raises ``DataCorrupted`` when every replica returned wrong bytes and
        ``BackendsUnavailable`` when none could be read.
        """
        if not 0 <= start <= end <= chunk.size:
            raise ValueError(f"range [{start}, {end}) outside chunk of {chunk.size} bytes")
        if start == end:
            return b""
        header_len = chunk.stored_size - chunk.size
        whole = start == 0 and end == chunk.size

        async def verify(data: bytes | bytearray, backend: str) -> bytes | bytearray:
            if whole and await self._digest(data) != chunk.sha256:
                log.error("chunk %s on %s failed verification", chunk.chunk_id, backend)
                raise DataCorrupted("checksum mismatch")
            return data

        return await self.read_stored(
            chunk, locations, header_len + start, header_len + end, verify
        )

    async def read_stored(
        self,
        chunk: Chunk,
        locations: Sequence[Location],
        start: int,
        end: int,
        check: Callable[[bytes | bytearray, str], Awaitable[T]],
    ) -> T:
        """Stored blob bytes ``[start, end)`` (header included in the offsets) of
        ``chunk``, passed through ``check(data, backend)`` — one ranged GET per replica
        tried, replicas in the Router's read order.

        A replica whose bytes are short or for which ``check`` raises ``DataCorrupted``
        is skipped. Raises ``DataCorrupted`` when every replica returned wrong bytes and
        ``BackendsUnavailable`` when none could be read.
        """
        view = await self._pool.view()
        by_backend = {loc.backend: loc for loc in locations}
        order = self._pool.router.read_order(view, list(by_backend), end - start)
        problems: list[str] = []
        corrupt = 0
        for name in order:
            location = by_backend[name]
            try:
                stream = await self._pool.backend(name).get(
                    location.blob_key, ByteRange(start, end)
                )
                try:
                    data = await _collect(stream, end - start)
                finally:
                    await stream.aclose()
            except (BackendError, KeyError) as exc:
                problems.append(f"{name}: {exc}")
                continue
            if len(data) != end - start:
                corrupt += 1
                problems.append(f"{name}: short read ({len(data)} of {end - start} bytes)")
                continue
            try:
                return await check(data, name)
            except DataCorrupted as exc:
                corrupt += 1
                problems.append(f"{name}: {exc}")
                continue
        detail = "; ".join(problems) or "no replica recorded"
        if corrupt and corrupt == len(problems):
            raise DataCorrupted(f"chunk {chunk.chunk_id}: {detail}")
        raise BackendsUnavailable(f"chunk {chunk.chunk_id}: {detail}")


INLINE_HASH_LIMIT = 256 * 1024
"""Chunks smaller than this are verified on the loop: cheaper than a thread hop."""


async def _collect(stream: BlobStream, expected: int) -> bytes | bytearray:
    """Read a stream into one buffer of ``expected`` bytes (no list of pieces, no join);
    a stream longer than expected is cut, a shorter one returns what it had."""
    pieces = aiter(stream)
    first = await anext(pieces, b"")
    if len(first) >= expected:  # the whole range in one piece: keep it, no copy
        return first[:expected] if len(first) > expected else first
    buffer = bytearray(expected)
    view = memoryview(buffer)
    view[: len(first)] = first
    filled = len(first)
    async for piece in pieces:
        take = min(len(piece), expected - filled)
        view[filled : filled + take] = piece[:take]
        filled += take
        if filled == expected:
            break
    view.release()
    if filled < expected:
        del buffer[filled:]
    return buffer


def _sha256(data: bytes | bytearray) -> bytes:
    return hashlib.sha256(data).digest()
