"""Waiting for the FUSE device to become readable, without two ``epoll_ctl`` per request.

pyfuse3's asyncio layer (``pyfuse3.asyncio.wait_readable``) registers the device with
the loop before every request and unregisters it after: two system calls and the
selector's bookkeeping per request, about a tenth of the daemon's time when files are
small (docs/fuse.md). ``DeviceReadiness`` keeps the registration while requests keep
coming. The loop's selector is level triggered, so a readable device with nobody
waiting would spin it: the registration is dropped when that is seen twice in a row (the
first is usually a readiness reported before the woken task read its request).

A readiness report can also be stale for a waiter: reported, then the request read by a
task that finished it and came back to wait within the same loop iteration. pyfuse3
then reads the device *blocking*, which would stop the loop for good, so a waiter is
woken only after a zero-timeout ``poll`` of the device confirms a request is there: one
system call instead of the two ``epoll_ctl``.

pyfuse3 lets one task wait at a time (its read lock), so one waiter suffices; a second
concurrent waiter is still served correctly (each gets its own future).
"""

from __future__ import annotations

import asyncio
import select
from types import ModuleType
from typing import Any


class DeviceReadiness:
    """Readiness of file descriptors for pyfuse3's worker tasks, on one loop.

    ``wait`` returns once ``fd`` is readable; raises ``ClosedResourceError`` (pyfuse3's)
    after ``notify_closing``. Not thread-safe: the loop's thread only.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, closed_error: type[Exception]) -> None:
        self._loop = loop
        self._closed_error = closed_error
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}
        self._registered: set[int] = set()
        self._idle_fires: dict[int, int] = {}
        self._pollers: dict[int, select.poll] = {}
        self.replaced: dict[str, Any] = {}
        """pyfuse3's functions that ``install`` replaced, for ``uninstall``."""

    async def wait(self, fd: int) -> None:
        future: asyncio.Future[None] = self._loop.create_future()
        waiting = self._waiters.setdefault(fd, [])
        waiting.append(future)
        if fd not in self._registered:
            self._loop.add_reader(fd, self._ready, fd)
            self._registered.add(fd)
        try:
            await future
        finally:
            if future in waiting:
                waiting.remove(future)

    def _ready(self, fd: int) -> None:
        waiting = [f for f in self._waiters.get(fd, ()) if not f.done()]
        if not waiting:
            fires = self._idle_fires.get(fd, 0) + 1
            self._idle_fires[fd] = fires
            if fires >= 2:
                self._unregister(fd)
            return
        self._idle_fires[fd] = 0
        if not self._readable(fd):
            return  # stale: that request was read already; the next one reports again
        for future in waiting:
            future.set_result(None)

    def _readable(self, fd: int) -> bool:
        poller = self._pollers.get(fd)
        if poller is None:
            poller = self._pollers[fd] = select.poll()
            poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))

    def _unregister(self, fd: int) -> None:
        self._idle_fires.pop(fd, None)
        if fd in self._registered:
            self._registered.discard(fd)
            self._loop.remove_reader(fd)

    def notify_closing(self, fd: int) -> None:
        """Fail every waiter on ``fd`` and forget it (the device is about to close)."""
        self._unregister(fd)
        self._pollers.pop(fd, None)
        for future in self._waiters.pop(fd, []):
            if not future.done():
                future.set_exception(self._closed_error())

    def close(self) -> None:
        """Drop every registration (after the FUSE loop ended)."""
        for fd in list(self._registered):
            self._unregister(fd)


def install(compat: ModuleType, loop: asyncio.AbstractEventLoop) -> DeviceReadiness:
    """Route pyfuse3's asyncio ``wait_readable``/``notify_closing`` (the functions of
    ``compat``, the ``pyfuse3.asyncio`` module) to a new ``DeviceReadiness``; undo with
    ``uninstall``."""
    readiness = DeviceReadiness(loop, compat.ClosedResourceError)
    readiness.replaced = {
        "wait_readable": compat.wait_readable,
        "notify_closing": compat.notify_closing,
    }
    compat.wait_readable = readiness.wait  # type: ignore[attr-defined]
    compat.notify_closing = readiness.notify_closing  # type: ignore[attr-defined]
    return readiness


def uninstall(compat: ModuleType, readiness: DeviceReadiness) -> None:
    """Put pyfuse3's own functions back and drop ``readiness``'s registrations."""
    readiness.close()
    for name, fn in readiness.replaced.items():
        setattr(compat, name, fn)
    readiness.replaced = {}
