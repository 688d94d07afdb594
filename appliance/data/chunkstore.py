"""The chunk store: puts chunk blobs on backends and reads them back (DESIGN 3, 4, 6).

Writes reserve quota before each blob write and write the write quorum's replicas at
once, on distinct backends and failure domains, trying the Router's next candidates
when one fails, so a full or failing backend sends the chunk elsewhere. Replicas beyond
the quorum are owed: the services queue them for the replication worker, which uses
``replicate``. Reads try replicas in the Router's order, verify what they can (length
always; SHA-256 when the whole chunk is read), and move on to the next replica after an
error, a per-backend timeout or a checksum mismatch; a replica found corrupt or missing
is queued for repair. Every read and write result feeds that backend's circuit breaker.
Encryption and caching wrap this class and keep its interface.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from appliance.data.blobformat import (
    ChunkHeader,
    Manifest,
    encode_chunk_header,
    encode_manifest,
    object_prefix,
)
from appliance.data.buffers import BufferPool, ChunkPayload, HeadroomBuffer, payload_view
from appliance.data.cpu import CpuPool
from appliance.errors import BackendsUnavailable, DataCorrupted, NoCapacity
from appliance.meta.errors import MetaError
from appliance.meta.models import Chunk, Location, NewChunk
from appliance.meta.store import REPLICATE_QUEUE
from appliance.placement.pool import PoolState
from appliance.placement.replication import ReplicationPolicy
from appliance.placement.router import cap_problem
from backends.base import BlobStream, ByteRange
from backends.errors import BackendError, BlobNotFound

log = logging.getLogger("cairn.chunks")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class WrittenChunk:
    """A chunk now on the write quorum's backends; each location with its reservation
    id. ``wanted`` is the replication factor: the services queue the missing replicas."""

    chunk: NewChunk
    locations: tuple[tuple[Location, int | None], ...]
    wanted: int = 1

    @property
    def missing(self) -> int:
        """Replicas still owed (made by the replication worker)."""
        return max(0, self.wanted - len(self.locations))


class ChunkStorage(Protocol):
    """What services use to store chunks: ``ChunkStore`` and the wrappers around it
    (encryption, cache) all have this interface."""

    def blob_prefix(self, bucket: str, key: str) -> str: ...

    async def write_chunk(
        self,
        header: ChunkHeader,
        payload: ChunkPayload,
        blob_key: str,
        *,
        bucket: str | None = None,
    ) -> WrittenChunk: ...

    async def write_manifest(
        self, manifest: Manifest, blob_key: str, chunk_id: str, *, bucket: str | None = None
    ) -> WrittenChunk: ...

    async def undo(self, placed: Sequence[tuple[Location, int | None]]) -> None: ...

    async def delete_blob(self, backend: str, blob_key: str) -> bool: ...

    async def read(
        self, chunk: Chunk, locations: Sequence[Location], start: int, end: int
    ) -> bytes | bytearray: ...

    async def replicate(
        self,
        chunk: Chunk,
        sources: Sequence[Location],
        count: int,
        *,
        keep: Sequence[str] = (),
        rewrite: str | None = None,
    ) -> tuple[tuple[Location, int | None], ...]: ...


class ChunkStore:
    """Writes and reads chunk blobs through the pool's backends."""

    def __init__(
        self,
        pool: PoolState,
        cpu: CpuPool,
        *,
        replicas: int = 1,
        policy: ReplicationPolicy | None = None,
        buffers: BufferPool | None = None,
    ) -> None:
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        self._pool = pool
        self._cpu = cpu
        self.buffers = buffers or BufferPool(0)
        """Reusable chunk-sized buffers, shared with the layers above."""
        self.policy = policy or ReplicationPolicy(replicas, replicas)

    @property
    def replicas(self) -> int:
        """The pool's default replication factor."""
        return self.policy.factor

    def blob_prefix(self, bucket: str, key: str) -> str:
        """The blob prefix of an object (``blobformat.object_prefix``, names in clear)."""
        return object_prefix(bucket, key)

    async def write_chunk(
        self,
        header: ChunkHeader,
        payload: ChunkPayload,
        blob_key: str,
        *,
        bucket: str | None = None,
    ) -> WrittenChunk:
        """Store one chunk (header + payload) as ``blob_key`` on the write quorum of
        ``bucket``'s replicas (distinct backends and groups).

        Raises ``NoCapacity`` when no backend has room or cap left (naming the caps in
        the way), and ``BackendsUnavailable`` when the candidates with room all failed.
        Nothing is left reserved or written when it raises.
        """
        head = encode_chunk_header(header)
        owned: bytearray | None = None
        framed = payload.framed(head) if isinstance(payload, HeadroomBuffer) else None
        blob: bytearray | memoryview
        if framed is not None:
            blob = framed
        else:  # header and data copied together into a reused buffer
            data = payload_view(payload)
            blob = owned = self.buffers.take(len(head) + len(data))
            blob[: len(head)] = head
            blob[len(head) :] = data
        locations = await self.place(
            blob, blob_key, header.version_id, header.chunk_id, bucket=bucket
        )
        if owned is not None:
            self.buffers.give(owned)  # written: no backend keeps a reference
        chunk = NewChunk(
            chunk_id=header.chunk_id,
            size=header.size,
            sha256=header.sha256,
            stored_size=len(blob),
            wrapped_dek=header.wrapped_dek,
            key_id=header.key_id,
        )
        return WrittenChunk(chunk, locations, self.policy.factor_for(bucket))

    async def write_manifest(
        self, manifest: Manifest, blob_key: str, chunk_id: str, *, bucket: str | None = None
    ) -> WrittenChunk:
        """Store a version's manifest blob; it is recorded as a zero-length chunk."""
        blob = encode_manifest(manifest)
        locations = await self.place(blob, blob_key, manifest.version_id, chunk_id, bucket=bucket)
        chunk = NewChunk(chunk_id, 0, hashlib.sha256(blob).digest(), len(blob))
        return WrittenChunk(chunk, locations, self.policy.factor_for(bucket))

    async def place(
        self,
        blob: bytes | bytearray | memoryview,
        blob_key: str,
        owner: str,
        chunk_id: str,
        *,
        bucket: str | None = None,
        count: int | None = None,
        at_least: int | None = None,
        exclude: Sequence[str] = (),
        exclude_domains: Sequence[str] = (),
    ) -> tuple[tuple[Location, int | None], ...]:
        """Write a finished blob on ``count`` backends (default: ``bucket``'s write
        quorum) at once, reserving quota for ``owner`` (a version id) first; backends in
        ``exclude`` and failure domains in ``exclude_domains`` are skipped, and no two
        replicas share a domain. Returns once ``count`` are written, or fewer but at
        least ``at_least`` (default ``count``) when no more backend can take it.

        Errors as ``write_chunk``; nothing is left on failure.
        """
        want = self.policy.quorum_for(bucket) if count is None else count
        need_min = want if at_least is None else at_least
        stored = len(blob)
        placed: list[tuple[Location, int | None]] = []
        tried: set[str] = set(exclude)
        domains: set[str] = set(exclude_domains)
        failures: list[str] = []
        try:
            while len(placed) < want:
                view = await self._pool.view()
                by_name = view.by_name()
                candidates = self._pool.router.write_candidates(
                    view, stored, exclude=tried, exclude_domains=domains
                )
                batch: list[str] = []
                batch_domains: set[str] = set()
                for name in candidates:
                    domain = by_name[name].domain
                    if domain not in batch_domains:
                        batch.append(name)
                        batch_domains.add(domain)
                    if len(batch) == want - len(placed):
                        break
                if not batch:
                    break
                reserved: list[tuple[str, int]] = []
                for name in batch:
                    tried.add(name)
                    reservation_id = await self._pool.leases.reserve(name, stored, owner=owner)
                    if reservation_id is None:
                        self._pool.invalidate()
                        continue
                    self._pool.account(name, stored)
                    reserved.append((name, reservation_id))
                results = await asyncio.gather(
                    *(self._put(name, blob_key, blob) for name, _ in reserved),
                    return_exceptions=True,
                )
                unexpected: BaseException | None = None
                for (name, reservation_id), result in zip(reserved, results, strict=True):
                    if isinstance(result, BaseException):
                        await self._pool.leases.release(name, reservation_id, stored)
                        self._pool.account(name, -stored)
                        if not isinstance(result, BackendError):
                            unexpected = unexpected or result
                            continue
                        failures.append(f"{name}: {result}")
                        log.warning("chunk write to %s failed, trying another: %s", name, result)
                        continue
                    domains.add(by_name[name].domain)
                    placed.append((Location(chunk_id, name, blob_key, stored), reservation_id))
                if unexpected is not None:
                    raise unexpected  # after the batch is accounted for: undone below
        except BaseException:
            await self.undo(placed)
            raise
        if len(placed) < need_min:
            await self.undo(placed)
            if failures:
                raise BackendsUnavailable("could not store a chunk: " + "; ".join(failures))
            raise NoCapacity(await self._no_room(stored, want, len(placed)))
        return tuple(placed)

    async def _put(self, name: str, blob_key: str, blob: bytes | bytearray | memoryview) -> None:
        try:
            await self._pool.backend(name).put(blob_key, blob, size=len(blob))
        except BackendError as exc:
            self._pool.report(name, exc)
            raise
        self._pool.report(name, None)

    async def _no_room(self, nbytes: int, want: int, got: int) -> str:
        """Why a write of ``nbytes`` found too few backends, naming caps and circuits."""
        view = await self._pool.view()
        reasons = []
        for b in view.backends:
            cap = cap_problem(b, nbytes, write=True)
            if cap is not None:
                reasons.append(cap)
            elif b.circuit_open:
                reasons.append(f"{b.name}: circuit open (failing)")
            elif b.free_bytes is not None and b.free_bytes < nbytes:
                reasons.append(f"{b.name}: full")
            elif not b.can_take(nbytes):
                reasons.append(f"{b.name}: {b.state.value}")
        detail = "; ".join(reasons) or "every backend is full, read-only or past a monthly cap"
        short = f" ({got} of {want} replicas placed)" if want > 1 else ""
        return f"no backend has room for {nbytes} more bytes{short}: {detail}"

    async def undo(self, placed: Sequence[tuple[Location, int | None]]) -> None:
        """Delete blobs that were written but will not be recorded; release their quota.

        Raises the store's errors (after every blob is deleted); a reservation it could
        not release is left to the janitor."""
        for location, _ in placed:
            await self.delete_blob(location.backend, location.blob_key)
        failed: Exception | None = None
        for location, reservation_id in placed:
            if reservation_id is None:
                continue
            try:
                await self._pool.leases.release(
                    location.backend, reservation_id, location.stored_size
                )
            except Exception as exc:
                failed = failed or exc
        if failed is not None:
            raise failed

    async def _digest(self, data: bytes | bytearray | memoryview) -> bytes:
        if len(data) < INLINE_HASH_LIMIT:
            return _sha256(data)
        return await self._cpu.run_handing_off(_sha256, data)

    async def delete_blob(self, backend: str, blob_key: str) -> bool:
        """Best-effort delete; returns False (and logs) when the backend refused.

        Deletes do not feed the circuit breaker: a provider refusing deletes (a policy,
        a lock) may still serve reads and writes, and the GC retries them anyway."""
        try:
            await self._pool.backend(backend).delete(blob_key)
        except BackendError as exc:
            log.warning("could not delete blob %s on %s: %s", blob_key, backend, exc)
            return False
        return True

    async def read(
        self, chunk: Chunk, locations: Sequence[Location], start: int, end: int
    ) -> bytes | bytearray:
        """Plaintext bytes ``[start, end)`` of ``chunk``, from the first replica that works.

        Raises ``DataCorrupted`` when every replica returned wrong bytes and
        ``BackendsUnavailable`` when none could be read.
        """
        if not 0 <= start <= end <= chunk.size:
            raise ValueError(f"range [{start}, {end}) outside chunk of {chunk.size} bytes")
        if start == end:
            return b""
        header_len = chunk.stored_size - chunk.size
        whole = start == 0 and end == chunk.size

        async def verify(data: bytes | bytearray, backend: str) -> bytes | bytearray:
            if whole and await self._digest(data) != chunk.sha256:
                log.error("chunk %s on %s failed verification", chunk.chunk_id, backend)
                raise DataCorrupted("checksum mismatch")
            return data

        return await self.read_stored(
            chunk, locations, header_len + start, header_len + end, verify
        )

    async def verify_blob(self, chunk: Chunk, blob: bytes | bytearray, backend: str) -> None:
        """Check a whole stored blob of an unencrypted chunk or of a manifest against the
        chunk's SHA-256. Raises ``DataCorrupted``."""
        if chunk.size == 0:  # a manifest: the digest is of the whole blob
            digest = await self._digest(blob)
        else:
            with memoryview(blob) as view:
                digest = await self._digest(view[chunk.stored_size - chunk.size :])
        if digest != chunk.sha256:
            log.error("chunk %s on %s failed verification", chunk.chunk_id, backend)
            raise DataCorrupted("checksum mismatch")

    async def replicate(
        self,
        chunk: Chunk,
        sources: Sequence[Location],
        count: int,
        *,
        keep: Sequence[str] = (),
        rewrite: str | None = None,
        check: Callable[[Chunk, bytes | bytearray, str], Awaitable[None]] | None = None,
    ) -> tuple[tuple[Location, int | None], ...]:
        """Copy ``chunk``'s blob from a verified replica in ``sources`` to up to ``count``
        more backends, none holding a replica in ``sources`` (except ``rewrite``, whose bad
        or missing blob may be written again, same key, same bytes) nor sharing a failure
        domain with the backends in ``keep``. Returns the new locations (at least one)
        with their reservations, for the caller to record.

        ``check`` verifies a whole stored blob (default ``verify_blob``; the encrypting
        wrapper authenticates instead). Raises ``DataCorrupted`` or
        ``BackendsUnavailable`` when no source gave good bytes, ``NoCapacity`` when no
        backend can take a copy.
        """
        verify = check or self.verify_blob

        async def checked(blob: bytes | bytearray, backend: str) -> bytes | bytearray:
            await verify(chunk, blob, backend)
            return blob

        blob = await self.read_stored(chunk, sources, 0, chunk.stored_size, checked)
        view = (await self._pool.view()).by_name()
        return await self.place(
            blob,
            sources[0].blob_key,
            f"replica:{chunk.chunk_id}",
            chunk.chunk_id,
            count=count,
            at_least=1,
            exclude=[loc.backend for loc in sources if loc.backend != rewrite],
            exclude_domains=[view[name].domain for name in keep if name in view],
        )

    async def read_stored(
        self,
        chunk: Chunk,
        locations: Sequence[Location],
        start: int,
        end: int,
        check: Callable[[bytes | bytearray, str], Awaitable[T]],
    ) -> T:
        """Stored blob bytes ``[start, end)`` (header included in the offsets) of
        ``chunk``, passed through ``check(data, backend)`` — one ranged GET per replica
        tried, replicas in the Router's read order.

        A replica on a backend past a monthly cap is not asked (the error names the cap
        when no other replica could serve). A replica that fails, is short, or for which
        ``check`` raises ``DataCorrupted`` is skipped; a missing or corrupt one is
        queued for repair. One that takes longer than its backend's ``replica_timeout``
        is put back at the end of the line and tried once more without a limit when
        every other replica has failed. With hedged reads on, a replica slower than its
        backend's recent p95 gets company: the next replica is asked too, the first good
        answer wins and the other request is cancelled.
        Raises ``DataCorrupted`` when every replica returned wrong bytes and
        ``BackendsUnavailable`` when none could be read.
        """
        view = await self._pool.view()
        by_backend = {loc.backend: loc for loc in locations}
        order = self._pool.router.read_order(view, list(by_backend), end - start)
        problems: list[str] = []
        corrupt = 0
        known = view.by_name()
        capped = {
            name: problem
            for name in order
            if name in known
            and (problem := cap_problem(known[name], end - start, write=False)) is not None
        }
        problems += capped.values()  # a backend past a monthly cap is not asked
        attempts: list[tuple[str, bool]] = [(name, True) for name in order if name not in capped]
        while attempts:
            name, limited = attempts.pop(0)
            racers = {self._start(name, by_backend, start, end, limited and bool(attempts)): name}
            delay = self._pool.hedge_delay(name) if attempts else None
            if delay is not None:
                done, _ = await asyncio.wait(racers, timeout=delay)
                if not done:  # slower than usual: ask the next replica too (hedged read)
                    other, other_limited = attempts.pop(0)
                    hedge = self._start(
                        other, by_backend, start, end, other_limited and bool(attempts)
                    )
                    racers[hedge] = other
            winner, data, failures, abandoned = await _first_success(racers)
            attempts += [(n, False) for n in abandoned]  # lost the race: kept as a last resort
            for failed, exc in failures:
                if isinstance(exc, TimeoutError):
                    log.warning(
                        "chunk %s: %s timed out, trying the next replica", chunk.chunk_id, failed
                    )
                    attempts.append((failed, False))  # once more without a limit, if all fail
                    continue
                problems.append(f"{failed}: {exc}")
                if isinstance(exc, BlobNotFound):
                    await self._queue_repair(chunk.chunk_id, failed)
            if winner is None:
                continue
            if len(data) != end - start:
                corrupt += 1
                problems.append(f"{winner}: short read ({len(data)} of {end - start} bytes)")
                await self._queue_repair(chunk.chunk_id, winner)
                continue
            try:
                return await check(data, winner)
            except DataCorrupted as exc:
                corrupt += 1
                problems.append(f"{winner}: {exc}")
                await self._queue_repair(chunk.chunk_id, winner)
                continue
        detail = "; ".join(problems) or "no replica recorded"
        if corrupt and corrupt == len(problems):
            raise DataCorrupted(f"chunk {chunk.chunk_id}: {detail}")
        raise BackendsUnavailable(f"chunk {chunk.chunk_id}: {detail}")

    def _start(
        self, name: str, by_backend: Mapping[str, Location], start: int, end: int, limited: bool
    ) -> asyncio.Task[bytes | bytearray]:
        """Start fetching ``[start, end)`` of the replica on ``name`` (with its
        ``replica_timeout`` when ``limited``)."""
        timeout = self._pool.replica_timeout(name) if limited else None
        return asyncio.ensure_future(
            self._fetch(name, by_backend[name].blob_key, start, end, timeout)
        )

    async def _fetch(
        self, name: str, blob_key: str, start: int, end: int, limit: float | None
    ) -> bytes | bytearray:
        """One ranged GET; its result feeds the circuit breaker and the latency figures.
        Raises ``TimeoutError`` after ``limit`` seconds, ``BackendError``."""
        timeout = limit
        began = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                data = await self._get(name, blob_key, start, end)
        except TimeoutError:
            self._pool.report(name, TimeoutError(f"no answer within {timeout} s"))
            raise TimeoutError(f"timed out after {timeout} s") from None
        except BlobNotFound:
            self._pool.report(name, None)
            raise
        except BackendError as exc:
            self._pool.report(name, exc)
            raise
        except KeyError as exc:  # a location on a backend no longer configured
            raise BackendError(f"backend {name!r} is not configured") from exc
        self._pool.report(name, None)
        self._pool.observe(name, time.monotonic() - began)
        return data

    async def _get(self, name: str, blob_key: str, start: int, end: int) -> bytes | bytearray:
        stream = await self._pool.backend(name).get(blob_key, ByteRange(start, end))
        try:
            return await _collect(stream, end - start, self.buffers)
        finally:
            await stream.aclose()

    async def _queue_repair(self, chunk_id: str, backend: str) -> None:
        """Queue the repair of a bad replica; a store that is away only costs a log line
        (the replication scan finds the replica later)."""
        try:
            await self._pool.store.enqueue(
                REPLICATE_QUEUE,
                {"chunk_id": chunk_id, "bad": backend},
                key=f"chunk:{chunk_id}:{backend}",
            )
        except MetaError as exc:
            log.warning("could not queue the repair of chunk %s on %s: %s", chunk_id, backend, exc)


async def _first_success(
    racers: dict[asyncio.Task[bytes | bytearray], str],
) -> tuple[str | None, bytes | bytearray, list[tuple[str, BaseException]], list[str]]:
    """Wait for the first racer that succeeds; cancel the others.

    Returns (winner or None, its data, the failures seen as (backend, error), the
    backends abandoned still running). Errors other than ``BackendError`` and
    ``TimeoutError`` propagate (after cancelling every racer).
    """
    failures: list[tuple[str, BaseException]] = []
    pending = set(racers)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is None:
                    return racers[task], task.result(), failures, [racers[t] for t in pending]
                if not isinstance(exc, BackendError | TimeoutError):
                    raise exc
                failures.append((racers[task], exc))
        return None, b"", failures, []
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


INLINE_HASH_LIMIT = 256 * 1024
"""Chunks smaller than this are verified on the loop: cheaper than a thread hop."""


async def _collect(stream: BlobStream, expected: int, buffers: BufferPool) -> bytes | bytearray:
    """Read a stream into one buffer of ``expected`` bytes (no list of pieces, no join;
    a reused buffer from ``buffers`` when it is large); a stream longer than expected is
    cut, a shorter one returns what it had."""
    pieces = aiter(stream)
    first = await anext(pieces, b"")
    if len(first) >= expected:  # the whole range in one piece: keep it, no copy
        return first[:expected] if len(first) > expected else first
    buffer = buffers.take(expected)
    view = memoryview(buffer)
    view[: len(first)] = first
    filled = len(first)
    async for piece in pieces:
        take = min(len(piece), expected - filled)
        view[filled : filled + take] = piece if take == len(piece) else piece[:take]
        filled += take
        if filled == expected:
            break
    view.release()
    if filled < expected:
        del buffer[filled:]
    return buffer


def _sha256(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()
