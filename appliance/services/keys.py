"""KeyService: master key rotation and encryption conversion jobs (DESIGN section 4).

Three jobs, each resumable, with progress persisted in the metadata store (setting
``keyjob:<job>``, JSON) so a restart, a crash or ``cairn admin keys ...`` run again
continues where the last run stopped:

- ``rotate``: re-wrap every chunk's data key under the current master key, touching
  chunk rows only (never blob data). Scans chunks whose key id is not the current one in
  chunk id order; each batch is written in one transaction with compare-and-set on the
  old key id, so it is idempotent and safe beside concurrent writes.
- ``encrypt`` (``encrypt-existing``): rewrite every object of the buckets the policy
  encrypts that still has unencrypted chunks; ``decrypt`` (``decrypt-existing``): the
  reverse for buckets the policy does not encrypt. Rewrites go through
  ``ObjectService.rewrite_object`` (streamed, same ETag and metadata, aborted if the
  object changes meanwhile). Before each object the job checks the pool has room for
  another copy of it; when it does not (or a write hits ``NoCapacity``) the job stops
  in state ``paused`` with the reason, and the old copies' space comes back through GC.

One runner per job at a time (a store lock); a second start raises ``JobRunning``.
Every method raises ``KeyUnavailable`` when a needed master key cannot be used.

Two ways to run a job: await ``rotate()`` / ``encrypt_existing()`` /
``decrypt_existing()`` (the CLI), or ``start(job)`` to run it in the background of this
process and poll ``progress(job)`` / ``status()``; ``stop(job)`` cancels it (state
``failed``, ``cancelled``; resumable). The admin API uses the latter.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from appliance.clock import utcnow
from appliance.crypto.store import EncryptingChunkStore
from appliance.errors import CairnError, KeyUnavailable, NoCapacity
from appliance.meta.models import KeyUpdate, WrappedKey
from appliance.meta.store import MetadataStore
from appliance.services.objects import ObjectHandle, ObjectService

log = logging.getLogger("cairn.keys")

SETTING_PREFIX = "keyjob:"


class JobRunning(CairnError):
    """The job is already running (in this or another instance)."""


class Job(enum.StrEnum):
    ROTATE = "rotate"
    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"


class JobState(enum.StrEnum):
    RUNNING = "running"
    DONE = "done"
    PAUSED = "paused"
    """Stopped for want of room; resume after GC or adding capacity."""
    FAILED = "failed"
    """Stopped by an error (a key or backend unavailable, a crash); resume to continue."""


@dataclass(frozen=True, slots=True)
class JobProgress:
    """A job's persisted progress. ``total`` and ``done`` count chunks (rotate) or
    objects scanned (conversions); ``changed`` counts chunks re-wrapped or objects
    rewritten; ``cursor`` is where a resumed run continues."""

    job: Job
    state: JobState
    target: str
    total: int = 0
    done: int = 0
    changed: int = 0
    bytes_rewritten: int = 0
    cursor: str = ""
    error: str | None = None
    started_at: str = field(default_factory=lambda: utcnow().isoformat())
    updated_at: str = field(default_factory=lambda: utcnow().isoformat())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> JobProgress:
        """Parse saved progress; fields this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in raw.items() if k in known}
        return cls(**{**kept, "job": Job(raw["job"]), "state": JobState(raw["state"])})


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """What the pool's encryption looks like now."""

    current_key_id: str | None
    configured_key_ids: tuple[str, ...]
    chunks_by_key: dict[str, int]
    """Live chunks per master key id; ``"none"`` counts unencrypted chunks."""
    jobs: dict[str, JobProgress]


class KeyService:
    """Rotation and conversion jobs over the store, the encrypting chunk store and the
    object service (see the module docstring)."""

    def __init__(
        self,
        store: MetadataStore,
        chunks: EncryptingChunkStore,
        objects: ObjectService,
        *,
        batch: int = 200,
        concurrency: int = 8,
        room_margin: float = 1.1,
    ) -> None:
        self._store = store
        self._chunks = chunks
        self._objects = objects
        self._batch = batch
        self._concurrency = max(1, concurrency)
        self._margin = room_margin
        self._tasks: dict[Job, asyncio.Task[JobProgress]] = {}

    # -- background runs -------------------------------------------------------------
    async def start(self, job: Job, *, new_vault_version: bool = False) -> JobProgress:
        """Start (or resume) ``job`` in the background; returns its progress once it
        has begun. Raises ``JobRunning`` if it is running here or elsewhere, and the
        job's own errors when it fails at once (e.g. ``KeyUnavailable``)."""
        running = self._tasks.get(job)
        if running is not None and not running.done():
            raise JobRunning(f"the {job.value} job is already running")
        began: asyncio.Future[JobProgress] = asyncio.get_running_loop().create_future()

        def report(progress: JobProgress) -> None:
            if not began.done():
                began.set_result(progress)

        if job is Job.ROTATE:
            work = self.rotate(new_vault_version=new_vault_version, on_progress=report)
        else:
            work = self._convert(job, report)
        task = asyncio.ensure_future(work)
        self._tasks[job] = task

        def finished(done: asyncio.Task[JobProgress]) -> None:
            if not began.done():
                if done.cancelled():
                    began.cancel()
                elif done.exception() is not None:
                    began.set_exception(done.exception())  # type: ignore[arg-type]
                else:
                    began.set_result(done.result())
            elif not done.cancelled() and done.exception() is not None:
                log.error("%s job failed: %s", job.value, done.exception())

        task.add_done_callback(finished)
        return await began

    def running(self, job: Job) -> bool:
        """True while a background run of ``job`` started here is going on."""
        task = self._tasks.get(job)
        return task is not None and not task.done()

    async def stop(self, job: Job) -> JobProgress | None:
        """Cancel a background run started here; returns the saved progress."""
        task = self._tasks.get(job)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        return await self.progress(job)

    async def wait(self, job: Job) -> JobProgress | None:
        """Wait for a background run started here to end; returns the saved progress."""
        task = self._tasks.get(job)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        return await self.progress(job)

    # -- status ----------------------------------------------------------------------
    async def progress(self, job: Job) -> JobProgress | None:
        raw = await self._store.get_setting(SETTING_PREFIX + job.value)
        return None if raw is None else JobProgress.from_json(json.loads(raw))

    async def _save(self, progress: JobProgress) -> JobProgress:
        progress = replace(progress, updated_at=utcnow().isoformat())
        await self._store.set_setting(
            SETTING_PREFIX + progress.job.value, json.dumps(progress.to_json())
        )
        return progress

    async def _fail(self, job: Job, started: JobProgress, exc: BaseException) -> None:
        """Mark the job failed, keeping the progress its last batch saved."""
        latest = await self.progress(job) or started
        if isinstance(exc, asyncio.CancelledError):
            reason = "cancelled"
        else:
            reason = str(exc) or type(exc).__name__
        await self._save(replace(latest, state=JobState.FAILED, error=reason))

    async def status(self) -> KeyStatus:
        ring = self._chunks.keys
        counts = await self._store.count_chunks_by_key()
        jobs = {}
        for job in Job:
            found = await self.progress(job)
            if found is not None:
                jobs[job.value] = found
        return KeyStatus(
            current_key_id=ring.current_id if ring is not None else None,
            configured_key_ids=tuple(ring.key_ids()) if ring is not None else (),
            chunks_by_key={(k if k is not None else "none"): n for k, n in counts.items()},
            jobs=jobs,
        )

    # -- rotation --------------------------------------------------------------------
    async def rotate(
        self,
        *,
        new_vault_version: bool = False,
        on_progress: Callable[[JobProgress], None] | None = None,
    ) -> JobProgress:
        """Re-wrap every data key not under the current master key (resuming an
        unfinished rotation to the same key). With ``new_vault_version`` a Vault current
        key first gets a new version. Returns the final progress (state ``done``);
        on an error saves state ``failed`` and raises it."""
        ring = self._chunks.keys
        if ring is None:
            raise KeyUnavailable("no master key is configured (encryption.key)")
        lock = await self._store.try_lock("keyjob:rotate")
        if lock is None:
            raise JobRunning("a key rotation is already running")
        try:
            if new_vault_version:
                await ring.rotate_current()
            target = ring.current_id
            previous = await self.progress(Job.ROTATE)
            if (
                previous is not None
                and previous.state != JobState.DONE
                and (previous.target == target)
            ):
                progress = replace(previous, state=JobState.RUNNING, error=None)
            else:
                counts = await self._store.count_chunks_by_key()
                total = sum(n for k, n in counts.items() if k is not None and k != target)
                progress = JobProgress(Job.ROTATE, JobState.RUNNING, target, total=total)
            progress = await self._save(progress)
            try:
                return await self._rotate_batches(progress, on_progress)
            except BaseException as exc:
                await asyncio.shield(self._fail(Job.ROTATE, progress, exc))
                raise
        finally:
            await lock.release()

    async def _rotate_batches(
        self, progress: JobProgress, on_progress: Callable[[JobProgress], None] | None
    ) -> JobProgress:
        ring = self._chunks.keys
        assert ring is not None
        target = progress.target
        cursor = progress.cursor
        rescanned = False
        while True:
            batch = await self._store.list_wrapped_keys(
                not_key_id=target, after=cursor, limit=self._batch
            )
            if not batch:
                if cursor and not rescanned:
                    # one pass from the start catches rows written by an instance that
                    # still had the old key as current while this scan went by
                    cursor, rescanned = "", True
                    continue
                progress = await self._save(
                    replace(progress, state=JobState.DONE, total=max(progress.total, progress.done))
                )
                if on_progress is not None:
                    on_progress(progress)
                log.info("key rotation to %s done: %d data keys re-wrapped", target, progress.done)
                return progress
            updates = await self._rewrap_all(batch)
            changed = await self._store.set_wrapped_keys(updates)
            cursor = batch[-1].chunk_id
            progress = await self._save(
                replace(
                    progress,
                    done=progress.done + len(batch),
                    changed=progress.changed + changed,
                    cursor=cursor,
                )
            )
            if on_progress is not None:
                on_progress(progress)

    async def _rewrap_all(self, batch: Sequence[WrappedKey]) -> list[KeyUpdate]:
        ring = self._chunks.keys
        assert ring is not None
        rewrapped = await ring.rewrap_many(
            [(item.wrapped_dek, item.key_id) for item in batch], concurrency=self._concurrency
        )
        return [
            KeyUpdate(item.chunk_id, item.key_id, wrapped, key_id)
            for item, (wrapped, key_id) in zip(batch, rewrapped, strict=True)
        ]

    # -- conversion ------------------------------------------------------------------
    async def encrypt_existing(
        self, *, on_progress: Callable[[JobProgress], None] | None = None
    ) -> JobProgress:
        """Rewrite unencrypted objects of the buckets the policy encrypts."""
        return await self._convert(Job.ENCRYPT, on_progress)

    async def decrypt_existing(
        self, *, on_progress: Callable[[JobProgress], None] | None = None
    ) -> JobProgress:
        """Rewrite encrypted objects of the buckets the policy does not encrypt."""
        return await self._convert(Job.DECRYPT, on_progress)

    def _buckets_for(self, job: Job, names: Sequence[str]) -> list[str]:
        want = job is Job.ENCRYPT
        return sorted(n for n in names if self._chunks.policy.encrypts(n) == want)

    async def _convert(
        self, job: Job, on_progress: Callable[[JobProgress], None] | None
    ) -> JobProgress:
        lock = await self._store.try_lock(f"keyjob:{job.value}")
        if lock is None:
            raise JobRunning(f"the {job.value} job is already running")
        try:
            buckets = self._buckets_for(job, [b.name for b in await self._store.list_buckets()])
            target = ",".join(buckets)
            previous = await self.progress(job)
            if (
                previous is not None
                and previous.state != JobState.DONE
                and (previous.target == target)
            ):
                progress = replace(previous, state=JobState.RUNNING, error=None)
            else:
                usage = await self._store.all_bucket_usage()
                total = sum(usage.get(name, (0, 0))[0] for name in buckets)
                progress = JobProgress(job, JobState.RUNNING, target, total=total)
            progress = await self._save(progress)
            try:
                return await self._convert_objects(job, buckets, progress, on_progress)
            except BaseException as exc:
                await asyncio.shield(self._fail(job, progress, exc))
                raise
        finally:
            await lock.release()

    def _needs_rewrite(self, job: Job, handle: ObjectHandle) -> bool:
        want = job is Job.ENCRYPT
        return any((p.chunk.wrapped_dek is not None) != want for p in handle.layout)

    async def _room_for(self, nbytes: int) -> str | None:
        """None when the pool can take ``nbytes`` more (per replica); else why not."""
        spaces = await self._store.get_space()
        if any(space.free_bytes is None for space in spaces):
            return None
        free = sum(max(0, space.free_bytes or 0) for space in spaces)
        replicas = self._chunks.inner.replicas
        need = int(nbytes * replicas * self._margin)
        if free >= need:
            return None
        return (
            f"not enough free space to rewrite the next object (needs {need} bytes, "
            f"{free} free): let GC free the old copies or add capacity, then resume"
        )

    async def _convert_objects(
        self,
        job: Job,
        buckets: Sequence[str],
        progress: JobProgress,
        on_progress: Callable[[JobProgress], None] | None,
    ) -> JobProgress:
        start_bucket, _, start_key = progress.cursor.partition("\x00")
        for bucket in buckets:
            if progress.cursor and bucket < start_bucket:
                continue
            after = start_key if progress.cursor and bucket == start_bucket else None
            while True:
                page = await self._store.list_objects(bucket, start_after=after, limit=self._batch)
                for entry in page.entries:
                    try:
                        handle = await self._objects.open_object(bucket, entry.key)
                    except CairnError:
                        handle = None  # deleted meanwhile
                    if handle is not None and self._needs_rewrite(job, handle):
                        reason = await self._room_for(handle.version.size)
                        if reason is None:
                            try:
                                if await self._objects.rewrite_object(handle):
                                    progress = replace(
                                        progress,
                                        changed=progress.changed + 1,
                                        bytes_rewritten=progress.bytes_rewritten
                                        + handle.version.size,
                                    )
                            except NoCapacity as exc:
                                reason = f"no capacity: {exc}"
                        if reason is not None:
                            progress = await self._save(
                                replace(progress, state=JobState.PAUSED, error=reason)
                            )
                            log.warning("%s job paused: %s", job.value, reason)
                            return progress
                    after = entry.key
                    progress = await self._save(
                        replace(progress, done=progress.done + 1, cursor=f"{bucket}\x00{after}")
                    )
                    if on_progress is not None:
                        on_progress(progress)
                if not page.truncated or not page.entries:
                    break
        progress = await self._save(
            replace(progress, state=JobState.DONE, total=max(progress.total, progress.done))
        )
        if on_progress is not None:
            on_progress(progress)
        return progress
