"""Wiring: the one place (with ``frontends.daemon``) that builds concrete classes.

``open_pool`` turns a validated configuration into a running core: the metadata store
(migrated), the backends (each behind the retry wrapper), and the configured buckets
and credentials recorded in the store. ``Pool.close`` releases all of it.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta

from appliance.clock import utcnow
from appliance.config import (
    BackendConfig,
    CairnConfig,
    DatabaseConfig,
    LocalBackendConfig,
    S3BackendConfig,
)
from appliance.data.chunkstore import ChunkStore
from appliance.data.cpu import CpuPool
from appliance.meta.errors import AlreadyExists
from appliance.meta.models import BackendSpec, Credential, Permission
from appliance.meta.postgres import PostgresMetadataStore
from appliance.meta.sqlite import SqliteMetadataStore
from appliance.meta.store import MetadataStore
from appliance.placement.pool import PoolState
from appliance.placement.router import BackendState, Placement, Router
from appliance.placement.usage import Caps, UsageMeter
from appliance.services.access import AccessService
from appliance.services.files import FileService
from appliance.services.multipart import MultipartService
from appliance.services.objects import ObjectService
from appliance.services.workers import GcWorker, Janitor
from backends.base import Backend
from backends.local import LocalBackend
from backends.metering import MeteredBackend, Recorder
from backends.retry import RetryingBackend
from backends.s3 import S3Backend

POOL_SECRET_SETTING = "pool_secret"
BUCKET_OWNER_PERMISSIONS = frozenset(
    {Permission.READ, Permission.WRITE, Permission.LIST, Permission.DELETE}
)


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


def make_backend(spec: BackendConfig, record: Recorder | None = None) -> Backend:
    """Build one backend adapter: metered (when ``record`` is given), then retried."""
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
        inner = LocalBackend(spec.name, spec.path)
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
    meter: UsageMeter
    backends: dict[str, Backend]
    state: PoolState
    chunks: ChunkStore
    objects: ObjectService
    multipart: MultipartService
    gc: GcWorker
    janitor: Janitor
    access: AccessService
    _closed: bool = field(default=False, repr=False)

    async def close(self) -> None:
        """Flush usage, close backends, the CPU pool, then the store. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await self.meter.flush()
        await _release(self.store, self.cpu, self.backends.values())


async def _release(store: MetadataStore, cpu: CpuPool, backends: Iterable[Backend]) -> None:
    for backend in backends:
        with contextlib.suppress(Exception):
            await backend.close()
    cpu.close()
    await store.close()


async def _apply_config(store: MetadataStore, config: CairnConfig) -> None:
    await store.sync_backends([BackendSpec(b.name, b.quota_bytes) for b in config.backends])
    await store.setdefault_setting(POOL_SECRET_SETTING, secrets.token_hex(32))
    for bucket in config.buckets:
        if await store.get_bucket(bucket.name) is None:
            with contextlib.suppress(AlreadyExists):  # another instance made it meanwhile
                await store.create_bucket(bucket.name)
        for cred in bucket.credentials:
            existing = await store.get_credential(cred.access_key)
            grants = dict(existing.grants) if existing else {}
            grants[bucket.name] = BUCKET_OWNER_PERMISSIONS
            await store.put_credential(
                Credential(
                    access_key=cred.access_key,
                    secret=cred.secret_key.get_secret_value(),
                    created_at=existing.created_at if existing else utcnow(),
                    description=f"from config (bucket {bucket.name})",
                    grants=grants,
                )
            )


async def open_pool(
    config: CairnConfig, *, wrap_backend: Callable[[Backend], Backend] | None = None
) -> Pool:
    """Open the store (migrating it), record config facts in it, build backends and
    services. ``wrap_backend`` lets tests put a fault-injecting wrapper around each
    backend (outside the retry wrapper).

    Raises the store's errors (``SchemaTooNew``, ``StoreLocked``, ``StoreUnavailable``);
    nothing is left open when it raises.
    """
    store = make_store(config.database, gc_delay=timedelta(seconds=config.pool.gc_delay_seconds))
    await store.open()
    caps = {
        b.name: Caps(b.api_request_limit, b.egress_byte_limit, b.ingress_byte_limit)
        for b in config.backends
    }
    cpu = CpuPool()
    meter = UsageMeter(store, caps)
    backends: dict[str, Backend] = {}
    try:
        await _apply_config(store, config)
        await meter.reload()
        for spec in config.backends:
            backend = make_backend(spec, meter.record)
            backends[spec.name] = wrap_backend(backend) if wrap_backend else backend
        states = {b.name: BackendState.READ_ONLY for b in config.backends if b.read_only}
        state = PoolState(
            store,
            list(backends.values()),
            Router(Placement(config.pool.placement)),
            meter,
            states=states,
        )
        chunks = ChunkStore(state, cpu, replicas=config.pool.replication_factor)
        objects = ObjectService(store, chunks, cpu, chunk_size=config.pool.chunk_size)
        return Pool(
            config=config,
            store=store,
            cpu=cpu,
            meter=meter,
            backends=backends,
            state=state,
            chunks=chunks,
            objects=objects,
            multipart=MultipartService(store, objects),
            gc=GcWorker(store, chunks),
            janitor=Janitor(store),
            access=AccessService(store),
        )
    except BaseException:
        await _release(store, cpu, backends.values())
        raise


def make_file_service(pool: Pool) -> FileService:
    """The ``FileService`` of a pool, spooling under ``mount.spool_dir``."""
    return FileService(
        pool.store,
        pool.objects,
        pool.state,
        chunk_size=pool.config.pool.chunk_size,
        spool_dir=pool.config.mount.spool_dir,
        replicas=pool.config.pool.replication_factor,
    )
