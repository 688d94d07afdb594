"""A ``Backend`` wrapper that retries transient failures with backoff.

The one place where Cairn retries backend calls. Only errors for which
``backends.errors.is_transient`` is true are retried; everything else propagates at once.

- Backoff is exponential with full jitter: before retry ``n`` (0-based) it sleeps a
  uniform random time in ``[0, min(max_delay, base_delay * 2**n)]``.
- ``attempts`` bounds the tries of one call, the first included. For ``get`` the budget
  covers the open *and* every resume of the stream; for ``list`` every restart.
- ``get`` resumes a stream that breaks mid-way by reopening at ``start + delivered``,
  so the caller sees one continuous stream. This assumes a blob does not change while
  it is read, which holds for Cairn (blobs are never overwritten).
- ``put`` with a buffer body is retried (putting the same bytes twice is harmless); a
  put with an async-iterable body is **not** retried, since the stream cannot be replayed.
- ``list`` restarts after the last key it yielded, so no key is repeated or skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from backends.base import Backend, BlobBody, BlobInfo, BlobStream, ByteRange, Capabilities
from backends.errors import is_transient

_T = TypeVar("_T")

Sleep = Callable[[float], Awaitable[object]]


class RetryingBackend:
    """Wraps ``inner`` and retries its transient failures; see the module docstring.

    ``retries`` counts every retry made (each sleep), ``resumes`` the stream resumptions.
    """

    def __init__(
        self,
        inner: Backend,
        *,
        attempts: int = 5,
        base_delay: float = 0.05,
        max_delay: float = 5.0,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.inner = inner
        self._attempts = attempts
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.retries = 0
        self.resumes = 0

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    @property
    def attempts(self) -> int:
        return self._attempts

    async def backoff(self, retry: int) -> None:
        """Count one retry and sleep before it (``retry`` is 0 for the first retry)."""
        self.retries += 1
        cap = min(self._max_delay, self._base_delay * 2.0**retry)
        await self._sleep(self._rng.uniform(0.0, cap))

    async def _call(self, fn: Callable[[], Awaitable[_T]]) -> _T:
        for attempt in range(self._attempts):
            try:
                return await fn()
            except Exception as exc:
                if not is_transient(exc) or attempt + 1 >= self._attempts:
                    raise
            await self.backoff(attempt)
        raise AssertionError("unreachable")

    async def put(self, key: str, body: BlobBody, *, size: int) -> BlobInfo:
        """Put, retrying transient failures unless ``body`` is a (non-replayable) stream."""
        if isinstance(body, bytes | bytearray | memoryview):
            return await self._call(lambda: self.inner.put(key, body, size=size))
        return await self.inner.put(key, body, size=size)

    async def get(self, key: str, byte_range: ByteRange | None = None) -> BlobStream:
        """Open a stream that retries its open and resumes after transient breaks."""
        stream = _ResumingStream(self, key, byte_range or ByteRange())
        await stream.open()
        return stream

    async def head(self, key: str) -> BlobInfo:
        return await self._call(lambda: self.inner.head(key))

    async def delete(self, key: str) -> None:
        await self._call(lambda: self.inner.delete(key))

    def list(
        self, prefix: str = "", *, start_after: str | None = None, page_size: int = 1000
    ) -> AsyncIterator[BlobInfo]:
        """List, restarting after the last yielded key when the listing fails transiently."""
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        return self._list(prefix, start_after, page_size)

    async def _list(
        self, prefix: str, start_after: str | None, page_size: int
    ) -> AsyncIterator[BlobInfo]:
        last = start_after
        failures = 0
        while True:
            listing = self.inner.list(prefix, start_after=last, page_size=page_size)
            try:
                async for info in listing:
                    last = info.key
                    yield info
                return
            except Exception as exc:
                failures += 1
                if not is_transient(exc) or failures >= self._attempts:
                    raise
            finally:
                aclose = getattr(listing, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()
            await self.backoff(failures - 1)

    async def close(self) -> None:
        await self.inner.close()


class _ResumingStream:
    """The stream ``RetryingBackend.get`` returns: one logical stream over many opens."""

    def __init__(self, owner: RetryingBackend, key: str, byte_range: ByteRange) -> None:
        self._owner = owner
        self._key = key
        self._range = byte_range
        self._delivered = 0
        self._failures = 0
        self._current: BlobStream | None = None
        self._iter: AsyncIterator[bytes] | None = None
        self._done = False

    async def open(self) -> None:
        """Open (or reopen at the resume point), spending the shared attempt budget."""
        while True:
            start = self._range.start + self._delivered
            try:
                stream = await self._owner.inner.get(self._key, ByteRange(start, self._range.end))
            except Exception as exc:
                await self._fail(exc)
                continue
            self._current, self._iter = stream, stream.__aiter__()
            return

    async def _fail(self, exc: Exception) -> None:
        """Re-raise ``exc`` unless it is transient and the budget allows another try."""
        self._failures += 1
        if not is_transient(exc) or self._failures >= self._owner.attempts:
            await self.aclose()
            raise exc
        await self._owner.backoff(self._failures - 1)

    def __aiter__(self) -> _ResumingStream:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._done or self._iter is None:
                raise StopAsyncIteration
            try:
                piece = await self._iter.__anext__()
            except StopAsyncIteration:
                await self.aclose()
                raise
            except Exception as exc:
                await self._close_current()
                await self._fail(exc)
                end = self._range.end
                if end is not None and self._range.start + self._delivered >= end:
                    await self.aclose()  # everything arrived; only the tail call broke
                    raise StopAsyncIteration from None
                self._owner.resumes += 1
                await self.open()
                continue
            self._delivered += len(piece)
            return piece

    async def _close_current(self) -> None:
        current, self._current, self._iter = self._current, None, None
        if current is not None:
            with contextlib.suppress(Exception):
                await current.aclose()

    async def aclose(self) -> None:
        self._done = True
        await self._close_current()
