"""FileService: the pool as a tree of directories and files (DESIGN section 7).

Paths are ``(bucket, path)`` with ``/`` as separator and no leading or trailing slash;
``""`` is the bucket's root. A file is the object at its path; a directory is a key
prefix (``path/``), made explicit by a zero-byte marker object ``path/`` when it is
empty or has attributes of its own. POSIX attributes live in user metadata
(``appliance.services.fileattrs``). This module knows nothing of FUSE: the frontend
maps its errors (``appliance.errors``) to errno values.

Consistency is close-to-open: ``open`` reads the key's current version and keeps it
while the file stays open anywhere; writes go to a local spool (``Spool``) and become a
new version, visible through S3, when the file is flushed, fsynced or closed. Renames,
``chmod`` and the like are metadata-only copies (no data byte moves).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import logging
import mimetypes
import os
import stat
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cachetools import TTLCache

from appliance.data.chunkstore import ChunkStorage
from appliance.errors import (
    DirectoryNotEmpty,
    InvalidArgument,
    IsADirectory,
    NoCapacity,
    NoSuchBucket,
    NoSuchKey,
    NoSuchPath,
    NotADirectory,
    NotPermitted,
    NotSupported,
    PathExists,
)
from appliance.ids import new_sortable_id
from appliance.meta.errors import Conflict, StoreUnavailable
from appliance.meta.models import ChunkPlacement, ChunkRef, ObjectVersion, VersionKind
from appliance.meta.store import MetadataStore
from appliance.placement.pool import PoolState
from appliance.services.fileattrs import (
    DEFAULT_DIR_MODE,
    DEFAULT_FILE_MODE,
    RESERVED,
    FileAttr,
    decode,
    encode,
    ns_of,
    xattrs,
)
from appliance.services.objects import ObjectHandle, ObjectService, WriteResult, check_key
from appliance.services.spool import Spool

log = logging.getLogger("cairn.files")

SEP = "/"
LIST_PAGE = 1000
UNLIMITED_BYTES = 1 << 50
"""Capacity shown for a pool with a backend without quota (1 PiB)."""
READ_PIECE = 1 << 20
ATTR_TYPE_BITS = stat.S_IFMT(0o177777)


def now_ns() -> int:
    return time.time_ns()


def join(path: str, name: str) -> str:
    return f"{path}{SEP}{name}" if path else name


def _dir_key(path: str) -> str:
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


class _Reader:
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
    reader: _Reader | None = None
    stale: bool = False
    """``base`` predates this mount's last commit: reload it before use."""
    stream: asyncio.Task[WriteResult] | None = None
    """A commit in progress while a new file is written sequentially (write-behind)."""
    streamed: int = 0
    grew: asyncio.Event = field(default_factory=asyncio.Event)
    eof: bool = False

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


class FileService:
    """Namespace and file operations over ``ObjectService``; see the module doc.

    Errors: ``NoSuchPath``, ``PathExists``, ``NotADirectory``, ``IsADirectory``,
    ``DirectoryNotEmpty``, ``NotSupported``, ``InvalidArgument``, ``NotPermitted``,
    ``InvalidObjectName``, ``NoCapacity``, ``BackendsUnavailable``,
    ``MetadataUnavailable``, ``DataCorrupted``, and ``OSError`` from the spool.
    """

    def __init__(
        self,
        store: MetadataStore,
        objects: ObjectService,
        pool: PoolState,
        *,
        chunk_size: int,
        spool_dir: Path,
        replicas: int = 1,
        uid: int | None = None,
        gid: int | None = None,
        clock: Callable[[], int] = now_ns,
        dir_ttl: float = 1.0,
    ) -> None:
        self._store = store
        self._objects = objects
        self._pool = pool
        self._chunk_size = chunk_size
        self._spool_dir = spool_dir
        self._replicas = replicas
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self._clock = clock
        self._open: dict[tuple[str, str], OpenFile] = {}
        self._dirs: TTLCache[tuple[str, str], FileAttr] = TTLCache(maxsize=4096, ttl=dir_ttl)
        self._absent: TTLCache[tuple[str, str], bool] = TTLCache(maxsize=4096, ttl=dir_ttl)

    def prepare(self) -> None:
        """Create the spool directory (mode 0700). Raises ``OSError``."""
        self._spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- attributes ------------------------------------------------------------------
    def _file_attr(self, version: ObjectVersion, *, directory: bool = False) -> FileAttr:
        return decode(
            version.user_metadata,
            size=0 if directory else version.size,
            committed=version.completed_at or version.created_at,
            default_mode=DEFAULT_DIR_MODE if directory else DEFAULT_FILE_MODE,
            uid=self.uid,
            gid=self.gid,
            version_id=version.version_id,
        )

    def _implicit_dir(self, when_ns: int) -> FileAttr:
        return FileAttr(DEFAULT_DIR_MODE, self.uid, self.gid, 0, when_ns, when_ns, when_ns)

    async def bucket_names(self) -> list[str]:
        return [b.name for b in await self._store.list_buckets()]

    async def bucket_attr(self, bucket: str) -> FileAttr:
        """The attributes of a bucket's root directory. Raises ``NoSuchPath``."""
        found = await self._store.get_bucket(bucket)
        if found is None:
            raise NoSuchPath(bucket)
        return self._implicit_dir(ns_of(found.created_at))

    async def stat(self, bucket: str, path: str) -> FileAttr:
        """Attributes of a file or directory. Raises ``NoSuchPath``."""
        if not path:
            return await self.bucket_attr(bucket)
        node = self._open.get((bucket, path))
        if node is not None and not node.unlinked:
            return node.attr
        try:
            version = await self._store.get_current(bucket, path)
        except StoreUnavailable:
            return await self._stat_from_blobs(bucket, path)
        if version is not None:
            return self._file_attr(version)
        # one listing answers "marker or children?"; the marker sorts first
        page = await self._store.list_objects(bucket, prefix=_dir_key(path), limit=1)
        if page.entries and page.entries[0].key == _dir_key(path):
            marker = await self._store.get_current(bucket, _dir_key(path))
            if marker is not None:
                return self._file_attr(marker, directory=True)
        if page.entries:
            return self._implicit_dir(ns_of(page.entries[0].last_modified))
        if any(b == bucket and k.startswith(_dir_key(path)) for b, k in self._open):
            return self._implicit_dir(self._clock())
        self._absent[(bucket, path)] = True
        raise NoSuchPath(path)

    async def _stat_from_blobs(self, bucket: str, path: str) -> FileAttr:
        """A file's attributes from its blobs while the store is unreachable; anything
        else (a directory needs a listing) raises ``StoreUnavailable``."""
        try:
            return self._file_attr(await self._objects.head_object(bucket, path))
        except (NoSuchKey, NoSuchBucket):
            raise StoreUnavailable(f"{path}: not a file, and listings need the store") from None

    async def _require_dir(self, bucket: str, path: str) -> FileAttr:
        """The attributes of directory ``path``; a directory seen in the last second is
        not looked up again (creating many files in one directory)."""
        known = self._dirs.get((bucket, path))
        if known is not None:
            return known
        attr = await self.stat(bucket, path)
        if not attr.is_dir:
            raise NotADirectory(path)
        self._dirs[(bucket, path)] = attr
        return attr

    def _dir_changed(self, bucket: str, path: str | None = None) -> None:
        """Forget cached directory attributes (one directory, or all with None)."""
        if path is None:
            self._dirs.clear()
        else:
            self._dirs.pop((bucket, path), None)

    async def list_dir(
        self, bucket: str, path: str, *, after: str | None = None, limit: int = LIST_PAGE
    ) -> DirPage:
        """One page of a directory from the metadata store, names in byte order.

        Entries of files created here and not yet committed are not listed (the
        frontend adds them). Raises ``NoSuchPath``, ``NotADirectory``.
        """
        prefix = _dir_key(path)
        page = await self._store.list_objects(
            bucket,
            prefix=prefix,
            delimiter=SEP,
            start_after=prefix + after if after is not None else None,
            limit=limit,
        )
        names: list[tuple[str, str, bool]] = []  # (name, key, is common prefix)
        for entry in page.entries:
            if entry.key != prefix:  # the directory's own marker
                names.append((entry.key[len(prefix) :], entry.key, False))
        names += [(p[len(prefix) : -1], p, True) for p in page.common_prefixes]
        names.sort(key=lambda item: item[0].encode("utf-8", "surrogatepass"))
        out: list[DirEntry] = []
        for name, key, is_prefix in names:
            if not name:
                continue  # a key with "//" has an empty component: not addressable
            if is_prefix:
                dir_marker = await self._store.get_current(bucket, key)
                attr = (
                    self._file_attr(dir_marker, directory=True)
                    if dir_marker is not None
                    else self._implicit_dir(self._clock())
                )
                # a file and a directory of one name: the directory wins in listings
                out = [e for e in out if e.name != name]
            else:
                if any(e.name == name for e in out):
                    continue
                node = self._open.get((bucket, key))
                if node is not None and not node.unlinked:
                    attr = node.attr
                else:
                    version = await self._store.get_current(bucket, key)
                    if version is None:
                        continue  # deleted since the listing
                    attr = self._file_attr(version)
            out.append(DirEntry(name, attr))
        if not page.truncated and not out and path and after is None:
            await self._require_dir(bucket, path)
        marker = page.next_marker[len(prefix) :] if page.truncated and page.next_marker else None
        return DirPage(tuple(out), marker)

    def pending_names(self, bucket: str, path: str) -> list[tuple[str, FileAttr]]:
        """Files created in directory ``path`` here and not committed yet."""
        prefix = _dir_key(path)
        out = []
        for (b, key), node in self._open.items():
            if b != bucket or node.committed or node.unlinked or not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            if SEP not in rest:
                out.append((rest, node.attr))
        return sorted(out)

    # -- namespace changes -----------------------------------------------------------
    async def _put_small(
        self, bucket: str, key: str, body: bytes, attr: FileAttr, extra: dict[str, str]
    ) -> ObjectVersion:
        check_key(key)

        async def one() -> AsyncIterator[bytes]:
            yield body

        result = await self._objects.put_object(
            bucket,
            key,
            one(),
            size=len(body),
            headers={"Content-Type": "application/octet-stream"},
            user_metadata=encode(attr, extra),
        )
        version = await self._store.get_version(result.version_id)
        if version is None:  # pragma: no cover - just committed
            raise NoSuchPath(key)
        return version

    async def _check_new(self, bucket: str, path: str) -> FileAttr:
        """The parent's attributes, once sure ``path`` can be made there."""
        parent = await self._require_dir(bucket, path.rpartition(SEP)[0])
        if self._absent.pop((bucket, path), False) and (bucket, path) not in self._open:
            return parent  # looked up and absent within the last second (the kernel's
            # lookup just before a create): not asked again
        with contextlib.suppress(NoSuchPath):
            await self.stat(bucket, path)
            raise PathExists(path)
        self._absent.pop((bucket, path), None)  # about to exist
        return parent

    def _new_attr(self, mode: int, uid: int, gid: int, parent: FileAttr, rdev: int = 0) -> FileAttr:
        now = self._clock()
        if parent.mode & stat.S_ISGID:  # BSD group semantics of a setgid directory
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        return FileAttr(mode, uid, gid, 0, now, now, now, rdev)

    async def mkdir(self, bucket: str, path: str, mode: int, uid: int, gid: int) -> FileAttr:
        """Create a directory marker. Raises ``PathExists``, ``NoSuchPath``,
        ``NotADirectory`` (a parent is a file)."""
        parent = await self._check_new(bucket, path)
        attr = self._new_attr(stat.S_IFDIR | stat.S_IMODE(mode), uid, gid, parent)
        self._dir_changed(bucket, path)
        version = await self._put_small(bucket, _dir_key(path), b"", attr, {})
        return self._file_attr(version, directory=True)

    async def mknod(
        self, bucket: str, path: str, mode: int, rdev: int, uid: int, gid: int
    ) -> FileAttr:
        """Create an empty file, FIFO, socket or device entry (stored, never opened
        as a device). Raises like ``mkdir``."""
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        parent = await self._check_new(bucket, path)
        attr = self._new_attr(mode, uid, gid, parent, rdev)
        return self._file_attr(await self._put_small(bucket, path, b"", attr, {}))

    async def symlink(self, bucket: str, path: str, target: str, uid: int, gid: int) -> FileAttr:
        """Create a symbolic link (the object's body is the target)."""
        parent = await self._check_new(bucket, path)
        attr = self._new_attr(stat.S_IFLNK | 0o777, uid, gid, parent)
        body = target.encode("utf-8", "surrogateescape")
        version = await self._put_small(bucket, path, body, attr, {})
        return self._file_attr(version)

    async def readlink(self, bucket: str, path: str) -> str:
        """The target of a symbolic link. Raises ``NoSuchPath``, ``InvalidArgument``."""
        try:
            handle = await self._objects.open_object(bucket, path)
        except (NoSuchKey, NoSuchBucket) as exc:
            raise NoSuchPath(path) from exc
        if not self._file_attr(handle.version).is_link:
            raise InvalidArgument(f"{path} is not a symbolic link")
        data = bytearray()
        async for piece in self._objects.read(handle):
            data += piece
        return data.decode("utf-8", "surrogateescape")

    async def unlink(self, bucket: str, path: str) -> None:
        """Remove a file. Open handles keep reading what they opened; their later
        writes are not committed. Raises ``NoSuchPath``, ``IsADirectory``."""
        attr = await self.stat(bucket, path)
        if attr.is_dir:
            raise IsADirectory(path)
        node = self._open.get((bucket, path))
        if node is not None:
            self._forget_node(node)
        await self._objects.remove(bucket, path)

    def _forget_node(self, node: OpenFile) -> None:
        """Detach an open file from its path (unlinked or replaced by a rename): its
        handles keep reading what it holds; nothing of it is committed any more."""
        node.unlinked = True
        node.stop_stream()
        self._open.pop((node.bucket, node.key), None)
        if node.spool is not None:
            node.spool.detach()

    async def rmdir(self, bucket: str, path: str) -> None:
        """Remove an empty directory. Raises ``NoSuchPath``, ``NotADirectory``,
        ``DirectoryNotEmpty``, ``NotPermitted`` (a bucket root)."""
        if not path:
            raise NotPermitted("a bucket's root cannot be removed through the mount")
        await self._require_dir(bucket, path)
        prefix = _dir_key(path)
        page = await self._store.list_objects(bucket, prefix=prefix, limit=2)
        if any(e.key != prefix for e in page.entries) or self.pending_names(bucket, path):
            raise DirectoryNotEmpty(path)
        self._dir_changed(bucket, path)
        await self._objects.remove(bucket, prefix)

    async def rename(
        self,
        bucket: str,
        src: str,
        dst_bucket: str,
        dst: str,
        *,
        noreplace: bool = False,
    ) -> None:
        """Move a file or a whole directory, metadata only: each moved key gets a new
        version referencing the same chunks (with a manifest blob), then the old key is
        removed. A directory moves key by key: not atomic (docs/fuse.md).

        POSIX rules: a file may replace a file, a directory an empty directory.
        Raises ``NoSuchPath``, ``PathExists`` (``noreplace``), ``IsADirectory``,
        ``NotADirectory``, ``DirectoryNotEmpty``, ``InvalidArgument`` (a directory into
        itself), ``NotPermitted`` (a bucket root).
        """
        if not src or not dst:
            raise NotPermitted("a bucket's root cannot be renamed")
        try:
            await self._rename(bucket, src, dst_bucket, dst, noreplace=noreplace)
        finally:
            self._absent.pop((dst_bucket, dst), None)

    async def _rename(
        self, bucket: str, src: str, dst_bucket: str, dst: str, *, noreplace: bool
    ) -> None:
        if (bucket, src) == (dst_bucket, dst):
            await self.stat(bucket, src)
            return
        source = await self.stat(bucket, src)
        await self._require_dir(dst_bucket, dst.rpartition(SEP)[0])
        target: FileAttr | None = None
        with contextlib.suppress(NoSuchPath):
            target = await self.stat(dst_bucket, dst)
        if target is not None:
            if noreplace:
                raise PathExists(dst)
            if source.is_dir and not target.is_dir:
                raise NotADirectory(dst)
            if not source.is_dir and target.is_dir:
                raise IsADirectory(dst)
        if source.is_dir:
            self._dir_changed(bucket)
            if bucket == dst_bucket and dst.startswith(_dir_key(src)):
                raise InvalidArgument("a directory cannot move into itself")
            if target is not None:
                await self.rmdir(dst_bucket, dst)  # DirectoryNotEmpty unless empty
            await self._rename_tree(bucket, src, dst_bucket, dst)
            return
        replaced = self._open.get((dst_bucket, dst))
        if replaced is not None:
            self._forget_node(replaced)
        node = self._open.pop((bucket, src), None)
        if node is not None:
            await _finish_cancel(node.stop_stream())
            node.key, node.bucket = dst, dst_bucket
            node.attr = node.attr.with_changes(ctime_ns=self._clock())
            node.meta_dirty = True
            self._open[(dst_bucket, dst)] = node
            if node.spool is not None:
                node.spool.bucket, node.spool.key = dst_bucket, dst
                node.spool.save()
            if not node.committed:
                if target is not None:
                    await self._objects.remove(dst_bucket, dst)
                return
        await self._move_key(bucket, src, dst_bucket, dst)

    async def _move_key(self, bucket: str, src: str, dst_bucket: str, dst: str) -> None:
        check_key(dst)
        try:
            handle = await self._objects.open_object(bucket, src)
        except NoSuchKey as exc:
            raise NoSuchPath(src) from exc
        meta = dict(handle.version.user_metadata)
        attr = self._file_attr(handle.version, directory=src.endswith(SEP))
        meta.update(encode(attr.with_changes(ctime_ns=self._clock()), xattrs(meta)))
        await self._objects.copy_object(handle, dst_bucket, dst, user_metadata=meta)
        self._absent.pop((dst_bucket, dst.rstrip(SEP)), None)
        await self._objects.remove(bucket, src)
        node = self._open.get((dst_bucket, dst))
        if node is not None:
            node.base = await self._objects.open_object(dst_bucket, dst)
            node.stale = False
            node.committed = True
            if node.reader is not None:
                node.reader.close()
                node.reader = None

    async def _rename_tree(self, bucket: str, src: str, dst_bucket: str, dst: str) -> None:
        old, new = _dir_key(src), _dir_key(dst)
        for (b, key), node in list(self._open.items()):
            if b == bucket and key.startswith(old):
                await _finish_cancel(node.stop_stream())
                del self._open[(b, key)]
                node.bucket, node.key = dst_bucket, new + key[len(old) :]
                self._open[(node.bucket, node.key)] = node
                if node.spool is not None:
                    node.spool.bucket, node.spool.key = node.bucket, node.key
                    node.spool.save_if_attached()
        moved = 0
        while True:
            page = await self._store.list_objects(bucket, prefix=old, limit=LIST_PAGE)
            if not page.entries:
                break
            for entry in page.entries:
                await self._move_key(bucket, entry.key, dst_bucket, new + entry.key[len(old) :])
                moved += 1
        if moved == 0 or await self._store.get_current(dst_bucket, new) is None:
            # keep the directory itself (and its attributes) when it had no marker
            now = self._clock()
            attr = FileAttr(DEFAULT_DIR_MODE, self.uid, self.gid, 0, now, now, now)
            await self._put_small(dst_bucket, new, b"", attr, {})

    async def link(self, bucket: str, path: str, new_bucket: str, new_path: str) -> None:
        """Hard links are not supported (docs/fuse.md): raises ``NotSupported``."""
        raise NotSupported("hard links are not supported")

    # -- attributes and extended attributes ------------------------------------------
    async def _rewrite_meta(
        self, bucket: str, path: str, attr: FileAttr, extra: dict[str, str]
    ) -> FileAttr:
        """Store new attributes of a committed entry as a metadata-only new version."""
        if not path:
            raise NotPermitted("a bucket's root has no attributes of its own")
        if attr.is_dir:
            self._dir_changed(bucket, path)
            key = _dir_key(path)
            if await self._store.get_current(bucket, key) is None:
                version = await self._put_small(bucket, key, b"", attr, extra)
                return self._file_attr(version, directory=True)
        else:
            key = path
        try:
            handle = await self._objects.open_object(bucket, key)
        except NoSuchKey as exc:
            raise NoSuchPath(path) from exc
        copied = await self._objects.copy_object(
            handle, bucket, key, user_metadata=encode(attr, extra)
        )
        return self._file_attr(copied, directory=attr.is_dir)

    async def _current_meta(self, bucket: str, path: str, attr: FileAttr) -> dict[str, str]:
        key = _dir_key(path) if attr.is_dir else path
        version = await self._store.get_current(bucket, key) if path else None
        return xattrs(version.user_metadata) if version is not None else {}

    async def set_attr(self, bucket: str, path: str, changes: AttrChanges) -> FileAttr:
        """Apply a ``setattr``. A size change truncates or extends (a file only); on an
        open file the change waits for its commit. Raises ``NoSuchPath``,
        ``IsADirectory`` (size of a directory), ``NotPermitted`` (a bucket root)."""
        node = self._open.get((bucket, path))
        if node is not None and not node.unlinked:
            async with node.lock:
                return await self._set_attr_open(node, changes)
        attr = await self.stat(bucket, path)
        if changes.size is not None:
            if attr.is_dir:
                raise IsADirectory(path)
            handle = await self.open(bucket, path)
            try:
                async with handle.lock:
                    await self._set_attr_open(handle, changes)
                    await self._commit(handle)
                    return handle.attr
            finally:
                await self.release(handle)
        new = self._apply(attr, changes)
        if new == attr:
            return attr
        return await self._rewrite_meta(
            bucket, path, new, await self._current_meta(bucket, path, attr)
        )

    def _apply(self, attr: FileAttr, changes: AttrChanges) -> FileAttr:
        now = self._clock()
        mode = attr.mode
        if changes.mode is not None:
            mode = stat.S_IFMT(attr.mode) | stat.S_IMODE(changes.mode)
        uid = attr.uid if changes.uid is None else changes.uid
        gid = attr.gid if changes.gid is None else changes.gid
        touched = any(
            v is not None for v in (changes.mode, changes.uid, changes.gid, changes.size)
        ) or (changes.mtime_ns is not None or changes.atime_ns is not None)
        return attr.with_changes(
            mode=mode,
            uid=uid,
            gid=gid,
            mtime_ns=attr.mtime_ns if changes.mtime_ns is None else changes.mtime_ns,
            atime_ns=attr.atime_ns if changes.atime_ns is None else changes.atime_ns,
            ctime_ns=now if touched else attr.ctime_ns,
        )

    async def _set_attr_open(self, node: OpenFile, changes: AttrChanges) -> FileAttr:
        new = self._apply(node.attr, changes)
        if changes.size is not None and changes.size != node.attr.size:
            if not new.is_regular:
                raise InvalidArgument("only regular files can be truncated")
            await _finish_cancel(node.stop_stream())
            spool = await self._spool_of(node)
            if changes.size > spool.size:
                await self._check_room(changes.size - spool.size)
            spool.truncate(changes.size)
            now = self._clock()
            new = new.with_changes(
                size=changes.size,
                mtime_ns=now if changes.mtime_ns is None else changes.mtime_ns,
                ctime_ns=now,
            )
        if new != node.attr:
            node.attr = new
            node.meta_dirty = True
            if node.spool is not None:
                node.spool.meta = encode(new, node.xattrs)
                node.spool.save_if_attached()
        return node.attr

    async def get_xattr(self, bucket: str, path: str, name: str) -> str:
        """Raises ``NoSuchPath``, ``KeyError`` (no such attribute)."""
        return (await self.list_xattrs(bucket, path))[name]

    async def list_xattrs(self, bucket: str, path: str) -> dict[str, str]:
        node = self._open.get((bucket, path))
        if node is not None and not node.unlinked:
            return dict(node.xattrs)
        attr = await self.stat(bucket, path)
        return await self._current_meta(bucket, path, attr)

    async def set_xattr(self, bucket: str, path: str, name: str, value: str | None) -> None:
        """Set (``value``) or remove (None) the extended attribute ``user.<name>``.
        Raises ``InvalidArgument`` for a reserved name, ``KeyError`` when removing an
        absent one, ``NoSuchPath``."""
        if name in RESERVED or not name:
            raise InvalidArgument(f"user.{name} is reserved for Cairn's POSIX attributes")
        node = self._open.get((bucket, path))
        if node is not None and not node.unlinked:
            async with node.lock:
                if value is None:
                    del node.xattrs[name]
                else:
                    node.xattrs[name] = value
                node.attr = node.attr.with_changes(ctime_ns=self._clock())
                node.meta_dirty = True
                if node.spool is not None:
                    node.spool.meta = encode(node.attr, node.xattrs)
                    node.spool.save_if_attached()
            return
        attr = await self.stat(bucket, path)
        extra = await self._current_meta(bucket, path, attr)
        if value is None:
            del extra[name]
        else:
            extra[name] = value
        await self._rewrite_meta(bucket, path, attr.with_changes(ctime_ns=self._clock()), extra)

    # -- capacity --------------------------------------------------------------------
    async def capacity(self) -> Capacity:
        """The pool's total and free bytes from the quotas, divided by the replication
        factor; a backend without quota counts as ``UNLIMITED_BYTES``."""
        view = await self._pool.view()
        total = free = 0
        for backend in view.backends:
            if backend.state.value not in ("active",):
                continue
            if backend.quota_bytes is None:
                total += UNLIMITED_BYTES
                free += UNLIMITED_BYTES
                continue
            total += backend.quota_bytes
            free += max(0, backend.quota_bytes - backend.used_bytes - backend.reserved_bytes)
        return Capacity(total // self._replicas, free // self._replicas)

    async def _check_room(self, more: int) -> None:
        """Raise ``NoCapacity`` when the spooled bytes of every open file plus ``more``
        would not fit in the pool's free space (one chunk header per chunk counted)."""
        cap = await self.capacity()
        # Bytes already handed to a write-behind commit are reserved in the pool once
        # their chunk write starts; up to three chunks of them are not yet (chunk 0 is
        # held back, one is being filled, one waits for a write slot).
        pending = sum(
            max(0, n.spool.new_bytes() - n.streamed) + min(n.streamed, 3 * self._chunk_size)
            for n in self._open.values()
            if n.spool is not None
        )
        need = pending + more
        need += (need // self._chunk_size + 1) * 512
        if need > cap.free_bytes:
            raise NoCapacity(f"the pool has {cap.free_bytes} bytes free, {need} are needed")

    # -- open files ------------------------------------------------------------------
    async def open(self, bucket: str, path: str, *, truncate: bool = False) -> OpenFile:
        """Open an existing file (close-to-open: the current version unless it is open
        already). Raises ``NoSuchPath``, ``IsADirectory``."""
        node = self._open.get((bucket, path))
        if node is None:
            try:
                handle = await self._objects.open_object(bucket, path)
            except (NoSuchKey, NoSuchBucket) as exc:
                with contextlib.suppress(NoSuchPath):
                    if (await self.stat(bucket, path)).is_dir:
                        raise IsADirectory(path) from exc
                raise NoSuchPath(path) from exc
            version = handle.version
            node = OpenFile(
                bucket,
                path,
                self._file_attr(version),
                xattrs(version.user_metadata),
                dict(version.headers),
                handle,
                committed=True,
            )
            self._open[(bucket, path)] = node
        node.handles += 1
        if truncate and node.attr.size:
            async with node.lock:
                await self._set_attr_open(node, AttrChanges(size=0))
        return node

    async def create(self, bucket: str, path: str, mode: int, uid: int, gid: int) -> OpenFile:
        """Create a new empty file, open. It is visible in the mount at once and
        through S3 at its first commit. Raises ``PathExists``, ``NoSuchPath``,
        ``NotADirectory``, ``InvalidObjectName``."""
        check_key(path)
        parent = await self._check_new(bucket, path)
        attr = self._new_attr(stat.S_IFREG | stat.S_IMODE(mode), uid, gid, parent)
        guess = mimetypes.guess_type(path)[0] or "application/octet-stream"
        node = OpenFile(bucket, path, attr, {}, {"Content-Type": guess}, None, handles=1)
        self._open[(bucket, path)] = node
        return node

    def version_of(self, node: OpenFile) -> str | None:
        """The version a clean open file shows (for the kernel's page cache)."""
        if node.dirty or node.stale or node.base is None:
            return None
        return node.base.version.version_id

    async def _base(self, node: OpenFile) -> ObjectHandle | None:
        """The version this open file builds on (reloaded after this mount's commit)."""
        if node.stale:
            node.base = await self._objects.open_object(node.bucket, node.key)
            node.stale = False
        return node.base

    async def _spool_of(self, node: OpenFile) -> Spool:
        if node.spool is None:
            handle = await self._base(node)
            base = handle.version if handle is not None else None
            node.spool = Spool.create(
                self._spool_dir,
                new_sortable_id(),
                self._chunk_size,
                bucket=node.bucket,
                key=node.key,
                base_version=base.version_id if base is not None else None,
                base_size=node.attr.size if base is not None else 0,
                meta=encode(node.attr, node.xattrs),
                headers=node.headers,
            )
        return node.spool

    async def read(self, node: OpenFile, offset: int, length: int) -> bytes:
        """Bytes of an open file as this mount sees it (spooled writes included)."""
        async with node.lock:
            spool = node.spool
            if spool is None:
                return await self._read_base(node, offset, length)
            out = bytearray()
            for seg in spool.segments(offset, offset + length):
                if seg.from_base:
                    out += await self._read_base(node, seg.start, seg.end - seg.start)
                else:
                    out += spool.pread(seg.start, seg.end - seg.start)
            return bytes(out)

    async def _read_base(self, node: OpenFile, offset: int, length: int) -> bytes:
        if await self._base(node) is None or node.base is None:
            return b""
        if node.reader is None or node.reader.handle is not node.base:
            if node.reader is not None:
                node.reader.close()
            node.reader = _Reader(self._objects.chunks, node.base)
        data = await node.reader.read(offset, length)
        return data

    async def write(self, node: OpenFile, offset: int, data: bytes) -> int:
        """Spool ``data`` at ``offset`` (past the end leaves a hole of zeros).
        Raises ``NoCapacity`` when the pool has no room for it, ``OSError``."""
        if not data:
            return 0
        async with node.lock:
            spool = await self._spool_of(node)
            end = offset + len(data)
            cs = self._chunk_size
            grows = end > spool.size and (
                spool.size == 0 or (end - 1) // cs > (spool.size - 1) // cs
            )
            fills = spool.fills_for_write(offset, end)
            if grows or fills:
                await self._check_room(max(0, end - spool.size) + sum(b - a for a, b in fills))
            sequential = offset == spool.size
            if node.stream is not None and (not sequential or node.stream.done()):
                await self._end_stream(node)
            for start, stop in fills:
                spool.pwrite(start, await self._read_base(node, start, stop - start))
            spool.mark_dirty(offset, end)
            spool.pwrite(offset, data)
            if node.stream is not None:
                node.grew.set()
            elif sequential and spool.size >= cs and self._can_stream(node, spool):
                self._start_stream(node, spool)
            now = self._clock()
            node.attr = node.attr.with_changes(size=spool.size, mtime_ns=now, ctime_ns=now)
            return len(data)

    async def flush(self, node: OpenFile, *, fsync: bool = False) -> None:
        """Commit the open file's changes as a new version (no-op when clean).
        Raises ``NoCapacity`` (the data stays spooled), the store's and backends' errors."""
        async with node.lock:
            if fsync and node.spool is not None:
                await asyncio.to_thread(node.spool.fsync)
            await self._commit(node)

    async def release(self, node: OpenFile) -> None:
        """Drop one handle; the last one commits what is left and forgets the file.
        Raises like ``flush`` (the spool is then kept for recovery)."""
        node.handles -= 1
        if node.handles > 0:
            return
        try:
            async with node.lock:
                await self._commit(node)
        finally:
            if node.handles <= 0:
                if node.reader is not None:
                    node.reader.close()
                    node.reader = None
                if self._open.get((node.bucket, node.key)) is node:
                    del self._open[(node.bucket, node.key)]
                if node.spool is not None and node.unlinked:
                    node.spool.remove()
                elif node.spool is not None:  # the commit failed: keep it for recovery
                    log.error(
                        "%s/%s: changes not committed; kept in spool %s",
                        node.bucket,
                        node.key,
                        node.spool.data_path,
                    )
                    node.spool.close()
                node.spool = None

    async def _commit(self, node: OpenFile) -> None:
        if node.unlinked or not node.dirty:
            return
        meta = encode(node.attr, node.xattrs)
        base = await self._base(node) if node.committed else None
        if node.spool is None and base is not None:
            copied = await self._objects.copy_object(
                base, node.bucket, node.key, user_metadata=meta
            )
            node.base = ObjectHandle(copied, base.layout)
            node.attr = self._file_attr(copied)
        else:
            await self._commit_spool(node, meta)
            # reloaded only if used again: a file closed for good costs no query more
            node.stale = True
            node.attr = node.attr.with_changes(
                size=node.spool.size if node.spool is not None else 0
            )
        node.committed = True
        node.meta_dirty = False
        self._absent.pop((node.bucket, node.key), None)
        if node.spool is not None:
            node.spool.remove()
            node.spool = None

    # -- write-behind: a new file written front to back is committed as it grows ------
    def _can_stream(self, node: OpenFile, spool: Spool) -> bool:
        return not node.unlinked and spool.base_size == 0 and not spool.dirty

    def _start_stream(self, node: OpenFile, spool: Spool) -> None:
        node.eof = False
        node.streamed = 0
        node.grew.clear()

        def metadata() -> dict[str, str]:
            return encode(node.attr, node.xattrs)

        node.stream = asyncio.ensure_future(
            self._objects.put_object(
                node.bucket,
                node.key,
                self._follow(node, spool),
                size=None,
                headers=node.headers,
                user_metadata=metadata(),
                body_md5=False,
                late_metadata=metadata,
            )
        )

    async def _follow(self, node: OpenFile, spool: Spool) -> AsyncIterator[bytearray]:
        """The spool's bytes as they arrive, a chunk at a time, until ``node.eof``."""
        sent = 0
        while True:
            ready = spool.size - sent
            if ready >= self._chunk_size or (node.eof and ready > 0):
                n = min(ready, self._chunk_size)
                data = await asyncio.to_thread(spool.pread_into, sent, n)
                sent += len(data)
                node.streamed = sent
                yield data
                continue
            if node.eof:
                return
            node.grew.clear()
            await node.grew.wait()

    async def _end_stream(self, node: OpenFile) -> None:
        """Give up write-behind (a write out of order, or the stream failed); re-raises
        ``NoCapacity`` from the stream so the write that hit it fails at once."""
        task = node.stop_stream()
        if task is None:
            return
        try:
            await task
        except asyncio.CancelledError:
            pass
        except NoCapacity:
            raise
        except Exception as exc:
            log.warning(
                "%s/%s: write-behind stopped (%s); committing at close", node.bucket, node.key, exc
            )

    async def _commit_spool(self, node: OpenFile, meta: dict[str, str]) -> None:
        if node.stream is not None:
            task = node.stream
            node.eof = True
            node.grew.set()
            try:
                await task
            finally:
                node.stop_stream()
            return
        spool = node.spool
        segments = spool.segments() if spool is not None else []
        if spool is None or not any(s.from_base for s in segments):
            size = spool.size if spool is not None else 0
            await self._objects.put_object(
                node.bucket,
                node.key,
                self._stream_spool(spool, size),
                size=size,
                headers=node.headers,
                user_metadata=meta,
                body_md5=size <= self._chunk_size,
            )
            return
        base = await self._base(node)
        assert base is not None
        await self._commit_partial(node, spool, base, meta)

    async def _stream_spool(self, spool: Spool | None, size: int) -> AsyncIterator[bytearray]:
        pos = 0
        while spool is not None and pos < size:
            n = min(self._chunk_size, size - pos)
            data = (
                await asyncio.to_thread(spool.pread_into, pos, n)
                if n > READ_PIECE
                else spool.pread_into(pos, n)
            )
            if not data:
                break
            yield data
            pos += len(data)

    async def _commit_partial(
        self, node: OpenFile, spool: Spool, base: ObjectHandle, meta: dict[str, str]
    ) -> None:
        """A new version of base chunk ranges no write touched plus new chunks for the
        rest, described by a manifest (docs/FORMAT.md)."""
        version = await self._objects.begin(
            node.bucket, node.key, kind=VersionKind.OBJECT, headers=node.headers, user_metadata=meta
        )
        try:
            etag = hashlib.md5()
            seq = 0
            refs: list[ChunkRef] = []
            for seg in spool.segments():
                if seg.from_base:
                    for ref in _slice_layout(base.layout, seg.start, seg.end):
                        refs.append(
                            ChunkRef(seq, ref.offset, ref.length, ref.chunk_id, ref.chunk_offset)
                        )
                        etag.update(ref.chunk_id.encode())
                        seq += 1
                    continue
                pos = seg.start
                while pos < seg.end:
                    stop = min(seg.end, (pos // self._chunk_size + 1) * self._chunk_size)
                    data = bytearray(await asyncio.to_thread(spool.pread, pos, stop - pos))
                    await self._objects.writer.write_chunk(version, seq, pos, data)
                    etag.update(hashlib.sha256(data).digest())
                    seq += 1
                    pos = stop
            try:
                if refs:
                    await self._store.add_refs(version.version_id, refs)
            except Conflict as exc:
                raise NoSuchPath(f"{node.key}: the version being rewritten was removed") from exc
            await self._objects.commit_by_reference(
                version, size=spool.size, etag=f"{etag.hexdigest()}-{seq}"
            )
        except BaseException:
            await self._objects.abort(version.version_id)
            raise

    async def commit_all(self) -> None:
        """Commit every open file's changes (at unmount); failures are logged and the
        spool kept for the next mount's recovery."""
        for node in list(self._open.values()):
            try:
                async with node.lock:
                    await self._commit(node)
            except Exception as exc:
                log.error(
                    "%s/%s: not committed at unmount (kept in the spool): %s",
                    node.bucket,
                    node.key,
                    exc,
                )
            if node.spool is not None:
                node.spool.close()
                node.spool = None

    # -- recovery --------------------------------------------------------------------
    async def recover(self) -> list[Recovered]:
        """Commit what a dead process left in the spool directory.

        A file is committed to its own key when that key still holds the version its
        writes started from; otherwise to ``<key>.cairn-recovered-<spool id>`` so no
        newer data is overwritten. A spool that cannot be committed is kept and
        reported. Never raises for one file's failure.
        """
        out: list[Recovered] = []
        for journal in sorted(self._spool_dir.glob("*.json")):
            try:
                spool = Spool.load(journal)
            except (OSError, ValueError, KeyError) as exc:
                out.append(Recovered("?", "?", None, 0, f"{journal}: unreadable: {exc}"))
                continue
            out.append(await self._recover_one(spool))
        for stray in self._spool_dir.glob("*.data"):
            if not stray.with_suffix(".json").exists():
                # the spool of a file unlinked while open: nothing to keep
                with contextlib.suppress(OSError):
                    stray.unlink()
        return out

    async def _recover_one(self, spool: Spool) -> Recovered:
        size = spool.size
        try:
            current = await self._store.get_current(spool.bucket, spool.key)
            base: ObjectHandle | None = None
            if spool.base_version is not None:
                version = await self._store.get_version(spool.base_version)
                if version is not None:
                    layout = await self._store.get_layout(version.version_id)
                    base = ObjectHandle(version, tuple(layout))
            same = (current.version_id if current else None) == spool.base_version
            key = spool.key if same else f"{spool.key}.cairn-recovered-{spool.spool_id}"
            if (
                spool.base_version is not None
                and base is None
                and any(s.from_base for s in spool.segments())
            ):
                raise NoSuchPath("the version the writes started from is gone")
            attr = decode(
                spool.meta,
                size=size,
                committed=current.created_at if current else _epoch(),
                default_mode=DEFAULT_FILE_MODE,
                uid=self.uid,
                gid=self.gid,
                version_id=None,
            )
            node = OpenFile(
                spool.bucket,
                key,
                attr,
                xattrs(spool.meta),
                spool.headers,
                base,
                spool=spool,
                committed=base is not None,
            )
            spool.key = key
            await self._commit_spool(node, spool.meta)
            spool.remove()
            detail = "committed" if same else "the key changed meanwhile: committed aside"
            log.warning(
                "spool recovery: %s/%s (%d bytes) %s as %s",
                spool.bucket,
                spool.key,
                size,
                detail,
                key,
            )
            return Recovered(spool.bucket, spool.key, key, size, detail)
        except Exception as exc:
            log.error(
                "spool recovery: %s/%s (%d bytes) could not be committed, kept in %s: %s",
                spool.bucket,
                spool.key,
                size,
                spool.data_path,
                exc,
            )
            spool.close()
            return Recovered(spool.bucket, spool.key, None, size, f"kept: {exc}")


async def _finish_cancel(task: asyncio.Task[WriteResult] | None) -> None:
    """Wait for a cancelled write-behind commit to finish aborting."""
    if task is not None:
        with contextlib.suppress(BaseException):
            await task


def _epoch() -> datetime:
    return datetime.fromtimestamp(0, UTC)


def _slice_layout(layout: Iterable[ChunkPlacement], start: int, end: int) -> list[ChunkRef]:
    """Refs covering object bytes ``[start, end)`` of a layout, cut to that range."""
    out = []
    for placement in layout:
        ref = placement.ref
        lo, hi = max(start, ref.offset), min(end, ref.offset + ref.length)
        if lo >= hi or ref.length == 0:
            continue
        out.append(ChunkRef(0, lo, hi - lo, ref.chunk_id, ref.chunk_offset + (lo - ref.offset)))
    return out
