"""A ``Backend`` wrapper that injects faults, for tests.

Faults are programmed per operation (``put``, ``get``, ``head``, ``delete``, ``list``)
and counted per call; a ``list`` call counts (and fails) when iteration starts. The
order in each call is: count, add latency, raise a programmed fault, delegate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Literal, get_args

from backends.base import Backend, BlobBody, BlobInfo, BlobStream, ByteRange, Capabilities
from backends.errors import TransientBackendError

Op = Literal["put", "get", "head", "delete", "list"]
OPS: tuple[Op, ...] = get_args(Op)


class FaultyBackend:
    """Wraps ``inner``; programmed faults fire before the call reaches it.

    ``calls[op]`` counts the calls of each operation made through this wrapper.
    """

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.calls: dict[str, int] = dict.fromkeys(OPS, 0)
        self._nth: dict[str, dict[int, BaseException | None]] = {op: {} for op in OPS}
        self._always: dict[str, BaseException | None] = {}
        self._cuts: list[int] = []
        self._latency = 0.0

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    # -- programming -----------------------------------------------------------------

    def fail_call(self, op: Op, nth: int, exc: BaseException | None = None) -> None:
        """Fail the ``nth`` call of ``op`` from now (1 = the next one) with ``exc``
        (default: a ``TransientBackendError``)."""
        _check_op(op)
        if nth < 1:
            raise ValueError("nth counts from 1")
        self._nth[op][self.calls[op] + nth] = exc

    def fail_next(self, op: Op, count: int, exc: BaseException | None = None) -> None:
        """Fail the next ``count`` calls of ``op``."""
        for nth in range(1, count + 1):
            self.fail_call(op, nth, exc)

    def fail_always(self, op: Op, exc: BaseException | None = None) -> None:
        """Fail every call of ``op`` until :meth:`clear`."""
        _check_op(op)
        self._always[op] = exc

    def cut_stream_after(self, nbytes: int, times: int = 1) -> None:
        """Make the next ``times`` get streams raise ``TransientBackendError`` once they
        have yielded ``nbytes`` bytes (a shorter stream ends normally)."""
        if nbytes < 0 or times < 0:
            raise ValueError("nbytes and times must not be negative")
        self._cuts.extend([nbytes] * times)

    def latency(self, seconds: float) -> None:
        """Delay every call by ``seconds`` (0 turns it off)."""
        self._latency = seconds

    def clear(self) -> None:
        """Remove all programmed faults and latency (call counts are kept)."""
        for pending in self._nth.values():
            pending.clear()
        self._always.clear()
        self._cuts.clear()
        self._latency = 0.0

    # -- the Backend protocol -------------------------------------------------------

    async def _enter(self, op: Op) -> None:
        self.calls[op] += 1
        number = self.calls[op]
        if self._latency > 0:
            await asyncio.sleep(self._latency)
        if op in self._always:
            raise self._always[op] or self._fault(op, number)
        if number in self._nth[op]:
            raise self._nth[op].pop(number) or self._fault(op, number)

    def _fault(self, op: str, number: int) -> TransientBackendError:
        return TransientBackendError(f"injected fault in {op} call #{number}", backend=self.name)

    async def put(self, key: str, body: BlobBody, *, size: int) -> BlobInfo:
        await self._enter("put")
        return await self.inner.put(key, body, size=size)

    async def get(self, key: str, byte_range: ByteRange | None = None) -> BlobStream:
        await self._enter("get")
        stream = await self.inner.get(key, byte_range)
        if self._cuts:
            return _CutStream(stream, self._cuts.pop(0), backend=self.name)
        return stream

    async def head(self, key: str) -> BlobInfo:
        await self._enter("head")
        return await self.inner.head(key)

    async def delete(self, key: str) -> None:
        await self._enter("delete")
        await self.inner.delete(key)

    def list(
        self, prefix: str = "", *, start_after: str | None = None, page_size: int = 1000
    ) -> AsyncIterator[BlobInfo]:
        return self._list(prefix, start_after, page_size)

    async def _list(
        self, prefix: str, start_after: str | None, page_size: int
    ) -> AsyncIterator[BlobInfo]:
        await self._enter("list")
        async for info in self.inner.list(prefix, start_after=start_after, page_size=page_size):
            yield info

    async def close(self) -> None:
        await self.inner.close()


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown operation {op!r}; expected one of {OPS}")


class _CutStream:
    """Passes ``inner`` through until ``limit`` bytes, then raises ``TransientBackendError``."""

    def __init__(self, inner: BlobStream, limit: int, *, backend: str) -> None:
        self._inner = inner
        self._iter = inner.__aiter__()
        self._left = limit
        self._backend = backend

    def __aiter__(self) -> _CutStream:
        return self

    async def __anext__(self) -> bytes:
        if self._left == 0:
            await self._inner.aclose()
            raise TransientBackendError("injected stream cut", backend=self._backend)
        piece = await self._iter.__anext__()
        if len(piece) > self._left:
            piece = piece[: self._left]
        self._left -= len(piece)
        return piece

    async def aclose(self) -> None:
        await self._inner.aclose()
