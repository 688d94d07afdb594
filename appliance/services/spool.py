"""The local spool of a file being written through the mount (DESIGN section 7).

Each file with uncommitted writes has, in the spool directory:

- ``<id>.data``: a sparse file as long as the file's current size; it holds every byte
  written since the last commit (and copies of base bytes next to them);
- the journal: bucket, key, the version the writes started from (``base_version``), how
  much of it still counts (``base_size``), which chunks hold spool data (``dirty``) and
  the pending POSIX attributes (``meta``, ``headers``). It is the data file's extended
  attribute ``user.cairn.spool`` when the file system has them and the journal fits in
  ``XATTR_LIMIT`` bytes (one file less to create and remove per small file written,
  replaced atomically by ``setxattr``), else ``<id>.json`` (which wins when both exist).

The file's bytes are: for a chunk index in ``dirty``, or at or past ``base_size``, the
spool's bytes; otherwise the base version's. So a commit reuses every base chunk range
that no write touched, and writes only the rest. The journal changes only when a chunk
turns dirty, on truncate, rename and attribute changes; the data file needs no journal
(its length is the size). A process killed with writes pending leaves both files,
which ``FileService.recover`` commits at the next mount.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JOURNAL_VERSION = 1
JOURNAL_XATTR = "user.cairn.spool"
XATTR_LIMIT = 2048
"""Journals larger than this go to ``<id>.json`` (a file system's xattr space is small)."""
_NO_XATTR = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.E2BIG, errno.ENOSPC, errno.ERANGE}


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
    journal_in_xattr: bool = False
    """Where the journal is: the data file's xattr, or ``journal_path``."""
    attached: bool = True
    """False once ``detach`` dropped the journal (the file was unlinked)."""
    journal_file: bool = False
    """Whether ``journal_path`` may exist (written here, or loaded from)."""

    # -- files ------------------------------------------------------------------------
    @property
    def data_path(self) -> Path:
        return self.directory / f"{self.spool_id}.data"

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
        """Make the data file (``base_size`` long, sparse) and the journal.
        Raises ``OSError`` (a full or unwritable spool directory)."""
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
            if base_size:
                os.ftruncate(spool._fd, base_size)
            doc = spool._journal_doc()
            if not spool._set_xattr(doc):
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
        return cls._from_doc(journal, journal.read_bytes(), in_xattr=False)

    @classmethod
    def load_data(cls, data: Path) -> Spool | None:
        """Reopen a spool left by an earlier process from the journal in its data file's
        xattr; None when it has none (a file unlinked while open, or a process that died
        before its first write). Raises ``OSError`` and ``ValueError``."""
        try:
            raw = os.getxattr(data, JOURNAL_XATTR)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, *_NO_XATTR):
                return None
            raise
        return cls._from_doc(data, raw, in_xattr=True)

    @classmethod
    def _from_doc(cls, path: Path, raw: bytes, *, in_xattr: bool) -> Spool:
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
            journal_in_xattr=in_xattr,
            journal_file=not in_xattr,
        )
        spool._fd = os.open(spool.data_path, os.O_RDWR)
        spool.size = os.fstat(spool._fd).st_size
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

    def _set_xattr(self, doc: bytes) -> bool:
        """Store the journal in the data file's xattr; False when it cannot be there."""
        if len(doc) > XATTR_LIMIT:
            return False
        try:
            os.setxattr(self._fd, JOURNAL_XATTR, doc)
        except OSError as exc:
            if exc.errno in _NO_XATTR:
                return False
            raise
        self.journal_in_xattr = True
        return True

    def save(self) -> None:
        """Write the journal atomically: a new xattr value, or a temporary file renamed
        over ``<id>.json`` (then the xattr, if any, is dropped: the file wins). A
        detached spool keeps no journal: it must never be recovered."""
        if not self.attached:
            return
        doc = self._journal_doc()
        if self.journal_in_xattr and self._set_xattr(doc):
            return
        tmp = self.journal_path.with_suffix(".tmp")
        tmp.write_bytes(doc)
        os.replace(tmp, self.journal_path)
        self.journal_file = True
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
        if self.journal_in_xattr:
            with contextlib.suppress(OSError):
                os.removexattr(self._fd, JOURNAL_XATTR)
            self.journal_in_xattr = False
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
        return os.pread(self._fd, length, offset)

    def pread_into(self, offset: int, length: int) -> bytearray:
        """``length`` bytes from ``offset`` into a new buffer (short at the end)."""
        buffer = bytearray(length)
        done = os.preadv(self._fd, [buffer], offset)
        if done < length:
            del buffer[done:]
        return buffer

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write spool bytes; the caller has filled the touched chunks' base ranges
        (``fills_for_write``) and marks them dirty (``mark_dirty``)."""
        view = memoryview(data)
        while view:
            done = os.pwrite(self._fd, view, offset)
            view = view[done:]
            offset += done
        self.size = max(self.size, offset)

    def truncate(self, size: int) -> None:
        """Cut or extend (with zeros) the file to ``size``; saves the journal."""
        os.ftruncate(self._fd, size)
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
        return sum(s.end - s.start for s in self.segments() if not s.from_base)
