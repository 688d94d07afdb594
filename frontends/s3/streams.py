"""Small stream adapters shared by the body checkers.

A request body is consumed either as ``read(n)`` (a coroutine returning at most ``n`` bytes, and
``b""`` at the end of the body, like ``aiohttp.StreamReader.read``) or as an async iterator of
byte pieces. The checkers in this package yield the body as pieces and keep the *last* piece back
until every check on the whole body has passed, so a consumer that has received all the bytes
holds verified bytes, and a failed check is raised before the last byte is handed out.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable

from aiohttp import web

ReadFn = Callable[[int], Awaitable[bytes]]
"""``read(n)``: up to ``n`` bytes of the body, ``b""`` once the body is exhausted."""

DEFAULT_PIECE_SIZE = 512 * 1024
"""Under glibc's mmap threshold as the daemon sets it (1 MiB): pieces come from the heap
and are reused, not mapped and faulted in afresh."""


async def iter_read(read: ReadFn, piece_size: int = DEFAULT_PIECE_SIZE) -> AsyncIterator[bytes]:
    """Yield the body behind ``read`` in pieces of at most ``piece_size`` bytes until it ends."""
    if piece_size <= 0:
        raise ValueError("piece_size must be positive")
    while True:
        piece = await read(piece_size)
        if not piece:
            return
        if len(piece) > piece_size:  # a source that ignores n: split, never hand out more
            for start in range(0, len(piece), piece_size):
                yield piece[start : start + piece_size]
        else:
            yield piece


def reader_from_iterable(pieces: AsyncIterable[bytes]) -> ReadFn:
    """A ``read(n)`` over an async iterable of byte pieces (each call returns at most ``n``)."""
    iterator = aiter(pieces)
    pending = bytearray()
    done = False

    async def read(n: int) -> bytes:
        nonlocal done
        if n <= 0:
            return b""
        while not pending and not done:
            try:
                pending.extend(await anext(iterator))
            except StopAsyncIteration:
                done = True
        out = bytes(pending[:n])
        del pending[:n]
        return out

    return read


async def release_last_after_end(pieces: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Re-yield ``pieces`` (empty ones dropped), holding the latest one back until the source ends.

    When the source raises at its end (a failed digest or signature check), the consumer gets the
    exception without ever having received the final piece.
    """
    held: bytes | None = None
    async for piece in pieces:
        if not piece:
            continue
        if held is not None:
            yield held
        held = piece
    if held is not None:
        yield held


SEND_SLICE = 512 * 1024
"""A large piece is handed to the transport in slices of this size: each is sent at once
when the socket has room, instead of the unsent rest of a whole chunk being copied into
a transport buffer of that size (and that buffer being mapped and faulted in afresh)."""


async def send_piece(response: web.StreamResponse, piece: bytes | bytearray) -> None:
    """Write ``piece`` to the response; no reference to it is kept afterwards."""
    if len(piece) <= SEND_SLICE:
        await response.write(piece)
        return
    view = memoryview(piece)
    try:
        for at in range(0, len(view), SEND_SLICE):
            await response.write(view[at : at + SEND_SLICE])
    finally:
        view.release()
