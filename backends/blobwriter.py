"""Small blob puts of local backends, done by a helper process.

Why: a put in a worker thread makes some fifteen system calls (directories, temporary
file, data, fsync, rename, directory fsyncs), and around each one the thread gives the
GIL up and takes it back. While the event loop works, each take-back waits for the loop
to let go, and each let-go slows the loop: on a loaded 2-core machine the creates of
small files through the mount ran 15-38 % slower with their blobs written in threads than
with the same calls made by this helper (docs/fuse.md, Numbers). The helper process has a
GIL of its own; the loop only writes a request to a socket and reads the reply.

The helper runs ``LocalBackend.write_file`` (the same code a worker thread runs, fsyncs
included) in a few threads of its own. It is started by the first put, lives in the
parent's process group, ignores SIGINT and SIGTERM (the parent decides), and ends when
its socket closes: at ``close``, or when the parent dies, after finishing the puts it
has read.

Protocol over a Unix socketpair, little-endian: a request is ``_REQUEST`` (id, flags,
length of ``name NUL root NUL path``, data length), those names, then the data; a reply
is ``_REPLY`` (id, outcome, errno, size, mtime, message length) and the message. Replies
come in the order puts finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, cast

from backends.errors import (
    BackendError,
    InvalidBlobKey,
    PermanentBackendError,
    TransientBackendError,
)

log = logging.getLogger("cairn.backends.blobwriter")

MAX_BYTES = 256 * 1024
"""Larger buffers are written by worker threads: for them the hand-offs do not count."""
WORKERS = 4
"""Puts the helper runs at once (their fsyncs overlap)."""

_REQUEST = struct.Struct("<IBHI")
_REPLY = struct.Struct("<IBiqdH")
_FSYNC = 1

_OK, _OS_ERROR, _INVALID_KEY, _PERMANENT, _TRANSIENT = range(5)
_KINDS: dict[int, type[BackendError]] = {
    _INVALID_KEY: InvalidBlobKey,
    _PERMANENT: PermanentBackendError,
    _TRANSIENT: TransientBackendError,
}


class BlobWriter:
    """The parent's side: one helper process shared by the pool's local backends.

    Bound to the event loop of its first put. ``close`` is idempotent.
    """

    def __init__(self, *, workers: int = WORKERS, max_bytes: int = MAX_BYTES) -> None:
        self._workers = workers
        self.max_bytes = max_bytes
        self._conn: _Connection | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False

    @property
    def pid(self) -> int | None:
        """The helper's process id, while one runs."""
        return self._proc.pid if self._proc is not None else None

    async def put(
        self, name: str, root: str, path: str, data: bytes | memoryview, *, fsync: bool
    ) -> tuple[int, float]:
        """Write ``data`` as the blob file ``path`` under ``root`` (``path`` comes from
        ``LocalBackend._path``); returns its size and mtime.

        Raises ``OSError`` as the put in a thread would, ``InvalidBlobKey`` and
        ``PermanentBackendError`` from ``LocalBackend``'s checks, and
        ``TransientBackendError`` when the helper ended before answering (the next put
        starts another). A put whose caller is cancelled still runs to its end in the
        helper, whole or not at all.
        """
        if self._closed:
            raise PermanentBackendError("the blob writer is closed", backend=name)
        conn = self._connection()
        return await conn.send(name, root, path, data, fsync=fsync)

    def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.lost:
            return conn
        self._reap()
        parent, child = socket.socketpair()
        try:
            env = dict(os.environ)
            top = str(Path(__file__).resolve().parent.parent)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (top, env.get("PYTHONPATH")) if p)
            fd = str(child.fileno())
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "backends.blobwriter", fd, str(self._workers)],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        conn = _Connection(parent, self._proc.pid)
        self._conn = conn
        return conn

    def _reap(self) -> None:
        """Collect a helper that ended (or end one whose socket is gone)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    async def close(self) -> None:
        """End the helper: it finishes the puts it has read, then exits. Puts still
        waiting fail with ``TransientBackendError``."""
        if self._closed:
            return
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        proc = self._proc
        if proc is not None:
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                log.warning("blob writer %d did not end: killed", proc.pid)
            self._reap()


class _Connection(asyncio.Protocol):
    """The socket to one helper: requests out, replies matched to their futures."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self._pid = pid
        self._sock = sock
        self._waiting: dict[int, tuple[asyncio.Future[tuple[int, float]], str]] = {}
        self._next_id = 1
        self._buf = bytearray()
        self.lost = False
        self._transport: asyncio.Transport | None = None
        self._ready = asyncio.ensure_future(
            asyncio.get_running_loop().create_unix_connection(lambda: self, sock=sock)
        )

    async def send(
        self, name: str, root: str, path: str, data: bytes | memoryview, *, fsync: bool
    ) -> tuple[int, float]:
        if self._transport is None:
            await asyncio.shield(self._ready)
        if self.lost or self._transport is None:
            raise TransientBackendError("the blob writer process ended", backend=name)
        rid = self._next_id
        self._next_id = rid % 0xFFFFFFFF + 1
        names = f"{name}\0{root}\0{path}".encode()
        fut: asyncio.Future[tuple[int, float]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = (fut, name)
        head = _REQUEST.pack(rid, _FSYNC if fsync else 0, len(names), len(data))
        self._transport.writelines((head, names, data))
        return await fut

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= _REPLY.size:
            rid, outcome, code, size, mtime, mlen = _REPLY.unpack_from(buf)
            end = _REPLY.size + mlen
            if len(buf) < end:
                return
            message = buf[_REPLY.size : end].decode("utf-8", "replace")
            del buf[:end]
            fut, name = self._waiting.pop(rid, (None, ""))
            if fut is None or fut.done():
                continue
            if outcome == _OK:
                fut.set_result((size, mtime))
            elif outcome == _OS_ERROR:
                fut.set_exception(OSError(code, message))
            else:
                error = _KINDS.get(outcome, TransientBackendError)(message)
                error.backend = name
                fut.set_exception(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        waiting, self._waiting = self._waiting, {}
        if waiting:
            log.warning("blob writer %d ended with %d puts unanswered", self._pid, len(waiting))
        for fut, name in waiting.values():
            if not fut.done():
                fut.set_exception(
                    TransientBackendError("the blob writer process ended", backend=name)
                )

    def close(self) -> None:
        """Close the socket (once the connection is made, if it is still being made)."""
        if self._ready.done():
            self._close_now()
        else:
            self._ready.add_done_callback(lambda _: self._close_now())

    def _close_now(self) -> None:
        if self._transport is not None:
            self._transport.close()
        else:  # the connection was never made
            if not self._ready.cancelled():
                self._ready.exception()  # seen: no "never retrieved" warning
            self._sock.close()


# -- the helper process ---------------------------------------------------------------


def _reply(rid: int, exc: BaseException | None, st: os.stat_result | None) -> bytes:
    if exc is None and st is not None:
        return _REPLY.pack(rid, _OK, 0, st.st_size, st.st_mtime, 0)
    code = 0
    if isinstance(exc, OSError):
        outcome, code, text = _OS_ERROR, exc.errno or 0, exc.strerror or str(exc)
    elif isinstance(exc, InvalidBlobKey):
        outcome, text = _INVALID_KEY, str(exc)
    elif isinstance(exc, PermanentBackendError):
        outcome, text = _PERMANENT, str(exc)
    else:
        outcome, text = _TRANSIENT, f"blob writer: {exc!r}"
    message = text.encode("utf-8", "replace")[:4096]
    return _REPLY.pack(rid, outcome, code, 0, 0.0, len(message)) + message


def serve(fd: int, workers: int) -> None:
    """The helper's main loop: read requests until EOF, answer each when done."""
    from backends.local import LocalBackend  # here: backends.local imports this module

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    send_lock = threading.Lock()
    backends: dict[tuple[str, str, bool], LocalBackend] = {}

    def put(rid: int, name: str, root: str, path: str, data: bytes, fsync: bool) -> None:
        st: os.stat_result | None = None
        error: BaseException | None = None
        try:
            backend = backends.get((name, root, fsync))
            if backend is None:
                backend = LocalBackend(name, Path(root), fsync=fsync)
                backends[(name, root, fsync)] = backend
            st = backend.write_file(path, data)
        except Exception as exc:  # every failure is answered, none ends the helper
            error = exc
        with send_lock, contextlib.suppress(OSError):  # the parent may be gone
            sock.sendall(_reply(rid, error, st))

    reader = cast(BinaryIO, sock.makefile("rb", buffering=1 << 20))
    with ThreadPoolExecutor(workers, thread_name_prefix="blobwriter") as pool:
        for rid, flags, name, root, path, data in _requests(reader):
            pool.submit(put, rid, name, root, path, data, bool(flags & _FSYNC))


def _requests(reader: BinaryIO) -> Iterator[tuple[int, int, str, str, str, bytes]]:
    """The requests read from the parent, until its end of the socket closes (a parent
    killed with replies unread resets the connection: the same end)."""
    while True:
        try:
            head = reader.read(_REQUEST.size)
            if len(head) < _REQUEST.size:
                return
            rid, flags, nlen, dlen = _REQUEST.unpack(head)
            names = reader.read(nlen)
            data = reader.read(dlen)
        except OSError:
            return
        if len(names) < nlen or len(data) < dlen:
            return
        name, root, path = names.decode().split("\0")
        yield rid, flags, name, root, path, data


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
