"""pyfuse3 ``Operations`` over the ``FileService`` (DESIGN section 7).

Every handler translates domain errors once, through ``errnos.ERRNO``. Permission
checks are the kernel's (``default_permissions``): this layer only records owners
and modes. Directory listings are paged from the metadata store, one page held per
open directory.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from appliance.services.fileattrs import FileAttr
from appliance.services.files import AttrChanges, FileService, OpenFile
from frontends.fuse.errnos import errno_of
from frontends.fuse.inodes import Inode, InodeTable

log = logging.getLogger("cairn.fuse")
P = ParamSpec("P")
T = TypeVar("T")
BLOCK = 4096
XATTR_PREFIX = b"user."


def _translated(
    func: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Turn domain errors and ``OSError`` into ``FUSEError``; log anything else as EIO."""

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await func(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except KeyError as exc:  # an unknown inode or handle
            raise pyfuse3.FUSEError(errno.ENOENT) from exc
        except Exception as exc:
            code = errno_of(exc)
            if code is None:
                log.exception("%s failed", func.__name__)
                code = errno.EIO
            elif code == errno.EIO:
                log.error("%s failed: %s", func.__name__, exc)
            raise pyfuse3.FUSEError(code) from exc

    return wrapper


@dataclass
class _DirHandle:
    inode: Inode
    page: list[tuple[str, FileAttr]] = field(default_factory=list)
    page_start: int = 0
    marker: str | None = None
    started: bool = False
    done: bool = False


class CairnOperations(pyfuse3.Operations):
    """The mounted tree: ``/<bucket>/<key>``, or one bucket at the root."""

    enable_writeback_cache = False

    def __init__(
        self,
        files: FileService,
        *,
        bucket: str | None,
        attr_timeout: float,
        entry_timeout: float,
    ) -> None:
        super().__init__()
        self._files = files
        self._table = InodeTable(bucket)
        self._attr_timeout = attr_timeout
        self._entry_timeout = entry_timeout
        self._handles: dict[int, OpenFile] = {}
        self._dirs: dict[int, _DirHandle] = {}
        self._next_fh = 1
        self.initialized = False

    def init(self) -> None:
        """Called once the kernel's FUSE_INIT is handled."""
        self.initialized = True

    # -- helpers -----------------------------------------------------------------------
    def _fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _entry(self, ino: int, attr: FileAttr) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = ino
        entry.generation = 0
        entry.entry_timeout = self._entry_timeout
        entry.attr_timeout = self._attr_timeout
        entry.st_mode = attr.mode
        entry.st_nlink = 1
        entry.st_uid = attr.uid
        entry.st_gid = attr.gid
        entry.st_rdev = attr.rdev
        entry.st_size = attr.size
        entry.st_blksize = 128 * 1024
        entry.st_blocks = -(-attr.size // 512)
        entry.st_atime_ns = attr.atime_ns
        entry.st_mtime_ns = attr.mtime_ns
        entry.st_ctime_ns = attr.ctime_ns
        return entry

    def _where(self, inode: Inode) -> tuple[str, str]:
        if inode.bucket is None:
            raise pyfuse3.FUSEError(errno.EPERM)  # the multi-bucket root itself
        return inode.bucket, inode.path

    async def _attr_of(self, inode: Inode) -> FileAttr:
        if inode.bucket is None:
            return FileAttr(stat.S_IFDIR | 0o755, self._files.uid, self._files.gid, 0, 0, 0, 0)
        return await self._files.stat(inode.bucket, inode.path)

    def _child(self, parent_ino: int, name: bytes) -> tuple[Inode, str, str]:
        parent = self._table.get(parent_ino)
        text = os.fsdecode(name)
        if "/" in text or text in (".", ".."):
            raise pyfuse3.FUSEError(errno.EINVAL)
        bucket, path = self._table.child(parent, text)
        if parent.bucket is None:
            raise pyfuse3.FUSEError(errno.EPERM)  # buckets are made through S3/admin
        return parent, bucket, path

    def _remember(self, bucket: str, path: str, attr: FileAttr) -> pyfuse3.EntryAttributes:
        inode = self._table.ensure(bucket, path)
        inode.lookups += 1
        return self._entry(inode.ino, attr)

    # -- lookups and attributes -----------------------------------------------------
    @_translated
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._table.get(parent_inode)
        text = os.fsdecode(name)
        if text == ".":
            return self._entry(parent.ino, await self._attr_of(parent))
        if parent.bucket is None:
            attr = await self._files.bucket_attr(text)
            return self._remember(text, "", attr)
        bucket, path = self._table.child(parent, text)
        attr = await self._files.stat(bucket, path)
        return self._remember(bucket, path, attr)

    @_translated
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._table.get(inode)
        return self._entry(inode, await self._attr_of(node))

    @_translated
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._table.get(inode)
        bucket, path = self._where(node)
        changes = AttrChanges(
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
        )
        current = await self._files.stat(bucket, path)
        if changes.uid is not None or changes.gid is not None:
            owner_changed = (changes.uid not in (None, current.uid)) or (
                changes.gid not in (None, current.gid)
            )
            if owner_changed and not current.is_dir and ctx.uid != 0 and changes.mode is None:
                # chown by a non-root user clears setuid/setgid (POSIX)
                changes = AttrChanges(
                    mode=current.mode & ~(stat.S_ISUID | stat.S_ISGID),
                    uid=changes.uid,
                    gid=changes.gid,
                    size=changes.size,
                    mtime_ns=changes.mtime_ns,
                    atime_ns=changes.atime_ns,
                )
        new = await self._files.set_attr(bucket, path, changes)
        return self._entry(inode, new)

    @_translated
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self._table.forget(ino, count)

    @_translated
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        cap = await self._files.capacity()
        data = pyfuse3.StatvfsData()
        data.f_bsize = BLOCK
        data.f_frsize = BLOCK
        data.f_blocks = cap.total_bytes // BLOCK
        data.f_bfree = cap.free_bytes // BLOCK
        data.f_bavail = cap.free_bytes // BLOCK
        data.f_files = 1 << 32
        data.f_ffree = 1 << 31
        data.f_favail = 1 << 31
        data.f_namemax = 255
        return data

    # -- directories ----------------------------------------------------------------
    @_translated
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._table.get(inode)
        if node.bucket is not None:
            attr = await self._files.stat(node.bucket, node.path)
            if not attr.is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._fh()
        self._dirs[fh] = _DirHandle(node)
        return fh

    async def _next_page(self, handle: _DirHandle) -> None:
        handle.page_start += len(handle.page)
        handle.page = []
        node = handle.inode
        if node.bucket is None:
            for name in await self._files.bucket_names():
                handle.page.append((name, await self._files.bucket_attr(name)))
            handle.done = True
            return
        if handle.started and handle.marker is None:
            handle.page = self._files.pending_names(node.bucket, node.path)
            handle.done = True
            return
        page = await self._files.list_dir(node.bucket, node.path, after=handle.marker)
        handle.started = True
        handle.marker = page.marker
        handle.page = [(e.name, e.attr) for e in page.entries]

    @_translated
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dirs[fh]
        if start_id < handle.page_start:  # rewinddir: list again from the start
            self._dirs[fh] = handle = _DirHandle(handle.inode)
        while True:
            index = start_id - handle.page_start
            while index >= len(handle.page):
                if handle.done:
                    return
                await self._next_page(handle)
                index = start_id - handle.page_start
            for i in range(index, len(handle.page)):
                name, attr = handle.page[i]
                node = handle.inode
                bucket, path = (name, "") if node.bucket is None else self._table.child(node, name)
                inode = self._table.ensure(bucket, path)
                if not pyfuse3.readdir_reply(
                    token,
                    os.fsencode(name),
                    self._entry(inode.ino, attr),
                    handle.page_start + i + 1,
                ):
                    if inode.lookups == 0:
                        self._table.forget(inode.ino, 0)
                    return
                inode.lookups += 1
            start_id = handle.page_start + len(handle.page)

    @_translated
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_translated
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    @_translated
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        _, bucket, path = self._child(parent_inode, name)
        attr = await self._files.mkdir(bucket, path, mode & ~ctx.umask, ctx.uid, ctx.gid)
        return self._remember(bucket, path, attr)

    @_translated
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        _, bucket, path = self._child(parent_inode, name)
        await self._files.rmdir(bucket, path)
        self._table.removed(bucket, path)

    # -- names ----------------------------------------------------------------------
    @_translated
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        _, bucket, path = self._child(parent_inode, name)
        await self._files.unlink(bucket, path)
        self._table.removed(bucket, path)

    @_translated
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        _, bucket, src = self._child(parent_inode_old, name_old)
        _, new_bucket, dst = self._child(parent_inode_new, name_new)
        is_dir = (await self._files.stat(bucket, src)).is_dir
        await self._files.rename(
            bucket, src, new_bucket, dst, noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE)
        )
        self._table.moved(bucket, src, new_bucket, dst, tree=is_dir)

    @_translated
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        _, bucket, path = self._child(parent_inode, name)
        attr = await self._files.symlink(bucket, path, os.fsdecode(target), ctx.uid, ctx.gid)
        return self._remember(bucket, path, attr)

    @_translated
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        bucket, path = self._where(self._table.get(inode))
        return os.fsencode(await self._files.readlink(bucket, path))

    @_translated
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)

    @_translated
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        _, bucket, path = self._child(parent_inode, name)
        perm = stat.S_IMODE(mode) & ~ctx.umask
        attr = await self._files.mknod(
            bucket, path, stat.S_IFMT(mode) | perm, rdev, ctx.uid, ctx.gid
        )
        return self._remember(bucket, path, attr)

    # -- extended attributes --------------------------------------------------------
    def _xattr_name(self, name: bytes) -> str | None:
        if not name.startswith(XATTR_PREFIX):
            return None
        try:
            return name[len(XATTR_PREFIX) :].decode("utf-8")
        except UnicodeDecodeError:
            return None

    @_translated
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        key = self._xattr_name(name)
        node = self._table.get(inode)
        if key is None or node.bucket is None or not node.path:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        try:
            value = await self._files.get_xattr(node.bucket, node.path, key)
        except KeyError as exc:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from exc
        return value.encode("utf-8")

    @_translated
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self._table.get(inode)
        if node.bucket is None or not node.path:
            return []
        names = await self._files.list_xattrs(node.bucket, node.path)
        return [XATTR_PREFIX + n.encode("utf-8") for n in sorted(names)]

    @_translated
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        key = self._xattr_name(name)
        if key is None:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise pyfuse3.FUSEError(errno.EINVAL) from exc
        bucket, path = self._where(self._table.get(inode))
        await self._files.set_xattr(bucket, path, key, text)

    @_translated
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        key = self._xattr_name(name)
        if key is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        bucket, path = self._where(self._table.get(inode))
        try:
            await self._files.set_xattr(bucket, path, key, None)
        except KeyError as exc:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from exc

    # -- files ----------------------------------------------------------------------
    def _file_info(self, inode: Inode, node: OpenFile) -> pyfuse3.FileInfo:
        fh = self._fh()
        self._handles[fh] = node
        version = self._files.version_of(node)
        info = pyfuse3.FileInfo(fh=fh)
        info.keep_cache = version is not None and version == inode.version_id
        inode.version_id = version
        return info

    @_translated
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node_inode = self._table.get(inode)
        bucket, path = self._where(node_inode)
        node = await self._files.open(bucket, path, truncate=bool(flags & os.O_TRUNC))
        return self._file_info(node_inode, node)

    @_translated
    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        _, bucket, path = self._child(parent_inode, name)
        node = await self._files.create(
            bucket, path, stat.S_IMODE(mode) & ~ctx.umask, ctx.uid, ctx.gid
        )
        entry = self._remember(bucket, path, node.attr)
        inode = self._table.get(entry.st_ino)
        return self._file_info(inode, node), entry

    @_translated
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self._files.read(self._handles[fh], off, size)

    @_translated
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self._files.write(self._handles[fh], off, buf)

    @_translated
    async def flush(self, fh: int) -> None:
        await self._files.flush(self._handles[fh])

    @_translated
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._files.flush(self._handles[fh], fsync=True)

    @_translated
    async def release(self, fh: int) -> None:
        node = self._handles.pop(fh)
        await self._files.release(node)

    def open_handles(self) -> int:
        return len(self._handles)
