"""A backend storing each blob as a file under a root directory.

Layout: key ``a/b/c`` is the file ``<root>/a/b/c``. Consequences worth knowing:

- A key cannot also be a "directory" of another key (``a`` and ``a/b`` cannot both
  exist); the second put raises ``PermanentBackendError``. Cairn's blob names never
  do this.
- Writes go to a temporary file in the target's directory, are fsynced, renamed over
  the target (atomic) and the directory is fsynced. Temporary names contain a
  backslash, which no valid key may contain, so they never collide with a key and
  ``list`` skips them. A crash can leave such files behind; they are invisible.
- Symlinks below the root are never followed: a key whose path traverses one is
  rejected with ``InvalidBlobKey`` and ``list`` skips them.
- ``list`` reads each directory whole and sorts it (directories sort as ``name/``),
  which yields exact ascending key order while holding one directory listing per
  level in memory.

Blocking file I/O runs in worker threads (``asyncio.to_thread``), one call per piece
of at most ``READ_PIECE_SIZE`` bytes for reads, so the event loop is never blocked
on the disk. Given a ``BlobWriter``, puts of buffers up to its ``max_bytes`` are made by
its helper process instead (see ``backends.blobwriter``).

Also home of :func:`validate_key`, the portable key rules every backend applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import stat
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Generator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from backends.base import BlobBody, BlobInfo, BlobStream, ByteRange, Capabilities
from backends.blobwriter import BlobWriter
from backends.errors import (
    BackendError,
    BackendFull,
    BlobNotFound,
    InvalidBlobKey,
    PermanentBackendError,
    TransientBackendError,
)

PIECE_SIZE = 1024 * 1024
READ_PIECE_SIZE = 8 * 1024 * 1024
"""Reads go in pieces of up to 8 MiB: a whole default-size chunk in one thread hop."""
"""Reads and writes move at most this many bytes per worker-thread call."""

MAX_KEY_BYTES = 1024
NAME_MAX = 255
"""Longest file name (one key segment), in UTF-8 bytes, on common Linux filesystems."""

TEMP_PREFIX = ".cairn-tmp\\"
"""Temporary files start with this; the backslash makes them impossible keys."""

_T = TypeVar("_T")


def validate_key(key: str, *, backend: str = "", max_bytes: int = MAX_KEY_BYTES) -> None:
    """Raise ``InvalidBlobKey`` unless ``key`` is portable to every backend.

    A valid key is non-empty, at most ``max_bytes`` bytes in UTF-8, contains no NUL
    and no backslash, does not start with ``/`` and has no empty, ``.`` or ``..``
    segment (so ``a//b``, ``a/`` and ``a/../b`` are all rejected).
    """
    if not isinstance(key, str) or not key:
        raise InvalidBlobKey("empty blob key", backend=backend)
    shown = repr(key[:80])
    try:
        length = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidBlobKey(f"blob key {shown} is not valid Unicode", backend=backend) from None
    if length > max_bytes:
        raise InvalidBlobKey(
            f"blob key {shown}... is {length} bytes, over {max_bytes}", backend=backend
        )
    if "\x00" in key or "\\" in key:
        raise InvalidBlobKey(f"blob key {shown} contains NUL or backslash", backend=backend)
    if key.startswith("/"):
        raise InvalidBlobKey(f"blob key {shown} is absolute", backend=backend)
    if any(seg in ("", ".", "..") for seg in key.split("/")):
        raise InvalidBlobKey(f"blob key {shown} has an empty, '.' or '..' segment", backend=backend)


def clip_range(byte_range: ByteRange | None, size: int) -> tuple[int, int]:
    """Return ``(start, end)`` of ``byte_range`` clipped to ``[0, size)``; may be empty."""
    if byte_range is None:
        return 0, size
    end = size if byte_range.end is None else min(byte_range.end, size)
    start = min(byte_range.start, end)
    return start, end


def _map_oserror(exc: OSError, *, backend: str, key: str, writing: bool) -> BackendError:
    """Translate an ``OSError`` from a call on ``key`` into a ``backends.errors`` class."""
    code = exc.errno
    message = f"{key!r}: {exc.strerror or exc}"
    if code in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
        if not writing:
            return BlobNotFound(message, backend=backend)
        if code == errno.ENOENT:  # a directory vanished under a concurrent delete
            return TransientBackendError(message, backend=backend)
        return PermanentBackendError(
            f"{message} (the key conflicts with an existing key's path)", backend=backend
        )
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return BackendFull(message, backend=backend)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermanentBackendError(message, backend=backend)
    if code in (errno.ENAMETOOLONG, errno.ELOOP):
        return InvalidBlobKey(message, backend=backend)
    return TransientBackendError(message, backend=backend)


async def _to_thread_owned(fn: Callable[[], _T], release: Callable[[_T], None]) -> _T:
    """Run ``fn`` in a thread; if we are cancelled meanwhile, ``release`` its result."""
    task = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:

        def _done(t: asyncio.Future[_T]) -> None:
            if not t.cancelled() and t.exception() is None:
                release(t.result())

        task.add_done_callback(_done)
        raise


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a finished future's outcome as seen (asyncio logs unretrieved errors)."""
    if not fut.cancelled():
        fut.exception()


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mtime(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(st.st_mtime, tz=UTC)


class _TempFile:
    """An open temporary file; ``discard`` closes and removes it (idempotent)."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self.closed = False
        self.busy: asyncio.Future[Any] | None = None
        """The last worker-thread operation on ``fd``."""

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def discard(self) -> None:
        try:
            self.close()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class _FileStream:
    """A ``BlobStream`` over ``[start, end)`` of an open file; closes the fd on aclose."""

    def __init__(self, fd: int, start: int, end: int, *, backend: str, key: str) -> None:
        self._fd: int | None = fd
        self._pos = start
        self._end = end
        self._backend = backend
        self._key = key
        self._inflight: asyncio.Future[bytes] | None = None

    def __aiter__(self) -> _FileStream:
        return self

    async def __anext__(self) -> bytes:
        fd = self._fd
        if fd is None or self._pos >= self._end:
            await self.aclose()
            raise StopAsyncIteration
        n = min(READ_PIECE_SIZE, self._end - self._pos)
        fut = asyncio.ensure_future(asyncio.to_thread(os.pread, fd, n, self._pos))
        self._inflight = fut
        try:
            piece = await asyncio.shield(fut)
        except OSError as exc:
            await self.aclose()
            raise TransientBackendError(
                f"reading {self._key!r} failed: {exc}", backend=self._backend
            ) from exc
        if not piece:
            await self.aclose()
            raise TransientBackendError(
                f"{self._key!r} shrank while being read", backend=self._backend
            )
        self._pos += len(piece)
        return piece

    async def aclose(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        fut = self._inflight
        if fut is not None and not fut.done():  # a read still runs in its thread: wait for it

            def _close_after(f: asyncio.Future[bytes]) -> None:
                _retrieve(f)
                os.close(fd)

            fut.add_done_callback(_close_after)
        else:
            os.close(fd)

    def __del__(self) -> None:
        if self._fd is not None and (self._inflight is None or self._inflight.done()):
            os.close(self._fd)


class LocalBackend:
    """Blobs as files under ``root`` (which must exist); see the module docstring.

    ``fsync=False`` skips file and directory fsyncs: faster, but a power loss may lose
    recent writes (renames stay atomic). ``writer`` (shared, closed by its owner) makes
    the puts of small buffers.
    """

    def __init__(
        self, name: str, root: Path, *, fsync: bool = True, writer: BlobWriter | None = None
    ) -> None:
        self._name = name
        self._root = os.path.realpath(root)
        self._fsync = fsync
        self._writer = writer
        self._closed = False
        self._capabilities = Capabilities(max_key_length=MAX_KEY_BYTES)

    @property
    def name(self) -> str:
        return self._name

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @property
    def root(self) -> Path:
        return Path(self._root)

    @property
    def writer(self) -> BlobWriter | None:
        """The helper that makes small puts (owned by whoever passed it)."""
        return self._writer

    # -- keys and paths ------------------------------------------------------------

    def _path(self, key: str) -> str:
        """Validate ``key`` (portable rules plus file-name length) and return its path."""
        if self._closed:
            raise PermanentBackendError("backend is closed", backend=self._name)
        validate_key(key, backend=self._name)
        for seg in key.split("/"):
            if len(seg.encode("utf-8")) > NAME_MAX:
                raise InvalidBlobKey(
                    f"segment {seg[:40]!r}... is longer than {NAME_MAX} bytes",
                    backend=self._name,
                )
        return f"{self._root}/{key}"

    def _check_no_symlink(self, path: str) -> None:
        """Raise ``InvalidBlobKey`` when ``path`` traverses a symlink (or leaves the root).

        Runs in a worker thread: ``realpath`` looks at every existing component.
        """
        if os.path.realpath(path) != path:
            raise InvalidBlobKey(
                f"{path[len(self._root) + 1 :]!r} traverses a symlink or leaves the root",
                backend=self._name,
            )

    async def _run(self, fn: Callable[[], _T], key: str, *, writing: bool = False) -> _T:
        try:
            return await asyncio.to_thread(fn)
        except OSError as exc:
            raise _map_oserror(exc, backend=self._name, key=key, writing=writing) from exc

    # -- put -----------------------------------------------------------------------

    async def put(self, key: str, body: BlobBody, *, size: int) -> BlobInfo:
        """Write the blob atomically (temp file, fsync, rename, fsync directory).

        A buffer is written in one worker-thread call (directories, temp file, data,
        fsync, rename), or by the writer's helper process if it is small enough; a stream
        takes one call per piece.

        Raises ``PermanentBackendError`` when a buffer's length differs from ``size`` or
        a stream yields too many bytes, ``TransientBackendError`` when a stream ends
        early or its iterator fails, ``BackendFull`` when the disk is full. On any
        failure the temporary file is removed and a previous blob stays intact. A put
        cancelled during its final fsync and rename may still take effect (whole,
        never partly).
        """
        path = self._path(key)
        if size < 0:
            raise PermanentBackendError(f"negative blob size {size}", backend=self._name)
        if isinstance(body, bytes | bytearray | memoryview):
            view = memoryview(body).cast("B")
            if len(view) != size:
                raise PermanentBackendError(
                    f"body has {len(view)} bytes but size is {size}", backend=self._name
                )
            return await self._put_buffer(path, view, key)
        try:
            tmp, synced_dirs = await _to_thread_owned(
                lambda: self._create_temp(path), lambda r: self._discard(r[0], path)
            )
        except OSError as exc:
            raise _map_oserror(exc, backend=self._name, key=key, writing=True) from exc
        try:
            await self._write_stream(tmp, body, size, key)
            st = await self._on_temp(tmp, lambda: self._commit(tmp, path, synced_dirs), key)
        except BaseException:
            busy = tmp.busy
            if busy is not None and not busy.done():  # cancelled while a thread uses the fd

                def _discard_after(f: asyncio.Future[Any]) -> None:
                    _retrieve(f)
                    self._discard(tmp, path)

                busy.add_done_callback(_discard_after)
            else:
                self._discard(tmp, path)  # quick syscalls, inline: nothing can skip them
            raise
        return BlobInfo(key=key, size=st.st_size, modified=_mtime(st))

    async def _put_buffer(self, path: str, view: memoryview, key: str) -> BlobInfo:
        """The whole put of a buffer in one worker-thread call: thread hops cost more
        than the syscalls of a small blob. Cancelled before its fsync, the thread
        discards the temp file; after it, the put completes."""
        if self._writer is not None and len(view) <= self._writer.max_bytes:
            return await self._put_by_writer(self._writer, path, view, key)
        cancelled = threading.Event()
        fut = asyncio.ensure_future(asyncio.to_thread(self.write_file, path, view, cancelled))
        try:
            st = await asyncio.shield(fut)
        except asyncio.CancelledError:
            cancelled.set()
            fut.add_done_callback(_retrieve)
            raise
        except OSError as exc:
            raise _map_oserror(exc, backend=self._name, key=key, writing=True) from exc
        return BlobInfo(key=key, size=st.st_size, modified=_mtime(st))

    async def _put_by_writer(
        self, writer: BlobWriter, path: str, view: memoryview, key: str
    ) -> BlobInfo:
        """The put of a small buffer by the writer's helper process. Cancelled, it waits
        for the helper's answer first: nothing lands after the call has ended."""
        put = writer.put(self._name, self._root, path, view, fsync=self._fsync)
        fut = asyncio.ensure_future(put)
        try:
            size, mtime = await asyncio.shield(fut)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await fut
            raise
        except OSError as exc:
            raise _map_oserror(exc, backend=self._name, key=key, writing=True) from exc
        return BlobInfo(key=key, size=size, modified=datetime.fromtimestamp(mtime, tz=UTC))

    def write_file(
        self, path: str, data: bytes | memoryview, cancelled: threading.Event | None = None
    ) -> os.stat_result:
        """Blocking: the whole put of a buffer at ``path`` (from ``_path``): directories,
        temporary file, data, fsync, rename, directory fsyncs. Raises ``OSError``,
        ``InvalidBlobKey``, ``PermanentBackendError``; on any failure, and when
        ``cancelled`` is set before the fsync (``CancelledError``), the temporary file is
        removed."""
        tmp, changed = self._create_temp(path)
        try:
            if len(data):
                _write_all(tmp.fd, data)
            if cancelled is not None and cancelled.is_set():
                raise asyncio.CancelledError
            return self._commit(tmp, path, changed)
        except BaseException:
            self._discard(tmp, path)
            raise

    async def _on_temp(self, tmp: _TempFile, fn: Callable[[], _T], key: str) -> _T:
        """Run ``fn`` (which uses ``tmp``) in a thread; on cancellation the thread keeps
        running and ``tmp.busy`` tells the caller to clean up only once it is done."""
        fut = asyncio.ensure_future(asyncio.to_thread(fn))
        tmp.busy = fut
        try:
            return await asyncio.shield(fut)
        except OSError as exc:
            raise _map_oserror(exc, backend=self._name, key=key, writing=True) from exc

    async def _write_stream(
        self, tmp: _TempFile, body: AsyncIterable[bytes], size: int, key: str
    ) -> None:
        written = 0
        try:
            async for piece in body:
                written += len(piece)
                if written > size:
                    raise PermanentBackendError(
                        f"body yielded more than the declared {size} bytes", backend=self._name
                    )
                await self._write(tmp, piece, key)
        except BackendError:
            raise
        except Exception as exc:
            raise TransientBackendError(
                f"body stream failed after {written} bytes: {exc!r}", backend=self._name
            ) from exc
        if written != size:
            raise TransientBackendError(
                f"body stream ended after {written} of {size} bytes", backend=self._name
            )

    async def _write(self, tmp: _TempFile, data: bytes | memoryview, key: str) -> None:
        if data:
            await self._on_temp(tmp, lambda: _write_all(tmp.fd, data), key)

    def _create_temp(self, path: str) -> tuple[_TempFile, list[str]]:
        """Create the parent directories and an exclusive temporary file next to ``path``.

        Returns the temp file and the directories whose entries changed (to fsync).
        Retries when a concurrent delete removes a freshly created empty directory.
        """
        if not os.path.isdir(self._root):
            raise PermanentBackendError(
                f"root directory {self._root} does not exist", backend=self._name
            )
        parent = os.path.dirname(path)
        for attempt in range(5):
            # no realpath here: _make_dirs lstats every existing directory on the way (a
            # symlink is refused), the temp file is O_NOFOLLOW and the rename replaces a
            # symlink at the blob's name instead of following it
            changed = self._make_dirs(parent)
            tmp_path = f"{parent}/{TEMP_PREFIX}{secrets.token_hex(8)}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                return _TempFile(os.open(tmp_path, flags, 0o644), tmp_path), changed
            except FileNotFoundError:
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def _make_dirs(self, parent: str) -> list[str]:
        """Create the missing directories from the root down to ``parent``."""
        changed: list[str] = []
        current = self._root
        for seg in parent[len(self._root) + 1 :].split("/") if parent != self._root else []:
            nxt = f"{current}/{seg}"
            try:
                os.mkdir(nxt)
                changed.append(current)
            except FileExistsError:
                mode = os.lstat(nxt).st_mode
                if stat.S_ISLNK(mode):
                    raise InvalidBlobKey(
                        f"{nxt[len(self._root) + 1 :]!r} is a symlink", backend=self._name
                    ) from None
                if not stat.S_ISDIR(mode):
                    raise PermanentBackendError(
                        f"{nxt[len(self._root) + 1 :]!r} is a blob, not a directory",
                        backend=self._name,
                    ) from None
            current = nxt
        return changed

    def _commit(self, tmp: _TempFile, path: str, changed_dirs: list[str]) -> os.stat_result:
        if self._fsync:
            os.fsync(tmp.fd)
        st = os.fstat(tmp.fd)
        tmp.close()
        os.replace(tmp.path, path)
        if self._fsync:
            _fsync_dir(os.path.dirname(path))
            for d in reversed(changed_dirs):
                _fsync_dir(d)
        return st

    def _discard(self, tmp: _TempFile, path: str) -> None:
        with contextlib.suppress(OSError):
            tmp.discard()
        self._prune_dirs(os.path.dirname(path))

    def _prune_dirs(self, directory: str) -> None:
        """Remove now-empty directories from ``directory`` up to (not including) the root."""
        while directory != self._root and directory.startswith(self._root + "/"):
            try:
                os.rmdir(directory)
            except OSError:
                return
            directory = os.path.dirname(directory)

    # -- get, head, delete -----------------------------------------------------------

    async def get(self, key: str, byte_range: ByteRange | None = None) -> BlobStream:
        """Open the blob and stream ``byte_range`` of it (clipped; empty past the end).

        Raises ``BlobNotFound`` if absent. The stream reads the file opened here, so a
        concurrent overwrite does not mix versions.
        """
        path = self._path(key)
        try:
            fd, size = await _to_thread_owned(
                lambda: self._open_read(path), lambda r: os.close(r[0])
            )
        except OSError as exc:
            raise _map_oserror(exc, backend=self._name, key=key, writing=False) from exc
        start, end = clip_range(byte_range, size)
        return _FileStream(fd, start, end, backend=self._name, key=key)

    def _open_read(self, path: str) -> tuple[int, int]:
        self._check_no_symlink(path)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FileNotFoundError(errno.ENOENT, "not a blob")
        except BaseException:
            os.close(fd)
            raise
        return fd, st.st_size

    async def head(self, key: str) -> BlobInfo:
        """Return size and modification time; ``BlobNotFound`` if absent."""
        path = self._path(key)
        st = await self._run(lambda: self._stat(path), key)
        return BlobInfo(key=key, size=st.st_size, modified=_mtime(st))

    def _stat(self, path: str) -> os.stat_result:
        self._check_no_symlink(path)
        st = os.stat(path, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise FileNotFoundError(errno.ENOENT, "not a blob")
        return st

    async def delete(self, key: str) -> None:
        """Remove the blob and its now-empty parent directories; idempotent."""
        path = self._path(key)
        await self._run(lambda: self._delete(path), key, writing=True)

    def _delete(self, path: str) -> None:
        self._check_no_symlink(path)
        try:
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        self._prune_dirs(os.path.dirname(path))

    # -- list ----------------------------------------------------------------------

    def list(
        self, prefix: str = "", *, start_after: str | None = None, page_size: int = 1000
    ) -> AsyncIterator[BlobInfo]:
        """Yield blobs under ``prefix`` in ascending key order, after ``start_after``.

        Each internal page (one worker-thread call) gathers at most ``page_size`` blobs.
        A prefix no valid key can start with yields nothing.
        """
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        return self._list(prefix, start_after, page_size)

    async def _list(
        self, prefix: str, start_after: str | None, page_size: int
    ) -> AsyncIterator[BlobInfo]:
        if self._closed:
            raise PermanentBackendError("backend is closed", backend=self._name)
        walk = self._walk_prefix(prefix, start_after)

        def take() -> list[BlobInfo]:
            batch: list[BlobInfo] = []
            for info in walk:
                batch.append(info)
                if len(batch) >= page_size:
                    break
            return batch

        try:
            while True:
                batch = await self._run(take, prefix)
                for info in batch:
                    yield info
                if len(batch) < page_size:
                    return
        finally:
            # ValueError: the walk still runs in a thread after a cancellation
            with contextlib.suppress(ValueError):
                walk.close()

    def _walk_prefix(self, prefix: str, start_after: str | None) -> Generator[BlobInfo, None, None]:
        base = prefix[: prefix.rfind("/") + 1]  # the directory part, "" or ending in "/"
        if base:
            if "\x00" in base or "\\" in base or base.startswith("/"):
                return
            if any(seg in ("", ".", "..") for seg in base[:-1].split("/")):
                return
            directory = f"{self._root}/{base[:-1]}"
            if os.path.realpath(directory) != directory:
                return
        else:
            directory = self._root
        yield from self._walk(directory, base, prefix, start_after)

    def _walk(
        self, directory: str, base: str, prefix: str, start_after: str | None
    ) -> Iterator[BlobInfo]:
        try:
            with os.scandir(directory) as it:
                entries = [
                    (e.name, e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False))
                    for e in it
                ]
        except (FileNotFoundError, NotADirectoryError):
            return
        items: list[tuple[str, str, bool]] = []
        for name, is_dir, is_file in entries:
            if "\\" in name:
                continue  # temporary files: no key contains a backslash
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                continue  # not decodable: not one of our keys
            if is_dir:
                items.append((f"{base}{name}/", name, True))
            elif is_file:
                items.append((f"{base}{name}", name, False))
        items.sort()
        for sort_key, name, is_dir in items:
            if is_dir:
                if not (sort_key.startswith(prefix) or prefix.startswith(sort_key)):
                    continue
                if (
                    start_after is not None
                    and start_after >= sort_key
                    and not start_after.startswith(sort_key)
                ):
                    continue  # every key below sorts before start_after
                yield from self._walk(f"{directory}/{name}", sort_key, prefix, start_after)
            else:
                if not sort_key.startswith(prefix):
                    continue
                if start_after is not None and sort_key <= start_after:
                    continue
                try:
                    st = os.stat(f"{directory}/{name}", follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted meanwhile
                yield BlobInfo(key=sort_key, size=st.st_size, modified=_mtime(st))

    async def close(self) -> None:
        """Mark the backend closed; later calls raise ``PermanentBackendError``."""
        self._closed = True
