"""An in-process backend holding blobs in a dict: for tests and ephemeral pools.

Data does not survive the process (``Capabilities.durable`` is False). A put is atomic:
the body is collected and its length checked before the blob becomes visible.

Also home of :func:`collect_body`, the one helper every adapter that needs a whole blob
in memory (memory, S3) uses to read a ``BlobBody`` and enforce its declared size.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

from backends.base import BlobBody, BlobInfo, BlobStream, ByteRange, Capabilities
from backends.errors import (
    BackendError,
    BackendFull,
    BlobNotFound,
    PermanentBackendError,
    TransientBackendError,
)
from backends.local import clip_range, validate_key

PIECE_SIZE = 1024 * 1024
"""Streams yield pieces of at most this many bytes."""


async def collect_body(body: BlobBody, size: int, *, backend: str = "") -> bytes:
    """Read all of ``body`` and return it, enforcing that exactly ``size`` bytes arrive.

    Raises ``PermanentBackendError`` when a buffer's length differs from ``size`` or a
    stream yields more than ``size`` bytes (stops reading at once); raises
    ``TransientBackendError`` when a stream ends early or its iterator raises a
    non-backend exception (a ``BackendError`` from the iterator propagates unchanged).
    """
    if size < 0:
        raise PermanentBackendError(f"negative blob size {size}", backend=backend)
    if isinstance(body, bytes | bytearray | memoryview):
        data = bytes(body)
        if len(data) != size:
            raise PermanentBackendError(
                f"body has {len(data)} bytes but size is {size}", backend=backend
            )
        return data
    buf = bytearray()
    try:
        async for piece in body:
            buf += piece
            if len(buf) > size:
                raise PermanentBackendError(
                    f"body yielded more than the declared {size} bytes", backend=backend
                )
    except BackendError:
        raise
    except Exception as exc:
        raise TransientBackendError(
            f"body stream failed after {len(buf)} bytes: {exc!r}", backend=backend
        ) from exc
    if len(buf) != size:
        raise TransientBackendError(
            f"body stream ended after {len(buf)} of {size} bytes", backend=backend
        )
    return bytes(buf)


@dataclass(frozen=True, slots=True)
class _Blob:
    data: bytes
    modified: datetime
    etag: str


class _BytesStream:
    """A ``BlobStream`` over an in-memory buffer, yielding ``PIECE_SIZE`` pieces."""

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._pos = 0
        self._closed = False

    def __aiter__(self) -> _BytesStream:
        return self

    async def __anext__(self) -> bytes:
        if self._closed or self._pos >= len(self._data):
            raise StopAsyncIteration
        piece = bytes(self._data[self._pos : self._pos + PIECE_SIZE])
        self._pos += len(piece)
        await asyncio.sleep(0)  # let other tasks run between pieces, like real I/O would
        return piece

    async def aclose(self) -> None:
        self._closed = True


class MemoryBackend:
    """Blobs in a dict. Keys follow :func:`backends.local.validate_key` so that a key
    accepted here is accepted by every backend."""

    def __init__(self, name: str, *, capabilities: Capabilities | None = None) -> None:
        self._name = name
        self._capabilities = capabilities or Capabilities(durable=False)
        self._blobs: dict[str, _Blob] = {}
        self._closed = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def _check_open(self) -> None:
        if self._closed:
            raise PermanentBackendError("backend is closed", backend=self._name)

    def _info(self, key: str, blob: _Blob) -> BlobInfo:
        return BlobInfo(key=key, size=len(blob.data), modified=blob.modified, etag=blob.etag)

    async def put(self, key: str, body: BlobBody, *, size: int) -> BlobInfo:
        """Store the blob once all ``size`` bytes have arrived; see :func:`collect_body`."""
        self._check_open()
        validate_key(key, backend=self._name)
        limit = self._capabilities.max_blob_size
        if limit is not None and size > limit:
            raise BackendFull(f"blob of {size} bytes exceeds the limit {limit}", backend=self._name)
        data = await collect_body(body, size, backend=self._name)
        self._check_open()
        blob = _Blob(data, datetime.now(UTC), hashlib.md5(data, usedforsecurity=False).hexdigest())
        self._blobs[key] = blob
        return self._info(key, blob)

    async def get(self, key: str, byte_range: ByteRange | None = None) -> BlobStream:
        """Stream a snapshot of the blob (or the clipped range); ``BlobNotFound`` if absent."""
        blob = self._lookup(key)
        start, end = clip_range(byte_range, len(blob.data))
        return _BytesStream(memoryview(blob.data)[start:end])

    async def head(self, key: str) -> BlobInfo:
        """Return the blob's info; ``BlobNotFound`` if absent."""
        return self._info(key, self._lookup(key))

    async def delete(self, key: str) -> None:
        """Remove the blob; idempotent."""
        self._check_open()
        validate_key(key, backend=self._name)
        self._blobs.pop(key, None)

    def list(
        self, prefix: str = "", *, start_after: str | None = None, page_size: int = 1000
    ) -> AsyncIterator[BlobInfo]:
        """Yield blobs under ``prefix`` in ascending key order, after ``start_after``."""
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        return self._list(prefix, start_after)

    async def _list(self, prefix: str, start_after: str | None) -> AsyncIterator[BlobInfo]:
        self._check_open()
        keys = sorted(
            k
            for k in self._blobs
            if k.startswith(prefix) and (start_after is None or k > start_after)
        )
        for key in keys:
            blob = self._blobs.get(key)
            if blob is not None:  # deleted while we were paused
                yield self._info(key, blob)

    async def close(self) -> None:
        """Drop all blobs; later calls raise ``PermanentBackendError``."""
        self._closed = True
        self._blobs.clear()

    def _lookup(self, key: str) -> _Blob:
        self._check_open()
        validate_key(key, backend=self._name)
        blob = self._blobs.get(key)
        if blob is None:
            raise BlobNotFound(f"no blob {key!r}", backend=self._name)
        return blob
