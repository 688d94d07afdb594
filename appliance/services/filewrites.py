"""Open files: reads, writes into the spool, and commits (whole, by changed chunks, or
written behind while a new file grows); ``setattr`` of an open file. Part of
``appliance.services.files``."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import mimetypes
import stat
from collections.abc import AsyncIterator, Iterable

from appliance.errors import (
    InvalidArgument,
    IsADirectory,
    NoCapacity,
    NoSuchBucket,
    NoSuchKey,
    NoSuchPath,
)
from appliance.ids import new_sortable_id
from appliance.meta.errors import Conflict
from appliance.meta.models import ChunkPlacement, ChunkRef, VersionKind
from appliance.services.fileattrs import FileAttr, encode, xattrs
from appliance.services.filecore import FileCore
from appliance.services.filereader import PieceReader
from appliance.services.filetypes import READ_PIECE, AttrChanges, OpenFile, dir_key
from appliance.services.objects import ObjectHandle, WriteResult, check_key
from appliance.services.spool import Spool

log = logging.getLogger("cairn.files")

RETRY_DELAYS = (1.0, 4.0, 15.0, 60.0)
"""Seconds between the attempts of a commit behind that failed."""


class FileWrites(FileCore):
    """Open, read, write, flush and release files (see ``appliance.services.files``)."""

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
            node.reader = PieceReader(self._objects.chunks, node.base)
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

        With write-back (``write_back`` > 0) a file of at most one chunk that is not
        streaming is committed behind: this returns once its room is checked, and
        ``settle`` (or ``fsync``) waits for the commit. ``fsync`` always waits, for
        the spool's fsync and the commit. Raises ``NoCapacity`` (the data stays
        spooled), the store's and backends' errors."""
        if fsync:
            await self._settle_node(node)
            async with node.lock:
                if node.spool is not None:
                    await asyncio.to_thread(node.spool.fsync)
                await self._commit(node)
            return
        async with node.lock:
            if self._may_commit_behind(node):
                await self._check_room(0)
                self._commit_behind(node)
                return
            await self._commit(node)

    async def release(self, node: OpenFile) -> None:
        """Drop one handle; the last one commits what is left (behind, like ``flush``,
        with write-back) and forgets the file. Raises like ``flush`` (the spool is then
        kept for recovery)."""
        node.handles -= 1
        if node.handles > 0:
            return
        if node.behind is not None:  # its commit forgets the file when it ends
            node.commit_wanted = True
            return
        if self._may_commit_behind(node):
            self._commit_behind(node)
            return
        try:
            async with node.lock:
                await self._commit(node)
        finally:
            if node.handles <= 0:
                self._retire(node)

    def _retire(self, node: OpenFile) -> None:
        """Forget a file no handle holds any more; a spool left means its commit failed
        and stays for the next mount's recovery."""
        if node.reader is not None:
            node.reader.close()
            node.reader = None
        if self._open.get((node.bucket, node.key)) is node:
            del self._open[(node.bucket, node.key)]
            if not node.dirty and not node.unlinked:
                self._recent[(node.bucket, node.key)] = node.attr
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

    # -- write-back ---------------------------------------------------------------------
    def _may_commit_behind(self, node: OpenFile) -> bool:
        spool = node.spool
        return (
            self._write_back > 0
            and node.dirty
            and not node.unlinked
            and node.stream is None
            and (spool is None or spool.size <= self._chunk_size)
            and (node.behind is not None or len(self._behind) < self._write_back)
        )

    def _commit_behind(self, node: OpenFile) -> None:
        """Have ``node`` committed by a task of its own (one at a time per file)."""
        node.commit_wanted = True
        if node.behind is None:
            task = asyncio.ensure_future(self._run_behind(node))
            node.behind = task
            self._behind[task] = asyncio.Event()

    async def _run_behind(self, node: OpenFile) -> None:
        """Commit while asked to; failures are retried (``RETRY_DELAYS``) outside what
        ``settle`` waits for, then left in the spool for recovery. Forgets the file
        when no handle holds it at the end."""
        task = asyncio.current_task()
        delays = iter(RETRY_DELAYS)
        cancelled = False  # at unmount: ``commit_all`` takes the file over
        try:
            while node.commit_wanted and not node.unlinked:
                node.commit_wanted = False
                try:
                    async with self._commit_slots, node.lock:
                        await self._commit(node)
                except Exception as exc:
                    delay = next(delays, None)
                    if delay is None:
                        log.error("%s/%s: commit failed: %s", node.bucket, node.key, exc)
                        break
                    log.warning(
                        "%s/%s: commit after close failed, retrying in %.0f s: %s",
                        node.bucket,
                        node.key,
                        delay,
                        exc,
                    )
                    if task is not None and task in self._behind:
                        self._behind.pop(task).set()
                        self._retrying.add(task)
                    node.commit_wanted = True
                    await asyncio.sleep(delay)
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            node.behind = None
            if task is not None:
                first = self._behind.pop(task, None)
                if first is not None:
                    first.set()
                self._retrying.discard(task)
            if node.handles <= 0 and not cancelled:
                self._retire(node)

    def _recommit(self, node: OpenFile) -> None:
        """A closed file changed again (``setattr``, ``setxattr``) before its commit
        behind ended and forgot it: commit that too."""
        if node.handles <= 0 and node.dirty:
            self._commit_behind(node)

    @property
    def commits_behind(self) -> int:
        """How many closed files are still being committed (write-back)."""
        return len(self._behind) + len(self._retrying)

    async def settle(self) -> None:
        """Wait until every commit behind started before this call has made its first
        attempt (what a file closed here needs before another frontend reads it).
        Never raises."""
        for first in list(self._behind.values()):
            await first.wait()

    async def _settle_node(self, node: OpenFile) -> None:
        """Wait for ``node``'s commit behind, retries included. Never raises."""
        task = node.behind
        if task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(task)

    async def _quiesce(self, bucket: str, path: str) -> None:
        """Before a name changes: let the commits behind of ``path`` and of what lies
        under it end, so none lands after the change."""
        await self.settle()
        under = dir_key(path)
        for (b, key), node in list(self._open.items()):
            if b == bucket and (key == path or key.startswith(under)):
                await self._settle_node(node)

    async def _commit(self, node: OpenFile) -> None:
        if node.unlinked or not node.dirty:
            return
        with self._changing(node.bucket, node.key) as change:
            await self._commit_dirty(node)
            change.exists(node.attr)

    async def _commit_dirty(self, node: OpenFile) -> None:
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
            await finish_cancel(node.stop_stream())
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
                node.spool.save()
        return node.attr

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
        spool kept for the next mount's recovery. Commits behind end first (those
        waiting to retry get one more try here)."""
        await self.settle()
        for task in list(self._retrying):
            task.cancel()
        if self._retrying:
            await asyncio.gather(*list(self._retrying), return_exceptions=True)
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


async def finish_cancel(task: asyncio.Task[WriteResult] | None) -> None:
    """Wait for a cancelled write-behind commit to finish aborting."""
    if task is not None:
        with contextlib.suppress(BaseException):
            await task


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
