"""Attributes (``setattr``) and extended attributes of files and directories, stored as
user metadata. Part of ``appliance.services.files``."""

from __future__ import annotations

from appliance.errors import InvalidArgument, IsADirectory, NoSuchKey, NoSuchPath, NotPermitted
from appliance.services.fileattrs import RESERVED, FileAttr, encode, xattrs
from appliance.services.filedirs import FileDirs
from appliance.services.filetypes import AttrChanges, dir_key


class FileMeta(FileDirs):
    """``setattr`` and ``user.*`` extended attributes (see ``appliance.services.files``)."""

    async def _rewrite_meta(
        self, bucket: str, path: str, attr: FileAttr, extra: dict[str, str]
    ) -> FileAttr:
        """Store new attributes of a committed entry as a metadata-only new version."""
        if not path:
            raise NotPermitted("a bucket's root has no attributes of its own")
        self._file_changed(bucket, path)
        with self._changing(bucket, path) as change:
            new = await self._store_meta(bucket, path, attr, extra)
            change.exists(new)
        return new

    async def _store_meta(
        self, bucket: str, path: str, attr: FileAttr, extra: dict[str, str]
    ) -> FileAttr:
        if attr.is_dir:
            self._dir_changed(bucket, path)
            key = dir_key(path)
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
        key = dir_key(path) if attr.is_dir else path
        version = await self._store.get_current(bucket, key) if path else None
        return xattrs(version.user_metadata) if version is not None else {}

    async def set_attr(self, bucket: str, path: str, changes: AttrChanges) -> FileAttr:
        """Apply a ``setattr``. A size change truncates or extends (a file only); on an
        open file the change waits for its commit. Raises ``NoSuchPath``,
        ``IsADirectory`` (size of a directory), ``NotPermitted`` (a bucket root)."""
        node = self._open.get((bucket, path))
        if node is not None and not node.unlinked:
            async with node.lock:
                if self._open.get((bucket, path)) is node and not node.unlinked:
                    attr = await self._set_attr_open(node, changes)
                    self._recommit(node)
                    return attr
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
                if self._open.get((bucket, path)) is node and not node.unlinked:
                    if value is None:
                        del node.xattrs[name]
                    else:
                        node.xattrs[name] = value
                    node.attr = node.attr.with_changes(ctime_ns=self._clock())
                    node.meta_dirty = True
                    if node.spool is not None:
                        node.spool.meta = encode(node.attr, node.xattrs)
                        node.spool.save()
                    self._recommit(node)
                    return
        attr = await self.stat(bucket, path)
        extra = await self._current_meta(bucket, path, attr)
        if value is None:
            del extra[name]
        else:
            extra[name] = value
        await self._rewrite_meta(bucket, path, attr.with_changes(ctime_ns=self._clock()), extra)
