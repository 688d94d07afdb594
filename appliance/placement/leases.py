"""Quota leases: small blobs draw their reservations from a larger one per backend.

A blob write reserves its stored size before it starts (DESIGN: the reservation is the
guard against two writers filling the same space). For a small blob that reservation
is a transaction of its own, the biggest share of the metadata work of a small file.
``QuotaLeases`` reserves ``lease_bytes`` at a time per backend instead (one row in
``reservations``, owner ``lease:<instance>``) and hands out parts of it in memory. The
store's guarantees do not change:

- a part is backed by bytes reserved in the store before the blob is written, so the
  store's ``used + reserved <= quota`` still holds whatever several instances do;
- the transaction that records the blob takes its part off the lease row and turns it
  into usage (``_settle``: take ``stored_size`` off the reservation, delete it once
  empty), exactly as it consumes a blob's own reservation;
- a part whose write failed goes back to the lease, or to the store once the lease is
  retired.

A lease serves for ``ttl`` seconds, then it is retired: what it has not handed out goes
back to the store; parts in flight keep the row alive until they settle. A lease that
cannot be had (the backend is nearly full) falls back to a reservation of the blob's
own for ``ttl`` seconds. Leases left by a crash are released by the janitor after
``STALE_AFTER`` (``release_stale_reservations`` with ``OWNER_PREFIX``), and on SQLite
(one process per file) when the pool opens.

The bytes a live lease has not handed out are this instance's own free space:
``idle(backend)`` lets the pool view count them as free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from appliance.ids import new_sortable_id
from appliance.meta.store import MetadataStore

log = logging.getLogger("cairn.leases")

LEASE_BYTES = 4 * 1024 * 1024
"""Bytes reserved per lease: 250 files of 16 KiB, at most this much held per backend."""
LARGEST_PART = 256 * 1024
"""Blobs up to this size draw on a lease; larger ones reserve their own (one
transaction is then small next to the write)."""
LEASE_TTL = 10.0
"""Seconds a lease hands out parts before it is retired."""
OWNER_PREFIX = "lease:"
STALE_AFTER = timedelta(hours=1)
"""A lease row this old belongs to a process that died: the janitor releases it."""


@dataclass
class _Lease:
    reservation_id: int
    backend: str
    available: int
    """Bytes not yet handed out."""
    expires: float
    timer: asyncio.TimerHandle | None = None
    """Retires the lease when its ``ttl`` is up."""
    retired: bool = False


class QuotaLeases:
    """Reservations for blob writes, from per-backend leases when the blob is small.

    ``lease_bytes`` 0 turns leases off (every blob reserves its own). Not thread-safe;
    one instance per event loop.
    """

    def __init__(
        self,
        store: MetadataStore,
        *,
        lease_bytes: int = LEASE_BYTES,
        largest_part: int = LARGEST_PART,
        ttl: float = LEASE_TTL,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._lease_bytes = lease_bytes
        self._largest = min(largest_part, lease_bytes)
        self._ttl = ttl
        self._monotonic = monotonic
        self._owner = f"{OWNER_PREFIX}{new_sortable_id()}"
        self._live: dict[str, _Lease] = {}
        self._by_id: dict[int, _Lease] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._no_lease_until: dict[str, float] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._closed = False

    def idle(self, backend: str) -> int:
        """Bytes ``backend``'s live lease holds and has not handed out."""
        lease = self._live.get(backend)
        return 0 if lease is None else lease.available

    async def reserve(self, backend: str, nbytes: int, *, owner: str) -> int | None:
        """Reserve ``nbytes`` on ``backend`` for a blob of version ``owner``; return the
        reservation id to record with the blob, or None when the quota has no room.

        A small blob gets a part of a lease (the id is the lease's); give it back with
        ``release`` if the write fails. Raises the store's errors (``NotFound`` for an
        unknown backend, ``StoreUnavailable``)."""
        if not self._leased(nbytes):
            return await self._own(backend, nbytes, owner)
        lease = self._usable(backend, nbytes)
        if lease is None:
            async with self._locks.setdefault(backend, asyncio.Lock()):
                lease = self._usable(backend, nbytes)
                if lease is None:
                    if self._monotonic() < self._no_lease_until.get(backend, 0.0):
                        return await self._own(backend, nbytes, owner)
                    lease = await self._new_lease(backend)
                    if lease is None or lease.available < nbytes:
                        return await self._own(backend, nbytes, owner)
        lease.available -= nbytes
        return lease.reservation_id

    async def release(self, backend: str, reservation_id: int, nbytes: int) -> None:
        """Give back the ``nbytes`` a failed blob write held (``reserve``'s id); to its
        live lease in memory, else to the store. Raises the store's errors."""
        lease = self._by_id.get(reservation_id)
        if lease is not None and not lease.retired:
            lease.available += nbytes
            return
        await self._store.release_reservation(reservation_id, backend=backend, nbytes=nbytes)

    async def retire_all(self) -> None:
        """Retire the live leases now (the next small write takes a new one); then the
        store's reserved bytes are those of writes in flight. Raises the store's errors."""
        for lease in list(self._live.values()):
            await self._retire(lease)

    async def close(self) -> None:
        """Retire every lease (what they did not hand out goes back to the store)."""
        self._closed = True
        for lease in list(self._live.values()):
            with contextlib.suppress(Exception):
                await self._retire(lease)
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    # -- internals ------------------------------------------------------------------
    def _leased(self, nbytes: int) -> bool:
        return not self._closed and 0 < nbytes <= self._largest

    def _usable(self, backend: str, nbytes: int) -> _Lease | None:
        lease = self._live.get(backend)
        if lease is None or lease.available < nbytes:
            return None
        if self._monotonic() >= lease.expires:
            self._start_retiring(lease)
            return None
        return lease

    async def _own(self, backend: str, nbytes: int, owner: str) -> int | None:
        reservation = await self._store.reserve(backend, nbytes, owner=owner)
        return None if reservation is None else reservation.reservation_id

    async def _new_lease(self, backend: str) -> _Lease | None:
        old = self._live.get(backend)
        if old is not None:
            await self._retire(old)
        reservation = await self._store.reserve(backend, self._lease_bytes, owner=self._owner)
        if reservation is None:  # nearly full: blobs reserve their own for a while
            self._no_lease_until[backend] = self._monotonic() + self._ttl
            return None
        lease = _Lease(
            reservation.reservation_id,
            backend,
            self._lease_bytes,
            self._monotonic() + self._ttl,
        )
        lease.timer = asyncio.get_running_loop().call_later(self._ttl, self._start_retiring, lease)
        self._live[backend] = lease
        self._by_id[lease.reservation_id] = lease
        return lease

    def _start_retiring(self, lease: _Lease) -> None:
        if lease.retired or self._live.get(lease.backend) is not lease:
            return
        task = asyncio.ensure_future(self._retire(lease))
        self._retiring.add(task)
        task.add_done_callback(self._retired)

    def _retired(self, task: asyncio.Task[None]) -> None:
        self._retiring.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not retire a quota lease (the janitor will): %s", task.exception())

    async def _retire(self, lease: _Lease) -> None:
        """Stop handing out parts of ``lease`` and give back what it did not hand out."""
        if lease.retired:
            return
        lease.retired = True
        if lease.timer is not None:
            lease.timer.cancel()
        if self._live.get(lease.backend) is lease:
            del self._live[lease.backend]
        self._by_id.pop(lease.reservation_id, None)
        unused, lease.available = lease.available, 0
        if unused:
            await self._store.release_reservation(
                lease.reservation_id, backend=lease.backend, nbytes=unused
            )
