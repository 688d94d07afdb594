"""The state and the lookups every part of the file service shares: the caches of
attributes, ``stat``, the checks before a name is made, capacity (DESIGN section 7;
``appliance.services.files``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path

from cachetools import TTLCache

from appliance.errors import (
    NoCapacity,
    NoSuchBucket,
    NoSuchKey,
    NoSuchPath,
    NotADirectory,
    PathExists,
)
from appliance.meta.errors import StoreUnavailable
from appliance.meta.models import DirRow, ObjectVersion
from appliance.meta.store import MetadataStore
from appliance.placement.pool import PoolState
from appliance.services.fileattrs import (
    DEFAULT_DIR_MODE,
    DEFAULT_FILE_MODE,
    FileAttr,
    decode,
    encode,
    ns_of,
)
from appliance.services.filetypes import SEP, UNLIMITED_BYTES, Capacity, OpenFile, dir_key, now_ns
from appliance.services.namecache import ABSENT, NameCache, NameChange
from appliance.services.objects import ObjectService, check_key

log = logging.getLogger("cairn.files")

COMMIT_SLOTS = 4
"""Commits behind closes (write-back) that run at once; the others wait their turn.
Bounds the threads they keep busy next to the loop that answers the mount."""


class FileCore:
    """State and lookups of ``FileService`` (see ``appliance.services.files``)."""

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
        write_back: int = 0,
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
        # Attributes of files this mount committed within ``dir_ttl``: the kernel asks
        # for them right after ``close``. Dropped by every change made here; a change
        # made through S3 shows after ``dir_ttl``, like the kernel's attribute cache.
        self._recent: TTLCache[tuple[str, str], FileAttr] = TTLCache(maxsize=4096, ttl=dir_ttl)
        # Spans of directory listings, so a walk over a directory's names is answered
        # from memory (``appliance.services.namecache``); same bound as the above.
        self._names = NameCache(dir_ttl)
        # Write-back: up to ``write_back`` closed files (of one chunk at most) commit
        # after their close returned (``FileWrites.flush``); 0 commits before it returns.
        self._write_back = write_back
        self._behind: dict[asyncio.Task[None], asyncio.Event] = {}
        """Commits behind on their first attempt, each with the event set when that
        attempt ends: what ``settle`` waits for."""
        self._retrying: set[asyncio.Task[None]] = set()
        self._commit_slots = asyncio.Semaphore(COMMIT_SLOTS)

    def prepare(self) -> None:
        """Create the spool directory (mode 0700). Raises ``OSError``."""
        self._spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

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
        known = self._dirs.get((bucket, path)) or self._recent.get((bucket, path))
        if known is not None:  # seen within the attribute timeout (see __init__)
            return known
        listed = self._names.get(bucket, path)
        if isinstance(listed, FileAttr):
            return listed
        if listed is ABSENT and not self._open_under(bucket, path):
            self._absent[(bucket, path)] = True
            raise NoSuchPath(path)
        try:
            version = await self._store.get_current(bucket, path)
        except StoreUnavailable:
            return await self._stat_from_blobs(bucket, path)
        want = self._names.wants_span(bucket, path)
        if want:
            await self._read_span(bucket, path, want)
        if version is not None:
            return self._file_attr(version)
        # one listing answers "marker or children?"; the marker sorts first
        page = await self._store.list_objects(bucket, prefix=dir_key(path), limit=1)
        if page.entries and page.entries[0].key == dir_key(path):
            marker = await self._store.get_current(bucket, dir_key(path))
            if marker is not None:
                return self._file_attr(marker, directory=True)
        if page.entries:
            return self._implicit_dir(ns_of(page.entries[0].last_modified))
        if self._open_under(bucket, path):
            return self._implicit_dir(self._clock())
        self._absent[(bucket, path)] = True
        raise NoSuchPath(path)

    def _open_under(self, bucket: str, path: str) -> bool:
        """Whether a file open here lies under ``path`` (an implicit directory)."""
        under = dir_key(path)
        return any(b == bucket and k.startswith(under) for b, k in self._open)

    async def _read_span(self, bucket: str, path: str, count: int) -> None:
        """Read up to ``count`` names of ``path``'s directory after it into the name
        cache. Best effort: a store error leaves the cache as it was."""
        directory = path.rpartition(SEP)[0]
        prefix = dir_key(directory)
        epoch = self._names.epoch
        try:
            page = await self._store.list_directory(
                bucket, prefix=prefix, delimiter=SEP, start_after=path, limit=count
            )
        except StoreUnavailable:
            return
        if page.truncated and not page.rows:
            return
        last = page.rows[-1].key if page.truncated else None
        names = self._dir_names(bucket, prefix, page.rows)
        self._names.put_span(bucket, directory, path, names, last, count, epoch=epoch)

    def _dir_names(self, bucket: str, prefix: str, rows: Iterable[DirRow]) -> dict[str, FileAttr]:
        """The names of listing rows under ``prefix`` with their attributes; a file and
        a directory of one name: the directory wins. Open files show as open."""
        picked: dict[str, DirRow] = {}
        for row in rows:
            name = row.key[len(prefix) :].rstrip(SEP) if row.is_prefix else row.key[len(prefix) :]
            if not name or SEP in name:
                continue  # the directory's own marker, or a key with "//" (not addressable)
            if row.is_prefix or name not in picked:
                picked[name] = row
        out: dict[str, FileAttr] = {}
        for name, row in picked.items():
            if row.is_prefix:
                out[name] = (
                    self._file_attr(row.version, directory=True)
                    if row.version is not None
                    else self._implicit_dir(self._clock())
                )
                continue
            node = self._open.get((bucket, row.key))
            if node is not None and not node.unlinked:
                out[name] = node.attr
            elif row.version is not None:
                out[name] = self._file_attr(row.version)
        return out

    @contextlib.contextmanager
    def _changing(self, bucket: str, path: str) -> Iterator[NameChange]:
        """Run a change of ``path`` made by this mount; the caller tells what it did
        (``NameChange``), which the name cache applies when the change ends."""
        change = NameChange()
        self._names.begin()
        try:
            yield change
        finally:
            self._names.end(bucket, path, change)

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
            self._recent.clear()
        else:
            self._dirs.pop((bucket, path), None)

    def _file_changed(self, bucket: str, path: str) -> None:
        """Forget the cached attributes of a file this mount committed."""
        self._recent.pop((bucket, path), None)

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

    def _forget_node(self, node: OpenFile) -> None:
        """Detach an open file from its path (unlinked or replaced by a rename): its
        handles keep reading what it holds; nothing of it is committed any more."""
        node.unlinked = True
        node.stop_stream()
        self._open.pop((node.bucket, node.key), None)
        if node.spool is not None:
            node.spool.detach()

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
