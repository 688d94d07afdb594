"""A disk cache of blob reads: a ``Backend`` wrapper that keeps what ``get`` returned.

It sits *below* decryption (see docs/cache.md): what it stores is exactly what the
provider returned for ``(backend, blob key, byte range)``, so with encryption on it
only ever holds ciphertext, never plaintext. Blob keys are never reused with other
content (Cairn never overwrites a blob), so a cached range never goes stale; ``put`` and
``delete`` of a key drop its entries anyway.

Contracts:

- ``DiskCache`` owns one directory (``open`` takes an exclusive ``flock`` on
  ``<dir>/.lock``; a second process gets ``DiskCacheBusy``). Entries are files
  ``<dir>/<hh>/<sha256 of backend, key, range>``; the total size of entry files and
  writes in progress never exceeds ``max_size``; the least recently used entry goes
  first. ``open`` rebuilds the index from the directory (order by modification time,
  which a hit refreshes), deleting temporary and unreadable files.
- Each entry carries a header (magic, range, backend and key) protected by a CRC-32
  and a CRC-32 per 256 KiB block of data. A hit reads and checks only the blocks it
  needs; a failed check deletes the entry and the read goes to the backend instead
  (``corrupt`` counts these). A vanished file (evicted under a reader) likewise.
- Entries are written to a temporary file and renamed into place (readers never see a
  partial entry), in a worker thread after the stream was read to its end; a read that
  was abandoned or failed stores nothing. At most ``max_pending`` bytes wait to be
  written; beyond that, reads are simply not cached.
- Only ``get`` is cached. Hits make no backend call (and so count no usage).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import struct
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from backends.base import Backend, BlobBody, BlobInfo, BlobStream, ByteRange, Capabilities

log = logging.getLogger("cairn.diskcache")

MAGIC = b"CAIRNDC1"
BLOCK_SIZE = 256 * 1024
HIT_PIECE = 32 * BLOCK_SIZE
"""A hit is read from disk in pieces of up to 8 MiB (one worker-thread call each)."""
_FIXED = struct.Struct("<8sIB3xQQIHH")
"""magic, header length, flags, start, length, block size, backend length, key length."""
_TO_END = 1
_CRC = struct.Struct("<I")
TEMP_DIR = "tmp"
MAX_CHANGED = 65536


class DiskCacheBusy(OSError):
    """Another process holds the cache directory."""


@dataclass(slots=True)
class _Entry:
    name: str
    backend: str
    key: str
    start: int
    length: int
    to_end: bool
    file_size: int

    @property
    def end(self) -> int:
        return self.start + self.length

    def serves(self, start: int, end: int | None) -> tuple[int, int] | None:
        """The part of this entry a request ``[start, end)`` gets, or None if not covered."""
        if start < self.start:
            return None
        if end is None:
            return (start, max(start, self.end)) if self.to_end else None
        if end <= self.end:
            return start, end
        return (start, max(start, self.end)) if self.to_end else None


@dataclass(frozen=True, slots=True)
class DiskCacheStats:
    hits: int
    misses: int
    stored: int
    evictions: int
    corrupt: int
    entries: int
    size: int
    max_size: int


def entry_name(backend: str, key: str, start: int, length: int, to_end: bool) -> str:
    """The file name of an entry: a digest of what it holds (checked when reloaded)."""
    ident = f"{backend}\n{key}\n{start}\n{length}\n{int(to_end)}"
    return hashlib.sha256(ident.encode("utf-8", "surrogatepass")).hexdigest()


def _header(entry: _Entry, crcs: Sequence[int]) -> bytes:
    backend = entry.backend.encode()
    key = entry.key.encode("utf-8", "surrogatepass")
    size = _FIXED.size + len(backend) + len(key) + 4 * len(crcs) + _CRC.size
    body = (
        _FIXED.pack(
            MAGIC,
            size,
            _TO_END if entry.to_end else 0,
            entry.start,
            entry.length,
            BLOCK_SIZE,
            len(backend),
            len(key),
        )
        + backend
        + key
        + b"".join(_CRC.pack(c) for c in crcs)
    )
    return body + _CRC.pack(zlib.crc32(body))


def _header_size(entry: _Entry) -> int:
    blocks = -(-entry.length // BLOCK_SIZE)
    return (
        _FIXED.size
        + len(entry.backend.encode())
        + len(entry.key.encode("utf-8", "surrogatepass"))
        + 4 * blocks
        + _CRC.size
    )


class _Corrupt(Exception):
    pass


def _parse_header(fd: int, name: str) -> tuple[_Entry, list[int]]:
    """Read and check an entry file's header; raises ``_Corrupt``."""
    fixed = os.pread(fd, _FIXED.size, 0)
    if len(fixed) != _FIXED.size:
        raise _Corrupt("short header")
    magic, size, flags, start, length, block, blen, klen = _FIXED.unpack(fixed)
    count = -(-length // BLOCK_SIZE)
    if (
        magic != MAGIC
        or block != BLOCK_SIZE
        or size != _FIXED.size + blen + klen + 4 * count + _CRC.size
    ):
        raise _Corrupt("bad header")
    raw = os.pread(fd, size, 0)
    if len(raw) != size or zlib.crc32(raw[:-4]) != _CRC.unpack(raw[-4:])[0]:
        raise _Corrupt("header checksum mismatch")
    pos = _FIXED.size
    try:
        backend = raw[pos : pos + blen].decode()
        key = raw[pos + blen : pos + blen + klen].decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as exc:
        raise _Corrupt("bad names") from exc
    pos += blen + klen
    crcs = list(struct.unpack(f"<{count}I", raw[pos : pos + 4 * count]))
    entry = _Entry(name, backend, key, start, length, bool(flags & _TO_END), size + length)
    return entry, crcs


def _read_range(path: Path, entry: _Entry, start: int, end: int) -> bytes:
    """Blob bytes ``[start, end)`` from an entry file, every block touched checked.

    Raises ``FileNotFoundError`` (evicted) or ``_Corrupt``.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        if os.fstat(fd).st_size != entry.file_size:
            raise _Corrupt("wrong file size")
        found, crcs = _parse_header(fd, entry.name)
        if (found.backend, found.key, found.start, found.length) != (
            entry.backend,
            entry.key,
            entry.start,
            entry.length,
        ):
            raise _Corrupt("header names another entry")
        header = entry.file_size - entry.length
        first = (start - entry.start) // BLOCK_SIZE
        last = -(-(end - entry.start) // BLOCK_SIZE)
        offset = first * BLOCK_SIZE
        data = os.pread(fd, min(last * BLOCK_SIZE, entry.length) - offset, header + offset)
        view = memoryview(data)
        for i in range(first, last):
            lo = (i - first) * BLOCK_SIZE
            if zlib.crc32(view[lo : lo + BLOCK_SIZE]) != crcs[i]:
                raise _Corrupt(f"block {i} checksum mismatch")
        with contextlib.suppress(OSError):
            os.utime(fd)  # recency survives a restart
        lo = start - entry.start - offset
        return data[lo : lo + (end - start)]
    finally:
        os.close(fd)


def _write_entry(
    root: Path, entry: _Entry, pieces: Sequence[bytes], doomed: Sequence[Path] = ()
) -> None:
    """Delete evicted files (``doomed``), then write an entry to a temporary file and
    rename it into place (not fsynced: a torn entry fails its checks and is dropped)."""
    for path in doomed:
        path.unlink(missing_ok=True)
    crcs: list[int] = []
    crc, filled = 0, 0
    for piece in pieces:
        view = memoryview(piece)
        while view:
            take = min(len(view), BLOCK_SIZE - filled)
            crc = zlib.crc32(view[:take], crc)
            filled += take
            view = view[take:]
            if filled == BLOCK_SIZE:
                crcs.append(crc)
                crc, filled = 0, 0
    if filled:
        crcs.append(crc)
    header = _header(entry, crcs)
    tmp = root / TEMP_DIR / f"{entry.name}.{secrets.token_hex(4)}"
    final = root / entry.name[:2] / entry.name
    with open(tmp, "wb") as out:
        out.write(header)
        for piece in pieces:
            out.write(piece)
    try:
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _scan(root: Path) -> list[tuple[float, _Entry]]:
    """Every valid entry under ``root`` with its mtime; removes temporary and bad files."""
    tmp = root / TEMP_DIR
    for leftover in tmp.iterdir():
        leftover.unlink(missing_ok=True)
    found: list[tuple[float, _Entry]] = []
    for shard in root.iterdir():
        if shard.name == TEMP_DIR or not shard.is_dir() or len(shard.name) != 2:
            continue
        for path in shard.iterdir():
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                entry, _ = _parse_header(fd, path.name)
                valid = st.st_size == entry.file_size and path.name == entry_name(
                    entry.backend, entry.key, entry.start, entry.length, entry.to_end
                )
            except (_Corrupt, OSError, struct.error):
                valid = False
            finally:
                os.close(fd)
            if valid:
                found.append((st.st_mtime, entry))
            else:
                path.unlink(missing_ok=True)
    found.sort(key=lambda item: item[0])
    return found


class DiskCache:
    """The shared store of cached blob ranges under one directory; see the module doc."""

    def __init__(self, root: Path, max_size: int, *, max_pending: int = 64 * 1024**2) -> None:
        if max_size <= 0:
            raise ValueError("max_size must be positive")
        self.root = Path(root)
        self.max_size = max_size
        self.max_pending = max_pending
        self._lru: OrderedDict[str, _Entry] = OrderedDict()
        self._by_blob: dict[tuple[str, str], dict[str, _Entry]] = {}
        self._size = 0
        self._pending = 0
        self._writes: set[asyncio.Task[None]] = set()
        self._lock_fd: int | None = None
        self._seq = 0
        self._changed: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._changed_floor = 0
        """Keys written or deleted, with the sequence number of their last change (the
        newest ``MAX_CHANGED``); a read that began before a change of its key stores
        nothing. ``_changed_floor`` is the newest change forgotten."""
        self.hits = 0
        self.misses = 0
        self.stored = 0
        self.evictions = 0
        self.corrupt = 0

    # -- life cycle ------------------------------------------------------------------
    async def open(self) -> None:
        """Lock the directory and rebuild the index. Raises ``DiskCacheBusy``, ``OSError``."""
        await asyncio.to_thread(self._lock)
        try:
            entries = await asyncio.to_thread(_scan, self.root)
        except BaseException:
            self._unlock()
            raise
        for _, entry in entries:
            self._add(entry)
        self._size = sum(e.file_size for e in self._lru.values())
        doomed = self._make_room(0)
        await asyncio.to_thread(self._unlink, doomed)

    def _lock(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for shard in [TEMP_DIR, *(f"{i:02x}" for i in range(256))]:
            (self.root / shard).mkdir(exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DiskCacheBusy(f"{self.root} is used by another process") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    async def close(self) -> None:
        """Finish writes in progress and release the directory. Idempotent."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        self._unlock()

    def stats(self) -> DiskCacheStats:
        return DiskCacheStats(
            self.hits,
            self.misses,
            self.stored,
            self.evictions,
            self.corrupt,
            len(self._lru),
            self._size,
            self.max_size,
        )

    @property
    def size(self) -> int:
        """Bytes of entry files, writes in progress included."""
        return self._size

    # -- the index (loop thread only) ------------------------------------------------
    def _path(self, name: str) -> Path:
        return self.root / name[:2] / name

    def _add(self, entry: _Entry) -> None:
        self._lru[entry.name] = entry
        self._by_blob.setdefault((entry.backend, entry.key), {})[entry.name] = entry

    def _remove(self, entry: _Entry) -> bool:
        if self._lru.pop(entry.name, None) is None:
            return False
        blob = self._by_blob.get((entry.backend, entry.key), {})
        blob.pop(entry.name, None)
        if not blob:
            self._by_blob.pop((entry.backend, entry.key), None)
        self._size -= entry.file_size
        return True

    def _make_room(self, needed: int) -> list[Path]:
        """Evict least recently used entries until ``needed`` more bytes fit."""
        doomed: list[Path] = []
        while self._lru and self._size + needed > self.max_size:
            entry = next(iter(self._lru.values()))
            self._remove(entry)
            self.evictions += 1
            doomed.append(self._path(entry.name))
        return doomed

    @staticmethod
    def _unlink(paths: Sequence[Path]) -> None:
        for path in paths:
            path.unlink(missing_ok=True)

    def lookup(self, backend: str, key: str, start: int, end: int | None) -> _Entry | None:
        for entry in self._by_blob.get((backend, key), {}).values():
            if entry.serves(start, end) is not None:
                self._lru.move_to_end(entry.name)
                return entry
        return None

    @property
    def seq(self) -> int:
        """The current change sequence number (a read notes it when it starts)."""
        return self._seq

    def changed_since(self, backend: str, key: str, seq: int) -> bool:
        """Was the blob written or deleted after ``seq``? (True when unsure.)"""
        if seq < self._changed_floor:
            return True
        return self._changed.get((backend, key), 0) > seq

    async def drop(self, backend: str, key: str) -> None:
        """Forget every entry of one blob: it is being (or was) overwritten or deleted.
        Reads of it that are in flight store nothing."""
        self._seq += 1
        self._changed[(backend, key)] = self._seq
        self._changed.move_to_end((backend, key))
        while len(self._changed) > MAX_CHANGED:
            _, forgotten = self._changed.popitem(last=False)
            self._changed_floor = max(self._changed_floor, forgotten)
        entries = list(self._by_blob.get((backend, key), {}).values())
        for entry in entries:
            self._remove(entry)
        if entries:
            await asyncio.to_thread(self._unlink, [self._path(e.name) for e in entries])

    async def read(self, entry: _Entry, start: int, end: int) -> bytes | None:
        """Checked bytes ``[start, end)`` of an entry, or None when it is gone or bad
        (a bad entry is deleted)."""
        try:
            return await asyncio.to_thread(_read_range, self._path(entry.name), entry, start, end)
        except FileNotFoundError:
            self._remove(entry)
            return None
        except (_Corrupt, OSError, struct.error) as exc:
            self.corrupt += 1
            log.warning(
                "disk cache entry for %s:%s is damaged (%s); reading from the backend",
                entry.backend,
                entry.key,
                exc,
            )
            if self._remove(entry):
                await asyncio.to_thread(self._unlink, [self._path(entry.name)])
            return None

    # -- storing ---------------------------------------------------------------------
    def may_record(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` of the pending-write budget; False when it is used up."""
        if self._pending + nbytes > self.max_pending or nbytes > self.max_size:
            return False
        self._pending += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self._pending -= nbytes

    def store(self, entry: _Entry, pieces: list[bytes], reserved: int, seq: int) -> None:
        """Write an entry in the background unless its blob changed after ``seq``;
        ``reserved`` pending bytes are released when done."""
        if self.changed_since(entry.backend, entry.key, seq):
            self.release(reserved)
            return
        task = asyncio.ensure_future(self._store(entry, pieces, reserved, seq))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _store(self, entry: _Entry, pieces: list[bytes], reserved: int, seq: int) -> None:
        try:
            if entry.name in self._lru or entry.file_size > self.max_size:
                return
            doomed = self._make_room(entry.file_size)
            self._size += entry.file_size  # reserved while it is written
            try:
                await asyncio.to_thread(_write_entry, self.root, entry, pieces, doomed)
            except BaseException as exc:
                self._size -= entry.file_size
                if isinstance(exc, OSError):
                    log.warning("could not write a disk cache entry: %s", exc)
                    return
                raise
            if entry.name in self._lru or self.changed_since(entry.backend, entry.key, seq):
                # stored meanwhile by a twin read (same bytes), or the blob changed
                self._size -= entry.file_size
                if entry.name not in self._lru:
                    await asyncio.to_thread(self._unlink, [self._path(entry.name)])
                return
            self._add(entry)
            self.stored += 1
        finally:
            self.release(reserved)


class _HitStream:
    """Serves a request from a cache entry, falling back to the backend for the rest if
    the entry goes away or fails its check part-way."""

    def __init__(
        self,
        owner: DiskCachedBackend,
        entry: _Entry,
        key: str,
        first: bytes,
        start: int,
        stop: int,
        requested_end: int | None,
    ) -> None:
        self._owner = owner
        self._entry = entry
        self._key = key
        self._first: bytes | None = first
        self._pos = start + len(first)
        self._stop = stop
        self._requested_end = requested_end
        self._fallback: BlobStream | None = None
        self._closed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[bytes]:
        if self._first:
            first, self._first = self._first, None
            yield first
        cache = self._owner.cache
        while self._pos < self._stop and not self._closed:
            end = min(self._stop, self._pos + HIT_PIECE)
            data = await cache.read(self._entry, self._pos, end)
            if data is None:
                self._fallback = await self._owner.inner.get(
                    self._key, ByteRange(self._pos, self._requested_end)
                )
                async for piece in self._fallback:
                    yield piece
                return
            self._pos = end
            yield data

    async def aclose(self) -> None:
        self._closed = True
        fallback, self._fallback = self._fallback, None
        if fallback is not None:
            await fallback.aclose()


class _TeeStream:
    """Passes a backend stream through and stores what it delivered once complete."""

    def __init__(
        self,
        owner: DiskCachedBackend,
        inner: BlobStream,
        key: str,
        start: int,
        end: int | None,
        reserved: int,
    ) -> None:
        self._owner = owner
        self._inner = inner
        self._key = key
        self._start = start
        self._end = end
        self._reserved = reserved
        self._pieces: list[bytes] | None = [] if reserved or end is None else None
        self._seq = owner.cache.seq
        self._received = 0
        self._done = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        try:
            async for piece in self._inner:
                self._record(piece)
                yield piece
        except BaseException:
            self._discard()
            raise
        self._finish(reached_end=True)

    def _record(self, piece: bytes | bytearray | memoryview) -> None:
        self._received += len(piece)
        if self._pieces is None:
            return
        if self._end is None:  # unknown length: reserve as it arrives
            if not self._owner.cache.may_record(len(piece)):
                self._discard()
                return
            self._reserved += len(piece)
        elif self._received > self._end - self._start:
            self._discard()
            return
        self._pieces.append(piece if isinstance(piece, bytes) else bytes(piece))

    def _discard(self) -> None:
        self._pieces = None
        if self._reserved:
            self._owner.cache.release(self._reserved)
            self._reserved = 0

    def _finish(self, *, reached_end: bool) -> None:
        if self._done:
            return
        self._done = True
        pieces = self._pieces
        expected = None if self._end is None else self._end - self._start
        complete = reached_end or self._received == expected
        if pieces is None or not complete:
            self._discard()
            return
        to_end = reached_end and (expected is None or self._received < expected)
        backend = self._owner.name
        name = entry_name(backend, self._key, self._start, self._received, to_end)
        entry = _Entry(name, backend, self._key, self._start, self._received, to_end, 0)
        entry.file_size = _header_size(entry) + entry.length
        self._pieces = None
        reserved, self._reserved = self._reserved, 0
        self._owner.cache.store(entry, pieces, reserved, self._seq)

    async def aclose(self) -> None:
        self._finish(reached_end=False)
        await self._inner.aclose()


class DiskCachedBackend:
    """Wraps ``inner``: ``get`` is served from ``cache`` when it can, and what the
    backend returns is stored there; everything else passes through."""

    def __init__(self, inner: Backend, cache: DiskCache) -> None:
        self.inner = inner
        self.cache = cache

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    async def get(self, key: str, byte_range: ByteRange | None = None) -> BlobStream:
        rng = byte_range or ByteRange()
        entry = self.cache.lookup(self.name, key, rng.start, rng.end)
        if entry is not None:
            span = entry.serves(rng.start, rng.end)
            assert span is not None
            start, stop = span
            first_end = min(stop, start + HIT_PIECE)
            first = await self.cache.read(entry, start, first_end) if stop > start else b""
            if first is not None:
                self.cache.hits += 1
                return _HitStream(self, entry, key, first, start, stop, rng.end)
        self.cache.misses += 1
        stream = await self.inner.get(key, rng)
        wanted = 0 if rng.end is None else rng.end - rng.start
        reserved = wanted if wanted and self.cache.may_record(wanted) else 0
        if rng.end is not None and not reserved:
            return stream  # not cached: no budget
        return _TeeStream(self, stream, key, rng.start, rng.end, reserved)

    async def put(self, key: str, body: BlobBody, *, size: int) -> BlobInfo:
        await self.cache.drop(self.name, key)
        try:
            return await self.inner.put(key, body, size=size)
        finally:
            await self.cache.drop(self.name, key)  # reads made while it was written

    async def head(self, key: str) -> BlobInfo:
        return await self.inner.head(key)

    async def delete(self, key: str) -> None:
        await self.cache.drop(self.name, key)
        try:
            await self.inner.delete(key)
        finally:
            await self.cache.drop(self.name, key)

    def list(
        self, prefix: str = "", *, start_after: str | None = None, page_size: int = 1000
    ) -> AsyncIterator[BlobInfo]:
        return self.inner.list(prefix, start_after=start_after, page_size=page_size)

    async def close(self) -> None:
        await self.inner.close()
