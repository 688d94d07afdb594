"""Reusable chunk-sized buffers for the data path.

Why: the daemon makes glibc serve every allocation of 1 MiB or more with its own mmap
(so RSS does not ratchet, ``frontends.daemon``). A fresh 8 MiB buffer per chunk then
costs 2,048 page faults, each zeroing a page, and an munmap when it is freed: measured,
about a fifth of the daemon's CPU on a large GET and a tenth on a PUT. Buffers taken
from a ``BufferPool`` and given back are touched once and reused.

Contract: ``take(n)`` returns a ``PooledBuffer`` (a ``bytearray``) of exactly ``n``
bytes, with stale contents. ``give(buf)`` hands it back; the caller must hold no other
reference and must not use it afterwards. ``give_if_unshared`` is for buffers that
travelled through code the caller does not own (a cache may have kept one): it
recycles only when the CPython reference count shows nobody else holds the buffer,
a memoryview over it included. Anything that is not a ``PooledBuffer`` is ignored, so
callers may hand back whatever they got. Free buffers are bounded in bytes; the
oldest are dropped first. Not thread-safe: use it from the event loop's thread.
"""

from __future__ import annotations

import sys
from collections import OrderedDict

MIN_POOLED = 1 << 20
"""Smaller buffers come from malloc's heap, which reuses them without page faults."""


class PooledBuffer(bytearray):
    """A ``bytearray`` lent by a ``BufferPool``; usable wherever a bytearray is."""

    __slots__ = ()


class BufferPool:
    """Free ``PooledBuffer``s by exact length, at most ``max_free_bytes`` of them."""

    def __init__(self, max_free_bytes: int = 64 << 20) -> None:
        self._max = max_free_bytes
        self._free: OrderedDict[int, PooledBuffer] = OrderedDict()
        self._free_bytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def free_bytes(self) -> int:
        """Bytes held by free buffers."""
        return self._free_bytes

    def take(self, size: int) -> bytearray:
        """A buffer of exactly ``size`` bytes (contents undefined)."""
        if size < MIN_POOLED or self._max <= 0:
            return bytearray(size)
        for key, buf in reversed(self._free.items()):
            if len(buf) == size:
                del self._free[key]
                self._free_bytes -= size
                self.hits += 1
                return buf
        self.misses += 1
        return PooledBuffer(size)

    def give(self, buf: bytes | bytearray | memoryview) -> None:
        """Take back ``buf`` (no other reference may remain); others are ignored."""
        if not isinstance(buf, PooledBuffer) or len(buf) < MIN_POOLED:
            return
        size = len(buf)
        if size > self._max:
            return
        while self._free_bytes + size > self._max and self._free:
            _, old = self._free.popitem(last=False)
            self._free_bytes -= len(old)
        self._free[id(buf)] = buf
        self._free_bytes += size

    def give_if_unshared(self, buf: bytes | bytearray | memoryview, holders: int = 1) -> None:
        """Take back ``buf`` only when exactly ``holders`` references to it exist
        besides this call's own (the caller's variables that still name it)."""
        # getrefcount sees: the holders, this function's parameter, its own argument
        if isinstance(buf, PooledBuffer) and sys.getrefcount(buf) == holders + 2:
            self.give(buf)

    def clear(self) -> None:
        """Drop every free buffer (their memory goes back to the OS)."""
        self._free.clear()
        self._free_bytes = 0


HEADROOM = 16 * 1024
"""Bytes kept free in front of a chunk's data for its blob header (headers with the
object identity are a few hundred bytes; larger ones fall back to a copy)."""


class HeadroomBuffer:
    """A chunk's bytes at ``buf[room : room + size]``, with ``room`` bytes before them
    where a blob header can be written, so header and data go to a backend as one
    buffer without copying the data."""

    __slots__ = ("buf", "room", "size")

    def __init__(self, buf: bytearray, room: int, size: int) -> None:
        if room + size > len(buf):
            raise ValueError(f"{room} + {size} bytes do not fit a buffer of {len(buf)}")
        self.buf = buf
        self.room = room
        self.size = size

    def __len__(self) -> int:
        return self.size

    def view(self) -> memoryview:
        """The chunk's bytes (no copy)."""
        return memoryview(self.buf)[self.room : self.room + self.size]

    def framed(self, head: bytes) -> memoryview | None:
        """``head`` followed by the chunk's bytes, as one view (``head`` is written into
        the room); None when ``head`` is longer than the room."""
        if len(head) > self.room:
            return None
        start = self.room - len(head)
        self.buf[start : self.room] = head
        return memoryview(self.buf)[start : self.room + self.size]


ChunkPayload = bytes | bytearray | memoryview | HeadroomBuffer
"""What a chunk's bytes may be handed to ``write_chunk`` as."""


def payload_view(payload: ChunkPayload) -> bytes | bytearray | memoryview:
    """The bytes of a chunk payload, whatever form it was handed over in."""
    return payload.view() if isinstance(payload, HeadroomBuffer) else payload
