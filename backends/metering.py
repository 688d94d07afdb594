"""A ``Backend`` wrapper that counts requests and bytes for monthly usage caps.

Every call is reported to ``record(backend, requests, egress_bytes, ingress_bytes)`` as
it happens — failed calls too, since the provider counts them. Egress is counted as
bytes are streamed, so an abandoned read counts only what was received. ``list`` counts
one request per page (``1 + items // page_size``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from backends.base import Backend, BlobBody, BlobInfo, BlobStream, ByteRange, Capabilities

Recorder = Callable[[str, int, int, int], None]
"""``record(backend, requests, egress_bytes, ingress_bytes)``; must not block."""


class _MeteredStream:
    def __init__(self, inner: BlobStream, record: Callable[[int], None]) -> None:
        self._inner = inner
        self._record = record

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[bytes]:
        async for piece in self._inner:
            self._record(len(piece))
            yield piece

    async def aclose(self) -> None:
        await self._inner.aclose()


class MeteredBackend:
    """Wraps ``inner`` and reports usage of every call to ``record``."""

    def __init__(self, inner: Backend, record: Recorder) -> None:
        self.inner = inner
        self._record = record

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    async def put(self, key: str, body: BlobBody, *, size: int) -> BlobInfo:
        self._record(self.name, 1, 0, size)
        return await self.inner.put(key, body, size=size)

    async def get(self, key: str, byte_range: ByteRange | None = None) -> BlobStream:
        self._record(self.name, 1, 0, 0)
        stream = await self.inner.get(key, byte_range)
        return _MeteredStream(stream, lambda n: self._record(self.name, 0, n, 0))

    async def head(self, key: str) -> BlobInfo:
        self._record(self.name, 1, 0, 0)
        return await self.inner.head(key)

    async def delete(self, key: str) -> None:
        self._record(self.name, 1, 0, 0)
        await self.inner.delete(key)

    def list(
        self, prefix: str = "", *, start_after: str | None = None, page_size: int = 1000
    ) -> AsyncIterator[BlobInfo]:
        return self._list(prefix, start_after, page_size)

    async def _list(
        self, prefix: str, start_after: str | None, page_size: int
    ) -> AsyncIterator[BlobInfo]:
        self._record(self.name, 1, 0, 0)
        count = 0
        async for info in self.inner.list(prefix, start_after=start_after, page_size=page_size):
            count += 1
            if count % page_size == 0:
                self._record(self.name, 1, 0, 0)
            yield info

    async def close(self) -> None:
        await self.inner.close()
