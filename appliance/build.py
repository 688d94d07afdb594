"""Wiring: the one place (with ``frontends.daemon``) that builds concrete classes.

``open_pool`` turns a validated configuration into a running core: the metadata store
(migrated), the backends (each behind the retry wrapper), and the configured buckets
and credentials recorded in the store. ``Pool.close`` releases all of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta

from appliance.cache.memory import CachingChunkStore
from appliance.clock import utcnow
from appliance.config import (
    BackendConfig,
    CacheConfig,
    CairnConfig,
    DatabaseConfig,
    EncryptionConfig,
    KeySourceConfig,
    LocalBackendConfig,
    S3BackendConfig,
)
from appliance.crypto.keys import (
    KeyRing,
    KeySource,
    LocalKey,
    VaultTransitKey,
    decode_key,
    read_key_file,
)
from appliance.crypto.store import EncryptingChunkStore, EncryptionPolicy
from appliance.data.buffers import BufferPool
from appliance.data.chunkstore import ChunkStorage, ChunkStore
from appliance.data.cpu import CpuPool
from appliance.errors import BucketExists, KeyUnavailable
from appliance.meta.backoff import Backoff
from appliance.meta.models import BackendSpec, Permission
from appliance.meta.outage import OutageTolerantStore
from appliance.meta.postgres import PostgresMetadataStore
from appliance.meta.sqlite import SqliteMetadataStore
from appliance.meta.store import MetadataStore
from appliance.placement.health import Breakers
from appliance.placement.leases import OWNER_PREFIX as LEASE_OWNER_PREFIX
from appliance.placement.leases import QuotaLeases
from appliance.placement.pool import PoolState
from appliance.placement.replication import ReplicationPolicy
from appliance.placement.router import BackendState, Placement, Router
from appliance.placement.usage import Caps, UsageMeter
from appliance.services.access import AccessService
from appliance.services.admin import AdminService
from appliance.services.blobfallback import BlobFallback
from appliance.services.bucketconfig import BucketConfigService
from appliance.services.files import FileService
from appliance.services.fsck import Fsck
from appliance.services.keys import KeyService
from appliance.services.multipart import MultipartService
from appliance.services.objects import ObjectService
from appliance.services.replication import ReplicationScanner, ReplicationWorker
from appliance.services.sealing import SecretSealer
from appliance.services.tombstones import Tombstones, TombstoneSweeper
from appliance.services.workers import GcWorker, HealthChecker, Janitor
from backends.base import Backend
from backends.blobwriter import BlobWriter
from backends.diskcache import DiskCache, DiskCacheBusy, DiskCachedBackend
from backends.local import LocalBackend
from backends.metering import MeteredBackend, Recorder
from backends.retry import RetryingBackend
from backends.s3 import S3Backend

log = logging.getLogger("cairn.build")
POOL_SECRET_SETTING = "pool_secret"


def make_store(database: DatabaseConfig, *, gc_delay: timedelta) -> MetadataStore:
    """Build (not open) the configured metadata store."""
    if database.postgres is not None:
        pg = database.postgres
        return PostgresMetadataStore(
            pg.to_dsn(),
            min_connections=pg.min_connections,
            max_connections=pg.max_connections,
            server_settings={"search_path": pg.schema_name} if pg.schema_name else None,
            gc_delay=gc_delay,
        )
    assert database.sqlite is not None
    return SqliteMetadataStore(database.sqlite.path, gc_delay=gc_delay)


def make_key_source(spec: KeySourceConfig) -> KeySource:
    """Build one master key source. Raises ``KeyUnavailable`` for an unreadable key file."""
    if spec.inline is not None:
        return LocalKey(decode_key(spec.inline.get_secret_value(), what="inline key"))
    if spec.file is not None:
        try:
            return LocalKey(read_key_file(spec.file))
        except (OSError, ValueError) as exc:
            raise KeyUnavailable(f"cannot use master key file {spec.file}: {exc}") from exc
    assert spec.vault is not None
    vault = spec.vault
    return VaultTransitKey(
        vault.address,
        vault.key_name,
        mount=vault.mount,
        token=vault.token.get_secret_value() if vault.token is not None else None,
        token_file=vault.token_file,
        namespace=vault.namespace,
        timeout=vault.timeout,
    )


def make_key_ring(encryption: EncryptionConfig) -> KeyRing | None:
    """The configured key ring (not opened), or None when no master key is set."""
    if encryption.key is None:
        return None
    return KeyRing(
        make_key_source(encryption.key),
        [make_key_source(k) for k in encryption.previous_keys],
    )


def prefix_secret(pool_secret: str) -> bytes:
    """The HMAC key of hidden blob prefixes, derived from the pool secret."""
    try:
        material = bytes.fromhex(pool_secret)
    except ValueError:
        material = pool_secret.encode()
    return hmac.new(material, b"cairn blob prefix", hashlib.sha256).digest()


def make_backend(
    spec: BackendConfig, record: Recorder | None = None, writer: BlobWriter | None = None
) -> Backend:
    """Build one backend adapter: metered (when ``record`` is given), then retried.
    ``writer`` makes the small puts of a local backend (see ``backends.blobwriter``)."""
    inner: Backend
    if isinstance(spec, S3BackendConfig):
        inner = S3Backend(
            spec.name,
            endpoint_url=spec.endpoint,
            region=spec.region,
            bucket=spec.bucket,
            prefix=spec.prefix,
            access_key=spec.access_key,
            secret_key=spec.secret_key.get_secret_value(),
            path_style=spec.path_style,
            max_connections=spec.max_connections,
            connect_timeout=spec.connect_timeout,
            read_timeout=spec.read_timeout,
        )
    elif isinstance(spec, LocalBackendConfig):
        spec.path.mkdir(parents=True, exist_ok=True)
        inner = LocalBackend(spec.name, spec.path, writer=writer)
    else:  # pragma: no cover - the config union has no other member
        raise TypeError(f"unknown backend type {type(spec).__name__}")
    if record is not None:
        inner = MeteredBackend(inner, record)
    return RetryingBackend(inner)


@dataclass
class Pool:
    """The wired core: configuration, store, backends by name, and the services."""

    config: CairnConfig
    store: MetadataStore
    cpu: CpuPool
    buffers: BufferPool
    meter: UsageMeter
    backends: dict[str, Backend]
    state: PoolState
    chunks: ChunkStorage
    """What services read and write chunks through: the memory cache over the store."""
    objects: ObjectService
    multipart: MultipartService
    gc: GcWorker
    janitor: Janitor
    replication: ReplicationWorker
    scanner: ReplicationScanner
    health: HealthChecker
    access: AccessService
    admin: AdminService
    bucket_config: BucketConfigService
    keys: KeyService
    encrypting: EncryptingChunkStore
    """The encrypting layer over the plain chunk store (below the memory cache)."""
    cache: CachingChunkStore | None = None
    """The memory cache (None when ``cache.max_size`` is 0)."""
    disk_cache: DiskCache | None = None
    """The disk cache under the backends (None unless ``cache.disk_dir`` is set)."""
    blob_writer: BlobWriter | None = None
    """The helper process of the local backends' small puts (None without one)."""
    keyring: KeyRing | None = None
    sweeper: TombstoneSweeper | None = None
    """Retires tombstones of deleted keys that hide nothing any more."""
    _closed: bool = field(default=False, repr=False)

    async def close(self) -> None:
        """Flush usage, close backends, the disk cache, the CPU pool, then the store.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.log_cache_stats()
        with contextlib.suppress(Exception):
            await self.meter.flush()
        with contextlib.suppress(Exception):
            await self.state.leases.close()
        if self.keyring is not None:
            with contextlib.suppress(Exception):
                await self.keyring.close()
        await _release(
            self.store, self.cpu, self.backends.values(), self.disk_cache, self.blob_writer
        )

    def log_cache_stats(self) -> None:
        """Log the caches' counters (at INFO), e.g. when the daemon stops."""
        if self.cache is not None:
            mem = self.cache.stats()
            log.info(
                "memory cache: %d hits, %d misses (%d shared a fetch, %d fetched a range, "
                "%d large chunks passed), %d bypassed, %d evictions, %d chunks / %d bytes held",
                mem.hits,
                mem.misses,
                mem.coalesced,
                mem.range_fetches,
                mem.passed,
                mem.bypassed,
                mem.evictions,
                mem.entries,
                mem.size,
            )
        if self.disk_cache is not None:
            disk = self.disk_cache.stats()
            log.info(
                "disk cache: %d hits, %d misses, %d stored, %d evictions, %d damaged, "
                "%d entries / %d bytes",
                disk.hits,
                disk.misses,
                disk.stored,
                disk.evictions,
                disk.corrupt,
                disk.entries,
                disk.size,
            )


async def _release(
    store: MetadataStore,
    cpu: CpuPool,
    backends: Iterable[Backend],
    disk_cache: DiskCache | None = None,
    writer: BlobWriter | None = None,
) -> None:
    for backend in backends:
        with contextlib.suppress(Exception):
            await backend.close()
    if writer is not None:
        with contextlib.suppress(Exception):
            await writer.close()
    if disk_cache is not None:
        with contextlib.suppress(Exception):
            await disk_cache.close()
    cpu.close()
    await store.close()


async def open_disk_cache(config: CacheConfig) -> DiskCache | None:
    """The configured disk cache, opened; None when it is off or its directory is held
    by another process (logged: this process then runs without one)."""
    if config.disk_dir is None:
        return None
    disk = DiskCache(config.disk_dir, config.disk_max_size)
    try:
        await disk.open()
    except DiskCacheBusy as exc:
        log.warning("running without the disk cache: %s", exc)
        return None
    return disk


def wrap_chunks(chunks: ChunkStorage, config: CacheConfig) -> ChunkStorage:
    """The chunk store as services see it: behind the memory cache unless it is off."""
    if config.max_size == 0:
        return chunks
    return CachingChunkStore(
        chunks, max_size=config.max_size, max_object_size=config.max_object_size, ttl=config.ttl
    )


def replication_policy(config: CairnConfig) -> ReplicationPolicy:
    """The pool's replication factor, write quorum and per-bucket factors."""
    return ReplicationPolicy(
        factor=config.pool.replication.factor,
        write_quorum=config.pool.replication.write_quorum,
        buckets={
            b.name: b.replication_factor for b in config.buckets if b.replication_factor is not None
        },
    )


async def _pool_secret(store: MetadataStore) -> str:
    return await store.setdefault_setting(POOL_SECRET_SETTING, secrets.token_hex(32))


async def _apply_config(store: MetadataStore, admin: AdminService, config: CairnConfig) -> None:
    """Record the configured backends, buckets and keys (idempotent; several instances
    may do it at once)."""
    await store.sync_backends([BackendSpec(b.name, b.quota_bytes) for b in config.backends])
    for bucket in config.buckets:
        if await store.get_bucket(bucket.name) is None:
            with contextlib.suppress(BucketExists):  # another instance made it meanwhile
                await admin.create_bucket(bucket.name)
        for cred in bucket.credentials:
            await admin.ensure_key(
                cred.access_key,
                cred.secret_key.get_secret_value(),
                {bucket.name: frozenset(Permission(p) for p in cred.permissions)},
                f"from config (bucket {bucket.name})",
            )
    for key in config.credentials:
        await admin.ensure_key(
            key.access_key,
            key.secret_key.get_secret_value(),
            {b: frozenset(Permission(p) for p in perms) for b, perms in key.grants.items()},
            key.description or "from config",
        )


async def open_pool(
    config: CairnConfig, *, wrap_backend: Callable[[Backend], Backend] | None = None
) -> Pool:
    """Open the store (migrating it), record config facts in it, build backends and
    services. ``wrap_backend`` lets tests put a fault-injecting wrapper around each
    backend (outside the retry wrapper).

    Raises the store's errors (``SchemaTooNew``, ``StoreLocked``, ``StoreUnavailable``)
    and ``KeyUnavailable`` (a master key cannot be read or Vault cannot be used);
    nothing is left open when it raises.
    """
    store: MetadataStore = OutageTolerantStore(
        make_store(config.database, gc_delay=timedelta(seconds=config.pool.gc_delay_seconds)),
        entries=config.database.read_cache_entries,
        retry_seconds=config.database.retry_seconds,
    )
    await store.open()
    caps = {
        b.name: Caps(b.api_request_limit, b.egress_byte_limit, b.ingress_byte_limit)
        for b in config.backends
    }
    cpu = CpuPool()
    buffers = BufferPool()
    meter = UsageMeter(store, caps)
    backends: dict[str, Backend] = {}
    disk: DiskCache | None = None
    keyring: KeyRing | None = None
    writer = (
        BlobWriter() if any(isinstance(b, LocalBackendConfig) for b in config.backends) else None
    )
    try:
        pool_secret = await _pool_secret(store)
        sealer = SecretSealer(pool_secret)
        access = AccessService(store, sealer)
        await _apply_config(store, AdminService(store, access, sealer), config)
        if store.kind == "sqlite":
            # one process per SQLite file: a lease found now is a dead process's
            await store.release_stale_reservations(
                utcnow() + timedelta(days=1), owner_prefix=LEASE_OWNER_PREFIX
            )
        keyring = make_key_ring(config.encryption)
        if keyring is not None:
            await keyring.open()
        await meter.reload()
        disk = await open_disk_cache(config.cache)
        for spec in config.backends:
            backend = make_backend(spec, meter.record, writer)
            if wrap_backend:
                backend = wrap_backend(backend)
            # outermost: a disk-cache hit makes no backend call and counts no usage
            backends[spec.name] = DiskCachedBackend(backend, disk) if disk else backend
        states = {b.name: BackendState.READ_ONLY for b in config.backends if b.read_only}
        health = config.pool.health
        state = PoolState(
            store,
            list(backends.values()),
            Router(Placement(config.pool.placement)),
            meter,
            states=states,
            groups={b.name: b.group for b in config.backends},
            replica_timeouts={b.name: b.replica_timeout for b in config.backends},
            breakers=Breakers(
                backends, threshold=health.failure_threshold, cooldown=health.open_seconds
            ),
            hedged_reads=config.pool.replication.hedged_reads,
            leases=QuotaLeases(store),
        )
        bucket_config = BucketConfigService(store)
        replication = replication_policy(config)
        admin = AdminService(
            store, access, sealer, state, bucket_config, Fsck(store, state, replication)
        )
        policy = EncryptionPolicy(
            default=config.encryption.enabled,
            buckets={b.name: b.encryption for b in config.buckets if b.encryption is not None},
            prefix_secret=prefix_secret(pool_secret),
        )
        encrypting = EncryptingChunkStore(
            ChunkStore(state, cpu, policy=replication, buffers=buffers),
            keyring,
            cpu,
            policy,
            key_cache_size=config.encryption.key_cache_size,
        )
        # the memory cache sits above decryption (it holds plaintext, keyed by chunk id)
        chunks = wrap_chunks(encrypting, config.cache)
        fallback = BlobFallback(state, encrypting, replication)
        objects = ObjectService(
            store,
            chunks,
            cpu,
            chunk_size=config.pool.chunk_size,
            buffers=buffers,
            fallback=fallback,
            tombstones=Tombstones(store, chunks, encrypting.inner, state),
        )
        return Pool(
            config=config,
            store=store,
            cpu=cpu,
            buffers=buffers,
            meter=meter,
            backends=backends,
            state=state,
            chunks=chunks,
            objects=objects,
            multipart=MultipartService(store, objects),
            gc=GcWorker(store, chunks),
            janitor=Janitor(store),
            replication=ReplicationWorker(
                store,
                chunks,
                state,
                replication,
                backoff=Backoff(base_seconds=config.pool.replication.retry_seconds),
            ),
            scanner=ReplicationScanner(store, state, replication),
            health=HealthChecker(state),
            access=access,
            admin=admin,
            bucket_config=bucket_config,
            cache=chunks if isinstance(chunks, CachingChunkStore) else None,
            disk_cache=disk,
            blob_writer=writer,
            keys=KeyService(store, encrypting, objects),
            encrypting=encrypting,
            keyring=keyring,
            sweeper=TombstoneSweeper(
                store, fallback, min_age=timedelta(seconds=config.pool.gc_delay_seconds)
            ),
        )
    except BaseException:
        if keyring is not None:
            with contextlib.suppress(Exception):
                await keyring.close()
        await _release(store, cpu, backends.values(), disk, writer)
        raise


WRITE_BACK_FILES = 256
"""With ``mount.write_back``: closed files whose commits may run behind at once (more
and a close waits for its commit)."""


def make_file_service(pool: Pool, *, write_back: bool = False) -> FileService:
    """The ``FileService`` of a pool, spooling under ``mount.spool_dir``; with
    ``write_back``, small files commit after their close returned."""
    return FileService(
        pool.store,
        pool.objects,
        pool.state,
        chunk_size=pool.config.pool.chunk_size,
        spool_dir=pool.config.mount.spool_dir,
        replicas=pool.config.pool.replication_factor,
        dir_ttl=min(1.0, pool.config.mount.attr_timeout, pool.config.mount.entry_timeout),
        write_back=WRITE_BACK_FILES if write_back else 0,
    )
