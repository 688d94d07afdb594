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
from typing import Protocol

from appliance.data.chunkstore import ChunkStorage
from appliance.meta.models import Chunk, Location

__all__ = ["ChunkReader", "ChunkStorage"]


class ChunkReader(Protocol):
    """What a read-side layer (the cache) needs from the layer below it."""

    async def read(
        self, chunk: Chunk, locations: Sequence[Location], start: int, end: int
    ) -> bytes | bytearray: ...
