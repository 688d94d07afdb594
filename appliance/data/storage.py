"""The chunk store's interface, as a Protocol, so layers can wrap it (DESIGN section 2).

``ChunkStore`` implements it; the object cache (``appliance.cache``) and the encrypting
layer wrap any ``ChunkStorage`` and implement it again, so services never know which
layers sit underneath. The contracts are those of ``ChunkStore``:

- ``write_chunk`` / ``write_manifest`` store a new blob on the pool's replicas; nothing is
  left reserved or written when they raise (``NoCapacity``, ``BackendsUnavailable``).
- ``read`` returns the plaintext bytes ``[start, end)`` of a chunk, verified, or raises
  ``DataCorrupted`` / ``BackendsUnavailable``; the caller must not modify the buffer.
- ``undo`` deletes blobs that were written but will not be recorded; ``delete_blob`` is
  a best-effort delete that returns False when the backend refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from appliance.data.blobformat import ChunkHeader, Manifest
from appliance.data.chunkstore import WrittenChunk
from appliance.meta.models import Chunk, Location


class ChunkReader(Protocol):
    """What a read-side layer (the cache) needs from the layer below it."""

    async def read(
        self, chunk: Chunk, locations: Sequence[Location], start: int, end: int
    ) -> bytes | bytearray: ...


class ChunkStorage(ChunkReader, Protocol):
    """The whole chunk store interface; see the module docstring for the contracts."""

    async def write_chunk(
        self, header: ChunkHeader, payload: bytes | bytearray | memoryview, blob_key: str
    ) -> WrittenChunk: ...

    async def write_manifest(
        self, manifest: Manifest, blob_key: str, chunk_id: str
    ) -> WrittenChunk: ...

    async def undo(self, placed: Sequence[tuple[Location, int | None]]) -> None: ...

    async def delete_blob(self, backend: str, blob_key: str) -> bool: ...
