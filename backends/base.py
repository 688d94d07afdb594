"""The ``Backend`` port: the only view of an object store the core has.

A backend stores opaque blobs under string keys. Every implementation honours
the same contract, checked by ``tests/contract/test_backends.py``:

- ``put`` stores a whole blob atomically: a reader never sees a partial blob, and a
  failed put leaves nothing (or the previous blob) behind. Re-putting a key replaces it.
- ``get`` streams a blob or a byte range of it; ``BlobNotFound`` if absent. A stream
  that breaks mid-way raises ``TransientBackendError`` from the iterator.
- ``head`` returns ``BlobInfo``; ``BlobNotFound`` if absent.
- ``delete`` is idempotent: deleting an absent key succeeds.
- ``list`` yields blobs under a prefix in ascending key order, page by page, resuming
  after ``start_after``.
Errors are the classes of ``backends.errors`` only.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

BlobBody = bytes | bytearray | memoryview | AsyncIterable[bytes]
"""A blob's content: a buffer, or an async stream of pieces whose total is ``size``."""


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """What a backend knows about one stored blob."""

    key: str
    size: int
    modified: datetime | None = None
    etag: str | None = None


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do, so callers can plan (e.g. ranged reads, max blob size)."""

    ranged_get: bool = True
    max_blob_size: int | None = None
    max_key_length: int = 1024
    durable: bool = True
    """False for the memory backend: data does not survive the process."""


@dataclass(frozen=True, slots=True)
class ByteRange:
    """An inclusive-exclusive byte range ``[start, end)``; ``end=None`` means to the end."""

    start: int = 0
    end: int | None = None

    def __post_init__(self) -> None:
        if self.start < 0 or (self.end is not None and self.end < self.start):
            raise ValueError(f"invalid byte range [{self.start}, {self.end})")


class BlobStream(Protocol):
    """An async iterator of a blob's bytes that must be closed (``aclose``) when abandoned."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """An object store holding blobs. See the module docstring for the contract."""

    @property
    def name(self) -> str:
        """The backend's configured name, unique in the pool."""
        ...

    @property
    def capabilities(self) -> Capabilities: ...

    async def put(self, key: str, body: BlobBody, *, size: int) -> BlobInfo:
        """Store ``size`` bytes from ``body`` at ``key``; raise if fewer or more arrive."""
        ...

    async def get(self, key: str, byte_range: ByteRange | None = None) -> BlobStream:
        """Open a stream of the blob (or of ``byte_range``, clipped to the blob's size)."""
        ...

    async def head(self, key: str) -> BlobInfo: ...

    async def delete(self, key: str) -> None:
        """Remove ``key``; succeed when it is already absent (idempotent)."""
        ...

    def list(
        self, prefix: str = "", *, start_after: str | None = None, page_size: int = 1000
    ) -> AsyncIterator[BlobInfo]:
        """Yield blobs whose key starts with ``prefix``, ascending, after ``start_after``."""
        ...

    async def close(self) -> None:
        """Release connections and files; the backend is unusable afterwards."""
        ...
