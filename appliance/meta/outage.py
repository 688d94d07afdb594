"""A metadata store wrapper that keeps reads going while the database is unreachable.

The database circuit breaker (issue 7): every call goes to the wrapped store while it
answers. The results of the read calls a GET needs (credentials, buckets, current
versions, layouts, settings, the quota ledger) are also kept in a bounded LRU cache.
When a call raises ``StoreUnavailable`` the circuit opens for ``retry_seconds``: calls
then fail at once with ``StoreUnavailable`` (writes and listings become a clear 503
without waiting on a dead server) and the cached reads answer from the cache — the
last state this process saw. After ``retry_seconds`` the next call tries the database
again; the first success closes the circuit. Other errors pass through untouched.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from cachetools import LRUCache

from appliance.meta.errors import StoreUnavailable
from appliance.meta.store import MetadataStore

log = logging.getLogger("cairn.meta")

CACHED_READS = frozenset(
    {
        "get_credential",
        "get_bucket",
        "list_buckets",
        "get_current",
        "get_version",
        "get_layout",
        "get_setting",
        "get_space",
        "get_usage",
    }
)
"""Read methods whose last results are served while the database is unreachable."""

_MISSING = object()


class OutageTolerantStore:
    """``MetadataStore`` around another one; see the module docstring."""

    def __init__(
        self,
        inner: MetadataStore,
        *,
        entries: int = 10_000,
        retry_seconds: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self._cache: LRUCache[Hashable, Any] | None = LRUCache(entries) if entries else None
        self._retry = retry_seconds
        self._monotonic = monotonic
        self._open_until: float | None = None
        self.served_from_cache = 0

    @property
    def kind(self) -> str:
        return self.inner.kind

    @property
    def available(self) -> bool:
        """False while the circuit is open (the database failed recently)."""
        return self._open_until is None

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)
        if not callable(method) or name.startswith("_") or name in ("open", "close"):
            return method

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await self._call(name, method, args, kwargs)

        return call

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def _call(
        self,
        name: str,
        method: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        cached = name in CACHED_READS and self._cache is not None
        if self._open_until is not None and self._monotonic() < self._open_until:
            key: Hashable = _key(name, args, kwargs)
            return self._from_cache(key, cached, "the metadata store is unavailable", True)
        try:
            result = await method(*args, **kwargs)
        except StoreUnavailable as exc:
            if self._open_until is None:
                log.warning("metadata store unavailable, serving cached reads: %s", exc)
            self._open_until = self._monotonic() + self._retry
            return self._from_cache(_key(name, args, kwargs), cached, str(exc), exc.uncommitted)
        if self._open_until is not None:
            log.info("metadata store available again")
            self._open_until = None
        if cached and self._cache is not None:
            key = _key(name, args, kwargs)
            with contextlib.suppress(TypeError):  # unhashable arguments: not cached
                if result is None:  # absence is never served from memory (it may be stale)
                    self._cache.pop(key, None)
                else:
                    self._cache[key] = result
        return result

    def _from_cache(self, key: Hashable, cached: bool, reason: str, uncommitted: bool) -> Any:
        if cached and self._cache is not None:
            try:
                found = self._cache.get(key, _MISSING)
            except TypeError:
                found = _MISSING
            if found is not _MISSING:
                self.served_from_cache += 1
                return found
        raise StoreUnavailable(reason, uncommitted=uncommitted)


def _key(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
    """The cache key of a store call (built only when the cache is used)."""
    return (name, args, tuple(sorted(kwargs.items())) if kwargs else ())
