"""Shared pieces of the file service (``appliance.services.files``): path helpers, the
values its methods take and return, and ``OpenFile``, the state of a file opened at
least once."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from appliance.services.fileattrs import FileAttr
from appliance.services.filereader import PieceReader
from appliance.services.objects import ObjectHandle, WriteResult
from appliance.services.spool import Spool

SEP = "/"
LIST_PAGE = 1000
UNLIMITED_BYTES = 1 << 50
"""Capacity shown for a pool with a backend without quota (1 PiB)."""
READ_PIECE = 1 << 20


def now_ns() -> int:
    return time.time_ns()


def join(path: str, name: str) -> str:
    return f"{path}{SEP}{name}" if path else name


def dir_key(path: str) -> str:
    return f"{path}{SEP}" if path else ""


@dataclass(frozen=True, slots=True)
class DirEntry:
    name: str
    attr: FileAttr


@dataclass(frozen=True, slots=True)
class DirPage:
    """Entries of one directory in name order; ``marker`` resumes after the last."""

    entries: tuple[DirEntry, ...]
    marker: str | None


@dataclass(frozen=True, slots=True)
class AttrChanges:
    """A ``setattr``: every field None is left as it is."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    mtime_ns: int | None = None
    atime_ns: int | None = None


@dataclass(frozen=True, slots=True)
class Recovered:
    """What the spool recovery did with one file left by a dead process."""

    bucket: str
    key: str
    committed_as: str | None
    """The key written, or None when nothing could be committed (files kept)."""
    size: int
    detail: str


@dataclass(frozen=True, slots=True)
class Capacity:
    total_bytes: int
    free_bytes: int


@dataclass
class OpenFile:
    """A file opened at least once. Shared by every handle on the same path."""

    bucket: str
    key: str
    attr: FileAttr
    xattrs: dict[str, str]
    headers: dict[str, str]
    base: ObjectHandle | None
    handles: int = 0
    spool: Spool | None = None
    meta_dirty: bool = False
    committed: bool = False
    """False for a file created here and not committed yet (it exists only here)."""
    unlinked: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    reader: PieceReader | None = None
    stale: bool = False
    """``base`` predates this mount's last commit: reload it before use."""
    stream: asyncio.Task[WriteResult] | None = None
    """A commit in progress while a new file is written sequentially (write-behind)."""
    streamed: int = 0
    grew: asyncio.Event = field(default_factory=asyncio.Event)
    eof: bool = False
    behind: asyncio.Task[None] | None = None
    """The commit running after a close returned (``FileWrites`` with ``write_back``)."""
    commit_wanted: bool = False
    """Set by a flush that handed its commit to ``behind``; cleared when it starts."""

    def stop_stream(self) -> asyncio.Task[WriteResult] | None:
        """Cancel the write-behind commit (its version is aborted); returns the task."""
        task, self.stream = self.stream, None
        self.streamed = 0
        self.eof = False
        if task is not None and not task.done():
            task.cancel()
        return task

    @property
    def dirty(self) -> bool:
        return self.spool is not None or self.meta_dirty or not self.committed
