"""DeviceReadiness over a real pipe: the wait pyfuse3's workers do before each request."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator

import pytest

from frontends.fuse.readiness import DeviceReadiness, install, uninstall

pytestmark = pytest.mark.unit


class Closed(Exception):
    pass


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    yield r, w
    os.close(r)
    os.close(w)


async def _spin(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_wait_returns_when_readable_and_keeps_the_registration(
    pipe: tuple[int, int],
) -> None:
    r, w = pipe
    loop = asyncio.get_running_loop()
    readiness = DeviceReadiness(loop, Closed)

    async def worker() -> bytes:  # like pyfuse3's: the request is read in the same step
        await readiness.wait(r)
        return os.read(r, 10)

    for _ in range(3):
        waiter = asyncio.ensure_future(worker())
        await _spin(1)
        assert not waiter.done()
        os.write(w, b"x")
        assert await asyncio.wait_for(waiter, 2) == b"x"
        await _spin(1)
    # still registered after three requests in a row: nothing had to be added again
    assert loop.remove_reader(r) is True


async def test_readable_with_nobody_waiting_is_unregistered_not_spun(
    pipe: tuple[int, int],
) -> None:
    r, w = pipe
    loop = asyncio.get_running_loop()
    readiness = DeviceReadiness(loop, Closed)
    os.write(w, b"x")
    await asyncio.wait_for(readiness.wait(r), 2)
    await _spin()  # the byte is never read: the device stays readable
    assert loop.remove_reader(r) is False
    # and a later wait registers again and is answered
    await asyncio.wait_for(readiness.wait(r), 2)
    readiness.close()
    assert loop.remove_reader(r) is False


async def test_notify_closing_fails_the_waiter(pipe: tuple[int, int]) -> None:
    r, _ = pipe
    loop = asyncio.get_running_loop()
    readiness = DeviceReadiness(loop, Closed)
    waiter = asyncio.ensure_future(readiness.wait(r))
    await _spin(1)
    readiness.notify_closing(r)
    with pytest.raises(Closed):
        await asyncio.wait_for(waiter, 2)
    assert loop.remove_reader(r) is False


async def test_a_cancelled_wait_leaves_no_waiter(pipe: tuple[int, int]) -> None:
    r, w = pipe
    loop = asyncio.get_running_loop()
    readiness = DeviceReadiness(loop, Closed)
    waiter = asyncio.ensure_future(readiness.wait(r))
    await _spin(1)
    waiter.cancel()
    await _spin(1)
    os.write(w, b"x")
    await _spin()
    assert loop.remove_reader(r) is False  # readable, nobody waits: dropped


async def test_install_routes_pyfuse3s_functions_and_uninstall_restores_them() -> None:
    compat = pytest.importorskip("pyfuse3.asyncio")
    own_wait, own_notify = compat.wait_readable, compat.notify_closing
    readiness = install(compat, asyncio.get_running_loop())
    try:
        assert compat.wait_readable == readiness.wait
        assert compat.notify_closing == readiness.notify_closing
    finally:
        uninstall(compat, readiness)
    assert compat.wait_readable is own_wait
    assert compat.notify_closing is own_notify


async def test_a_stale_report_does_not_wake_a_waiter_that_came_back(
    pipe: tuple[int, int],
) -> None:
    """The worker reads its request and waits again within one loop iteration, while
    the readiness reported before the read is still queued: it must not be woken (pyfuse3
    would then block the loop reading an empty device)."""
    r, w = pipe
    readiness = DeviceReadiness(asyncio.get_running_loop(), Closed)
    got: list[bytes] = []

    async def worker() -> None:
        while True:
            await readiness.wait(r)
            got.append(os.read(r, 10))  # non-blocking: raises if woken for nothing

    task = asyncio.ensure_future(worker())
    await _spin(1)
    os.write(w, b"a")
    await _spin(10)
    assert got == [b"a"]
    assert not task.done()
    os.write(w, b"b")
    await _spin(10)
    assert got == [b"a", b"b"]
    assert not task.done()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
