"""The chunk store's interface for read-side layers (DESIGN section 2).

``ChunkStorage`` (defined with ``ChunkStore`` in ``appliance.data.chunkstore``) is the
whole interface that services, the encrypting layer and the cache implement; this module
re-exports it and adds ``ChunkReader``, the read side alone. Contracts:

- ``write_chunk`` / ``write_manifest`` store a new blob on the write quorum's replicas
  (``WrittenChunk.missing`` more are owed to the replication worker); nothing is left
  reserved or written when they raise (``NoCapacity``, ``BackendsUnavailable``).
- ``replicate`` copies a chunk's verified blob to more backends (repair); the caller
  records the new locations.
- ``read`` returns the plaintext bytes ``[start, end)`` of a chunk, verified, or raises
  ``DataCorrupted`` / ``BackendsUnavailable``; the caller must not modify the buffer.
- ``undo`` deletes blobs that were written but will not be recorded; ``delete_blob`` is
  a best-effort delete that returns False when the backend refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

from appliance.data.blobformat import ChunkHeader, Manifest
from appliance.data.buffers import ChunkPayload
from appliance.data.chunkstore import ChunkStorage, WrittenChunk
from appliance.meta.models import Chunk, Location

__all__ = ["ChunkReader", "ChunkStorage", "ChunkStorageWrapper"]


class ChunkReader(Protocol):
    """What a read-side layer (the cache) needs from the layer below it."""

    async def read(
        self, chunk: Chunk, locations: Sequence[Location], start: int, end: int
    ) -> bytes | bytearray: ...


S = TypeVar("S", bound=ChunkStorage)


class ChunkStorageWrapper(Generic[S]):
    """A ``ChunkStorage`` that hands every call to ``inner``: wrappers (the cache, the
    encrypting layer) subclass it and override only what they change."""

    def __init__(self, inner: S) -> None:
        self.inner = inner

    def blob_prefix(self, bucket: str, key: str) -> str:
        return self.inner.blob_prefix(bucket, key)

    async def write_chunk(
        self,
        header: ChunkHeader,
        payload: ChunkPayload,
        blob_key: str,
        *,
        bucket: str | None = None,
    ) -> WrittenChunk:
        return await self.inner.write_chunk(header, payload, blob_key, bucket=bucket)

    async def write_manifest(
        self, manifest: Manifest, blob_key: str, chunk_id: str, *, bucket: str | None = None
    ) -> WrittenChunk:
        return await self.inner.write_manifest(manifest, blob_key, chunk_id, bucket=bucket)

    async def undo(self, placed: Sequence[tuple[Location, int | None]]) -> None:
        await self.inner.undo(placed)

    async def delete_blob(self, backend: str, blob_key: str) -> bool:
        return await self.inner.delete_blob(backend, blob_key)

    async def replicate(
        self,
        chunk: Chunk,
        sources: Sequence[Location],
        count: int,
        *,
        keep: Sequence[str] = (),
        rewrite: str | None = None,
    ) -> tuple[tuple[Location, int | None], ...]:
        return await self.inner.replicate(chunk, sources, count, keep=keep, rewrite=rewrite)

    async def read(
        self, chunk: Chunk, locations: Sequence[Location], start: int, end: int
    ) -> bytes | bytearray:
        return await self.inner.read(chunk, locations, start, end)
