"""Directories and names: listings, mkdir/mknod/symlink, unlink/rmdir, and renames of
files and whole directories (journaled, ``appliance.services.renames``). Part of
``appliance.services.files``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import stat

from appliance.errors import (
    DirectoryNotEmpty,
    InvalidArgument,
    IsADirectory,
    NoSuchBucket,
    NoSuchKey,
    NoSuchPath,
    NotADirectory,
    NotPermitted,
    NotSupported,
    PathExists,
)
from appliance.ids import new_sortable_id
from appliance.services.fileattrs import DEFAULT_DIR_MODE, FileAttr, encode, xattrs
from appliance.services.filetypes import LIST_PAGE, SEP, DirEntry, DirPage, dir_key
from appliance.services.filewrites import FileWrites, finish_cancel
from appliance.services.objects import check_key
from appliance.services.renames import RenameJournal

log = logging.getLogger("cairn.files")


class FileDirs(FileWrites):
    """The namespace operations (see ``appliance.services.files``)."""

    async def list_dir(
        self, bucket: str, path: str, *, after: str | None = None, limit: int = LIST_PAGE
    ) -> DirPage:
        """One page of a directory from the metadata store, names in byte order.

        Entries of files created here and not yet committed are not listed (the
        frontend adds them). Raises ``NoSuchPath``, ``NotADirectory``.
        """
        prefix = dir_key(path)
        page = await self._store.list_directory(
            bucket,
            prefix=prefix,
            delimiter=SEP,
            start_after=prefix + after if after is not None else None,
            limit=limit,
        )
        names = self._dir_names(bucket, prefix, page.rows)
        out = [
            DirEntry(name, names[name])
            for name in sorted(names, key=lambda n: n.encode("utf-8", "surrogatepass"))
        ]
        if not page.truncated and not out and path and after is None:
            await self._require_dir(bucket, path)
        marker = page.next_marker[len(prefix) :] if page.truncated and page.next_marker else None
        return DirPage(tuple(out), marker)

    def pending_names(self, bucket: str, path: str) -> list[tuple[str, FileAttr]]:
        """Files created in directory ``path`` here and not committed yet."""
        prefix = dir_key(path)
        out = []
        for (b, key), node in self._open.items():
            if b != bucket or node.committed or node.unlinked or not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            if SEP not in rest:
                out.append((rest, node.attr))
        return sorted(out)

    async def mkdir(self, bucket: str, path: str, mode: int, uid: int, gid: int) -> FileAttr:
        """Create a directory marker. Raises ``PathExists``, ``NoSuchPath``,
        ``NotADirectory`` (a parent is a file)."""
        parent = await self._check_new(bucket, path)
        attr = self._new_attr(stat.S_IFDIR | stat.S_IMODE(mode), uid, gid, parent)
        self._dir_changed(bucket, path)
        return await self._make_entry(bucket, path, b"", attr, directory=True)

    async def mknod(
        self, bucket: str, path: str, mode: int, rdev: int, uid: int, gid: int
    ) -> FileAttr:
        """Create an empty file, FIFO, socket or device entry (stored, never opened
        as a device). Raises like ``mkdir``."""
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        parent = await self._check_new(bucket, path)
        attr = self._new_attr(mode, uid, gid, parent, rdev)
        return await self._make_entry(bucket, path, b"", attr)

    async def symlink(self, bucket: str, path: str, target: str, uid: int, gid: int) -> FileAttr:
        """Create a symbolic link (the object's body is the target)."""
        parent = await self._check_new(bucket, path)
        attr = self._new_attr(stat.S_IFLNK | 0o777, uid, gid, parent)
        body = target.encode("utf-8", "surrogateescape")
        return await self._make_entry(bucket, path, body, attr)

    async def _make_entry(
        self, bucket: str, path: str, body: bytes, attr: FileAttr, *, directory: bool = False
    ) -> FileAttr:
        """Store a new directory marker, link or special file and tell the name cache."""
        with self._changing(bucket, path) as change:
            key = dir_key(path) if directory else path
            made = self._file_attr(
                await self._put_small(bucket, key, body, attr, {}), directory=directory
            )
            change.exists(made)
        return made

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
        await self._quiesce(bucket, path)
        attr = await self.stat(bucket, path)
        if attr.is_dir:
            raise IsADirectory(path)
        node = self._open.get((bucket, path))
        if node is not None:
            self._forget_node(node)
        self._file_changed(bucket, path)
        with self._changing(bucket, path) as change:
            await self._objects.remove(bucket, path)
            change.removed()

    async def rmdir(self, bucket: str, path: str) -> None:
        """Remove an empty directory. Raises ``NoSuchPath``, ``NotADirectory``,
        ``DirectoryNotEmpty``, ``NotPermitted`` (a bucket root)."""
        if not path:
            raise NotPermitted("a bucket's root cannot be removed through the mount")
        await self._quiesce(bucket, path)
        await self._require_dir(bucket, path)
        prefix = dir_key(path)
        page = await self._store.list_objects(bucket, prefix=prefix, limit=2)
        if any(e.key != prefix for e in page.entries) or self.pending_names(bucket, path):
            raise DirectoryNotEmpty(path)
        self._dir_changed(bucket, path)
        with self._changing(bucket, path):  # forgotten: its own listing goes too
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
        await self._quiesce(bucket, src)
        await self._quiesce(dst_bucket, dst)
        self._file_changed(bucket, src)
        self._file_changed(dst_bucket, dst)
        try:
            with self._changing(bucket, src), self._changing(dst_bucket, dst) as change:
                # a directory's names move too: its spans (and those under it) go
                change.tree = await self._rename(bucket, src, dst_bucket, dst, noreplace=noreplace)
        finally:
            self._absent.pop((dst_bucket, dst), None)

    async def _rename(
        self, bucket: str, src: str, dst_bucket: str, dst: str, *, noreplace: bool
    ) -> bool:
        """Returns whether a directory moved."""
        if (bucket, src) == (dst_bucket, dst):
            await self.stat(bucket, src)
            return False
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
            if bucket == dst_bucket and dst.startswith(dir_key(src)):
                raise InvalidArgument("a directory cannot move into itself")
            if target is not None:
                await self.rmdir(dst_bucket, dst)  # DirectoryNotEmpty unless empty
            await self._rename_tree(bucket, src, dst_bucket, dst)
            return True
        replaced = self._open.get((dst_bucket, dst))
        if replaced is not None:
            self._forget_node(replaced)
        node = self._open.pop((bucket, src), None)
        if node is not None:
            await finish_cancel(node.stop_stream())
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
                return False
        await self._move_key(bucket, src, dst_bucket, dst)
        return False

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
        old, new = dir_key(src), dir_key(dst)
        for (b, key), node in list(self._open.items()):
            if b == bucket and key.startswith(old):
                await finish_cancel(node.stop_stream())
                del self._open[(b, key)]
                node.bucket, node.key = dst_bucket, new + key[len(old) :]
                self._open[(node.bucket, node.key)] = node
                if node.spool is not None:
                    node.spool.bucket, node.spool.key = node.bucket, node.key
                    node.spool.save()
        journal = await asyncio.to_thread(
            RenameJournal.create, self._spool_dir, new_sortable_id(), bucket, old, dst_bucket, new
        )
        await self._finish_rename(journal)

    async def _finish_rename(self, journal: RenameJournal) -> int:
        """Move every key left under the journal's source prefix, make sure the new
        directory exists, then drop the journal. Idempotent: a key moved twice (the
        process died between its copy and its removal) is copied again, whole."""
        old, new = journal.src, journal.dst
        moved = 0
        while True:
            page = await self._store.list_objects(journal.bucket, prefix=old, limit=LIST_PAGE)
            if not page.entries:
                break
            for entry in page.entries:
                dst_key = new + entry.key[len(old) :]
                with contextlib.suppress(NoSuchPath):  # removed since the listing
                    await self._move_key(journal.bucket, entry.key, journal.dst_bucket, dst_key)
                    moved += 1
        if moved == 0 or await self._store.get_current(journal.dst_bucket, new) is None:
            # keep the directory itself (and its attributes) when it had no marker
            now = self._clock()
            attr = FileAttr(DEFAULT_DIR_MODE, self.uid, self.gid, 0, now, now, now)
            await self._put_small(journal.dst_bucket, new, b"", attr, {})
        journal.remove()
        return moved

    async def link(self, bucket: str, path: str, new_bucket: str, new_path: str) -> None:
        """Hard links are not supported (docs/fuse.md): raises ``NotSupported``."""
        raise NotSupported("hard links are not supported")
