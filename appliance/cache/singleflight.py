"""Single-flight: concurrent calls for one key share one run of the work.

``SingleFlight.run(key, fn)`` starts ``fn()`` as a task unless a call for ``key`` is
already running, in which case it waits for that one. Contracts:

- Errors are not remembered: a call that failed (or was cancelled) is forgotten at once,
  and the next ``run`` for the key starts afresh.
- Cancellation-safe: a cancelled waiter leaves; the shared task keeps running for the
  others and is cancelled only when its last waiter has left.
- Nothing is cached: once the task finished, the key is free again (caching the result
  is the caller's job, inside ``fn``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(slots=True)
class _Call(Generic[V]):
    task: asyncio.Future[V]
    waiters: int = 0


class SingleFlight(Generic[K, V]):
    """Shares one running ``fn()`` among concurrent callers of the same key."""

    def __init__(self) -> None:
        self._calls: dict[K, _Call[V]] = {}
        self.started = 0
        """Calls that started the work (the others joined one in flight)."""

    def __contains__(self, key: K) -> bool:
        return key in self._calls

    def __len__(self) -> int:
        return len(self._calls)

    async def run(self, key: K, fn: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """Await the shared result for ``key``; ``(result, joined)``, where ``joined`` is
        True when this caller waited for a call another caller had started.

        Raises whatever ``fn`` raised, to every waiter of that call.
        """
        call = self._calls.get(key)
        joined = call is not None and not _failed(call.task)
        if call is None or not joined:
            call = _Call(asyncio.ensure_future(fn()))
            self._calls[key] = call
            self.started += 1
            call.task.add_done_callback(functools.partial(self._finished, key))
        call.waiters += 1
        try:
            return await asyncio.shield(call.task), joined
        finally:
            call.waiters -= 1
            if call.waiters == 0 and not call.task.done():
                # the last waiter left (cancelled): nobody wants the result any more
                self._forget(key, call.task)
                call.task.cancel()

    def _finished(self, key: K, task: asyncio.Future[V]) -> None:
        if not task.cancelled():
            task.exception()  # mark retrieved: waiters (if any) got it through shield
        self._forget(key, task)

    def _forget(self, key: K, task: asyncio.Future[V]) -> None:
        current = self._calls.get(key)
        if current is not None and current.task is task:
            del self._calls[key]


def _failed(task: asyncio.Future[Any]) -> bool:
    """True for a task that is done without a result (error or cancelled)."""
    if not task.done():
        return False
    if task.cancelled():
        return True
    with contextlib.suppress(BaseException):
        return task.exception() is not None
    return True
