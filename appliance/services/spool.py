"""The local spool of a file being written through the mount (DESIGN section 7).

Each file with uncommitted writes has, in the spool directory, ``<id>.spool``: a sparse
file whose first ``HEADER_SIZE`` bytes hold the journal and the rest the file's bytes,
as long as the file's current size; it holds every byte written since the last commit
(and copies of base bytes next to them).

The journal: bucket, key, the version the writes started from (``base_version``), how
much of it still counts (``base_size``), which chunks hold spool data (``dirty``) and
the pending POSIX attributes (``meta``, ``headers``). It is written into one of the
header's two slots, alternately, each with a sequence number and a CRC: a torn write
leaves the other slot, the newer valid one wins. One file to create and unlink per
small file written and no extended attribute (on ext4 a journal that size takes a block
of its own, which made the unlink seven times slower). A journal too large for a slot
goes to ``<id>.json``, which wins from then on. Spools written before 2026-12-07 (data
in ``<id>.data`` from offset 0, the journal in its ``user.cairn.spool`` xattr or in
``<id>.json``) are still read by recovery.

The file's bytes are: for a chunk index in ``dirty``, or at or past ``base_size``, the
spool's bytes; otherwise the base version's. So a commit reuses every base chunk range
that no write touched, and writes only the rest. The journal changes only when a chunk
turns dirty, on truncate, rename and attribute changes. A process killed with writes
pending leaves the spool, which ``FileService.recover`` commits at the next mount.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JOURNAL_VERSION = 1
HEADER_SIZE = 4096
"""Bytes before the file's data in ``<id>.spool``: two journal slots."""
_SLOT = HEADER_SIZE // 2
_SLOT_HEAD = struct.Struct("<8sQII")  # magic, sequence, length, crc32
_MAGIC = b"CAIRNSJ1"
JOURNAL_LIMIT = _SLOT - _SLOT_HEAD.size
"""Journals larger than this go to ``<id>.json``."""
JOURNAL_XATTR = "user.cairn.spool"
"""Where spools written before 2026-12-07 kept their journal (read by recovery only)."""
_NO_XATTR = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.E2BIG, errno.ENOSPC, errno.ERANGE}


def _newest_slot(header: bytes) -> tuple[int, bytes] | None:
    """(sequence, journal) of the newest intact slot of a spool header, if any."""
    best: tuple[int, bytes] | None = None
    for start in (0, _SLOT):
        head = header[start : start + _SLOT_HEAD.size]
        if len(head) < _SLOT_HEAD.size:
            continue
        magic, seq, length, crc = _SLOT_HEAD.unpack(head)
        body = header[start + _SLOT_HEAD.size : start + _SLOT_HEAD.size + length]
        if magic != _MAGIC or len(body) != length or zlib.crc32(body) != crc:
            continue
        if best is None or seq > best[0]:
            best = (seq, body)
    return best


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@dataclass(frozen=True, slots=True)
class Segment:
    """Bytes ``[start, end)`` of the file, from the base version or from the spool."""

    start: int
    end: int
    from_base: bool


@dataclass
class Spool:
    """One file's uncommitted writes. Not safe for concurrent use: callers lock."""

    directory: Path
    spool_id: str
    chunk_size: int
    bucket: str
    key: str
    base_version: str | None
    base_size: int
    meta: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    dirty: set[int] = field(default_factory=set)
    size: int = 0
    _fd: int = -1
    data_offset: int = HEADER_SIZE
    """Where the file's bytes start in the data file (0 in a spool from before the header)."""
    journal_in_header: bool = False
    """Where the journal is: a slot of the header, or ``journal_path`` (or, for a spool
    from before the header, the data file's xattr: ``journal_in_xattr``)."""
    journal_in_xattr: bool = False
    journal_seq: int = 0
    """Sequence number of the header slot written last."""
    attached: bool = True
    """False once ``detach`` dropped the journal (the file was unlinked)."""
    journal_file: bool = False
    """Whether ``journal_path`` may exist (written here, or loaded from)."""

    # -- files ------------------------------------------------------------------------
    @property
    def data_path(self) -> Path:
        suffix = ".spool" if self.data_offset else ".data"
        return self.directory / f"{self.spool_id}{suffix}"

    @property
    def journal_path(self) -> Path:
        return self.directory / f"{self.spool_id}.json"

    @classmethod
    def create(
        cls,
        directory: Path,
        spool_id: str,
        chunk_size: int,
        *,
        bucket: str,
        key: str,
        base_version: str | None,
        base_size: int,
        meta: Mapping[str, str],
        headers: Mapping[str, str],
    ) -> Spool:
        """Make the data file (``base_size`` long after its header, sparse) with the
        journal. Raises ``OSError`` (a full or unwritable spool directory)."""
        spool = cls(
            directory,
            spool_id,
            chunk_size,
            bucket,
            key,
            base_version,
            base_size,
            dict(meta),
            dict(headers),
            size=base_size,
        )
        spool._fd = os.open(spool.data_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(spool._fd, HEADER_SIZE + base_size)
            doc = spool._journal_doc()
            if not spool._write_slot(doc):
                # a new journal needs no temporary file: none existed before this write
                spool.journal_file = True
                fd = os.open(spool.journal_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    _write_all(fd, doc)
                finally:
                    os.close(fd)
        except BaseException:
            spool.remove()
            raise
        return spool

    @classmethod
    def load(cls, journal: Path) -> Spool:
        """Reopen a spool left by an earlier process from its ``<id>.json`` journal.
        Raises ``OSError`` and ``ValueError`` (an unreadable journal)."""
        offset = HEADER_SIZE if journal.with_suffix(".spool").exists() else 0
        return cls._from_doc(journal, journal.read_bytes(), offset, journal_file=True)

    @classmethod
    def load_data(cls, data: Path) -> Spool | None:
        """Reopen a spool left by an earlier process from the journal in its data file
        (``<id>.spool``: the newest valid header slot; ``<id>.data``: its xattr); None
        when it has none (a file unlinked while open, or a process that died before its
        first write). Raises ``OSError`` and ``ValueError``."""
        if data.suffix == ".spool":
            with data.open("rb") as f:
                found = _newest_slot(f.read(HEADER_SIZE))
            if found is None:
                return None
            seq, raw = found
            spool = cls._from_doc(data, raw, HEADER_SIZE, journal_file=False)
            spool.journal_in_header, spool.journal_seq = True, seq
            return spool
        try:
            raw = os.getxattr(data, JOURNAL_XATTR)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, *_NO_XATTR):
                return None
            raise
        spool = cls._from_doc(data, raw, 0, journal_file=False)
        spool.journal_in_xattr = True
        return spool

    @classmethod
    def _from_doc(cls, path: Path, raw: bytes, offset: int, *, journal_file: bool) -> Spool:
        doc: dict[str, Any] = json.loads(raw.decode("utf-8"))
        if doc.get("journal") != JOURNAL_VERSION:
            raise ValueError(f"{path}: unknown journal version {doc.get('journal')!r}")
        spool = cls(
            path.parent,
            path.stem,
            int(doc["chunk_size"]),
            str(doc["bucket"]),
            str(doc["key"]),
            doc["base_version"],
            int(doc["base_size"]),
            {str(k): str(v) for k, v in doc["meta"].items()},
            {str(k): str(v) for k, v in doc["headers"].items()},
            {int(i) for i in doc["dirty"]},
            data_offset=offset,
            journal_file=journal_file,
        )
        spool._fd = os.open(spool.data_path, os.O_RDWR)
        spool.size = max(0, os.fstat(spool._fd).st_size - offset)
        spool.base_size = min(spool.base_size, spool.size)
        return spool

    def _journal_doc(self) -> bytes:
        doc = {
            "journal": JOURNAL_VERSION,
            "bucket": self.bucket,
            "key": self.key,
            "base_version": self.base_version,
            "base_size": self.base_size,
            "chunk_size": self.chunk_size,
            "dirty": sorted(self.dirty),
            "meta": self.meta,
            "headers": self.headers,
        }
        return json.dumps(doc, sort_keys=True).encode("utf-8")

    def _write_slot(self, doc: bytes) -> bool:
        """Write the journal into the header slot not written last; False when it does
        not fit (or this is a spool from before the header)."""
        if len(doc) > JOURNAL_LIMIT or not self.data_offset:
            return False
        seq = self.journal_seq + 1
        slot = _SLOT_HEAD.pack(_MAGIC, seq, len(doc), zlib.crc32(doc)) + doc
        if os.pwrite(self._fd, slot, (seq % 2) * _SLOT) != len(slot):
            # a torn slot: the other one still holds the journal before this change
            raise OSError(errno.ENOSPC, f"short write of the journal of {self.data_path}")
        self.journal_seq = seq
        self.journal_in_header = True
        return True

    def _set_xattr(self, doc: bytes) -> bool:
        """A spool from before the header: its journal in the data file's xattr."""
        if len(doc) > JOURNAL_LIMIT:
            return False
        try:
            os.setxattr(self._fd, JOURNAL_XATTR, doc)
        except OSError as exc:
            if exc.errno in _NO_XATTR:
                return False
            raise
        return True

    def save(self) -> None:
        """Write the journal atomically: into a header slot (or, for a spool from before
        the header, its xattr), or a temporary file renamed over ``<id>.json`` (then the
        header's journal, if any, is erased: the file wins). A detached spool keeps no
        journal: it must never be recovered."""
        if not self.attached:
            return
        doc = self._journal_doc()
        if self.journal_in_header and self._write_slot(doc):
            return
        if self.journal_in_xattr and self._set_xattr(doc):
            return
        tmp = self.journal_path.with_suffix(".tmp")
        tmp.write_bytes(doc)
        os.replace(tmp, self.journal_path)
        self.journal_file = True
        self._drop_inner_journal()

    def _drop_inner_journal(self) -> None:
        """Erase the journal kept inside the data file (header slots or xattr)."""
        if self.journal_in_header:
            self.journal_in_header = False
            with contextlib.suppress(OSError):
                os.pwrite(self._fd, bytes(HEADER_SIZE), 0)
        if self.journal_in_xattr:
            self.journal_in_xattr = False
            with contextlib.suppress(OSError):
                os.removexattr(self._fd, JOURNAL_XATTR)

    def close(self) -> None:
        """Close the data file, keeping both files (for recovery); idempotent."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def detach(self) -> None:
        """Delete the journal only: the data stays readable through this object but
        is never recovered (the file was unlinked)."""
        self.attached = False
        self._drop_inner_journal()
        if self.journal_file:
            with contextlib.suppress(FileNotFoundError):
                self.journal_path.unlink()

    def remove(self) -> None:
        """Close and delete both files; idempotent."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        # the journal first: a data file without one is never recovered
        paths = [self.journal_path, self.data_path] if self.journal_file else [self.data_path]
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # -- bytes ------------------------------------------------------------------------
    def pread(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, self.data_offset + offset)

    def pread_into(self, offset: int, length: int) -> bytearray:
        """``length`` bytes from ``offset`` into a new buffer (short at the end)."""
        buffer = bytearray(length)
        done = os.preadv(self._fd, [buffer], self.data_offset + offset)
        if done < length:
            del buffer[done:]
        return buffer

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write spool bytes; the caller has filled the touched chunks' base ranges
        (``fills_for_write``) and marks them dirty (``mark_dirty``)."""
        view = memoryview(data)
        while view:
            done = os.pwrite(self._fd, view, self.data_offset + offset)
            view = view[done:]
            offset += done
        self.size = max(self.size, offset)

    def truncate(self, size: int) -> None:
        """Cut or extend (with zeros) the file to ``size``; saves the journal."""
        os.ftruncate(self._fd, self.data_offset + size)
        if size < self.size:
            self.base_size = min(self.base_size, size)
            last = -(-size // self.chunk_size)  # chunks at or past this hold no bytes
            self.dirty = {c for c in self.dirty if c < last}
        self.size = size
        self.save()

    def fsync(self) -> None:
        os.fsync(self._fd)

    # -- chunk bookkeeping (pure) -----------------------------------------------------
    def _base_part(self, chunk: int) -> tuple[int, int] | None:
        """The base byte range of ``chunk`` still in use, if it is clean."""
        if chunk in self.dirty:
            return None
        start = chunk * self.chunk_size
        end = min(start + self.chunk_size, self.base_size)
        return (start, end) if start < end else None

    def fills_for_write(self, offset: int, end: int) -> list[tuple[int, int]]:
        """Base ranges to copy into the spool before writing ``[offset, end)``: the
        clean base part of each touched chunk that the write does not cover whole."""
        fills: list[tuple[int, int]] = []
        if end <= offset:
            return fills
        for chunk in range(offset // self.chunk_size, (end - 1) // self.chunk_size + 1):
            part = self._base_part(chunk)
            if part is not None and not (offset <= part[0] and part[1] <= end):
                fills.append(part)
        return fills

    def mark_dirty(self, offset: int, end: int) -> bool:
        """Record that chunks touched by ``[offset, end)`` now hold spool data;
        returns True when the journal changed (and was saved)."""
        if end <= offset:
            return False
        first, last = offset // self.chunk_size, (end - 1) // self.chunk_size
        new = {c for c in range(first, last + 1) if c not in self.dirty and self._base_part(c)}
        if not new:
            return False
        self.dirty |= new
        self.save()
        return True

    def segments(self, start: int = 0, end: int | None = None) -> list[Segment]:
        """Where bytes ``[start, end)`` come from, in order, adjacent runs merged."""
        stop = self.size if end is None else min(end, self.size)
        out: list[Segment] = []
        pos = start
        while pos < stop:
            chunk = pos // self.chunk_size
            part = self._base_part(chunk)
            if part is not None and pos < part[1]:
                seg_end, from_base = min(part[1], stop), True
            else:
                seg_end, from_base = min((chunk + 1) * self.chunk_size, stop), False
            if out and out[-1].from_base == from_base and out[-1].end == pos:
                out[-1] = Segment(out[-1].start, seg_end, from_base)
            else:
                out.append(Segment(pos, seg_end, from_base))
            pos = seg_end
        return out

    def new_bytes(self) -> int:
        """Bytes a commit would write as new chunks (for the free-space check)."""
        if self.base_size == 0:  # a new file, or one cut to nothing: every byte is new
            return self.size
        return sum(s.end - s.start for s in self.segments() if not s.from_base)
