"""A bounded thread pool for CPU-heavy steps (hashing, encryption) off the event loop.

hashlib and the AES-GCM primitives release the GIL on large buffers, so these threads
run in parallel with the loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class CpuPool:
    """Runs functions in a fixed number of threads. ``close`` waits for running ones."""

    def __init__(self, workers: int | None = None) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=workers or max(2, os.cpu_count() or 2), thread_name_prefix="cairn-cpu"
        )

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        if kwargs:
            return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))
        return await loop.run_in_executor(self._executor, fn, *args)

    async def run_handing_off(self, fn: Callable[..., T], *args: Any) -> T:
        """``run(fn, *args)``, but the worker drops its references to ``args`` before
        this returns (a finished work item otherwise keeps them a moment longer), so a
        buffer passed here can be recycled by reference count
        (``BufferPool.give_if_unshared``). ``fn`` must not return one of them."""
        box = list(args)

        def call() -> T:
            try:
                return fn(*box)
            finally:
                box.clear()

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
