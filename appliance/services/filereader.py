"""Reading an opened version by whole chunk pieces, with read-ahead on sequential
access (the FUSE read path, ``appliance.services.files``)."""

from __future__ import annotations

import asyncio
import bisect
from collections import OrderedDict

from appliance.data.chunkstore import ChunkStorage
from appliance.meta.models import ChunkPlacement
from appliance.services.objects import ObjectHandle


class PieceReader:
    """Reads an opened version by whole chunk pieces, with read-ahead on sequential
    access; keeps at most ``keep`` pieces."""

    def __init__(
        self, chunks: ChunkStorage, handle: ObjectHandle, keep: int = 5, ahead: int = 3
    ) -> None:
        self._chunks = chunks
        self.handle = handle
        self._refs: list[ChunkPlacement] = sorted(
            (p for p in handle.layout if p.ref.length > 0), key=lambda p: p.ref.offset
        )
        self._starts = [p.ref.offset for p in self._refs]
        self._pieces: OrderedDict[int, asyncio.Task[bytes | bytearray]] = OrderedDict()
        self._keep = max(keep, ahead + 1)
        self._ahead = ahead
        self._last_end = -1

    def _piece(self, index: int) -> asyncio.Task[bytes | bytearray]:
        task = self._pieces.get(index)
        if task is not None:
            self._pieces.move_to_end(index)
            return task
        placement = self._refs[index]
        ref = placement.ref
        task = asyncio.ensure_future(
            self._chunks.read(
                placement.chunk,
                placement.locations,
                ref.chunk_offset,
                ref.chunk_offset + ref.length,
            )
        )
        self._pieces[index] = task
        while len(self._pieces) > self._keep:
            _, old = self._pieces.popitem(last=False)
            if not old.done():
                old.cancel()
        return task

    async def read(self, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)`` of the version (short at its end)."""
        end = min(offset + length, self.handle.version.size)
        if offset >= end:
            return b""
        sequential = offset == self._last_end
        index = bisect.bisect_right(self._starts, offset) - 1
        ref = self._refs[index].ref if 0 <= index < len(self._refs) else None
        if ref is not None and end <= ref.offset + ref.length:  # one piece: one copy
            data = await self._piece(index)
            self._last_end = end
            if sequential:
                self._read_ahead(index + 1 if end == ref.offset + ref.length else index)
            return bytes(memoryview(data)[offset - ref.offset : end - ref.offset])
        out = bytearray()
        pos = offset
        while pos < end and 0 <= index < len(self._refs):
            ref = self._refs[index].ref
            data = await self._piece(index)
            lo = pos - ref.offset
            hi = min(end, ref.offset + ref.length) - ref.offset
            out += memoryview(data)[lo:hi]
            pos = ref.offset + hi
            if pos >= ref.offset + ref.length:
                index += 1
        if len(out) < end - offset:  # a hole in the layout reads as zeros
            out += bytes(end - offset - len(out))
        self._last_end = end
        if sequential:
            self._read_ahead(index)
        return bytes(out)

    def _read_ahead(self, index: int) -> None:
        """Start loading pieces ``index`` and the next ones (sequential reading)."""
        for ahead in range(max(index, 0), min(index + self._ahead + 1, len(self._refs))):
            self._piece(ahead)

    def close(self) -> None:
        for task in self._pieces.values():
            if not task.done():
                task.cancel()
        self._pieces.clear()
