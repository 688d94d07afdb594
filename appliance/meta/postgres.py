"""PostgreSQL metadata store (asyncpg) for one or several Cairn instances.

Transactions run at READ COMMITTED with row locks where a decision depends on a row
(``FOR UPDATE``) and conditional updates for quota; deadlocks and serialization
failures re-run the transaction. Singleton workers use session advisory locks.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from appliance.clock import utcnow
from appliance.meta.dialect import POSTGRES
from appliance.meta.errors import MetaError, StoreUnavailable
from appliance.meta.sql import Row, SqlMetadataStore, Tx
from appliance.meta.store import LeaderLock

_RETRYABLE_SQLSTATES = {"40001", "40P01"}  # serialization_failure, deadlock_detected
_MIGRATION_LOCK = 0x43414952  # "CAIR"


class _PgTx:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def execute(self, query: str, *args: Any) -> int:
        status: str = await self._conn.execute(query, *args)
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def executemany(self, query: str, rows: Iterable[Sequence[Any]]) -> None:
        batch = [tuple(r) for r in rows]
        if batch:
            await self._conn.executemany(query, batch)

    async def fetch(self, query: str, *args: Any) -> list[Row]:
        rows: list[Row] = await self._conn.fetch(query, *args)
        return rows

    async def fetchrow(self, query: str, *args: Any) -> Row | None:
        row: Row | None = await self._conn.fetchrow(query, *args)
        return row

    async def script(self, statements: Sequence[str]) -> None:
        for statement in statements:
            await self._conn.execute(statement)


class _AdvisoryLock:
    def __init__(self, conn: Any, key: int) -> None:
        self._conn: Any = conn
        self._key = key

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await conn.execute("SELECT pg_advisory_unlock($1)", self._key)
        finally:
            await conn.close()


def _lock_key(name: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True
    )


class PostgresMetadataStore(SqlMetadataStore):
    """MetadataStore on PostgreSQL. ``server_settings`` may set e.g. ``search_path``."""

    dialect = POSTGRES

    def __init__(
        self,
        dsn: str,
        *,
        min_connections: int = 1,
        max_connections: int = 10,
        server_settings: dict[str, str] | None = None,
        connect_timeout: float = 10.0,
        gc_delay: timedelta = timedelta(hours=1),
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        super().__init__(gc_delay=gc_delay, clock=clock)
        self._dsn = dsn
        self._min = min_connections
        self._max = max_connections
        self._settings = dict(server_settings or {})
        self._timeout = connect_timeout
        self._pool: Any = None

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min,
                max_size=self._max,
                server_settings=self._settings,
                timeout=self._timeout,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            await self._run(self._migrate_from_server)
        except BaseException:
            await self.close()
            raise

    async def _migrate_from_server(self, tx: Tx) -> None:
        await tx.execute(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
        exists = await tx.fetchrow("SELECT to_regclass('settings') IS NOT NULL AS present")
        current = 0
        if exists is not None and exists["present"]:
            row = await tx.fetchrow("SELECT value FROM settings WHERE name = 'schema_version'")
            current = 0 if row is None else int(row["value"])
        await self._migrate(tx, current)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[Tx]:
        if self._pool is None:
            raise StoreUnavailable("the PostgreSQL store is not open")
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            yield _PgTx(conn)

    def _transaction(self) -> AbstractAsyncContextManager[Tx]:
        return self._tx()

    def _is_retryable(self, exc: BaseException) -> bool:
        return getattr(exc, "sqlstate", None) in _RETRYABLE_SQLSTATES

    def _is_foreign_key_violation(self, exc: BaseException) -> bool:
        return getattr(exc, "sqlstate", None) == "23503"

    def _translate(self, exc: BaseException) -> BaseException | None:
        if isinstance(exc, MetaError):
            return None
        if isinstance(
            exc,
            OSError
            | TimeoutError
            | asyncpg.PostgresConnectionError
            | asyncpg.InterfaceError
            | asyncpg.CannotConnectNowError,
        ):
            return StoreUnavailable(f"PostgreSQL is unavailable: {exc}")
        sqlstate = getattr(exc, "sqlstate", None) or ""
        if sqlstate.startswith(("08", "57P")):  # connection exceptions, admin shutdown
            return StoreUnavailable(f"PostgreSQL is unavailable: {exc}")
        return None

    async def try_lock(self, name: str) -> LeaderLock | None:
        try:
            conn = await asyncpg.connect(
                self._dsn, server_settings=self._settings, timeout=self._timeout
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        key = _lock_key(name)
        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
            return _AdvisoryLock(conn, key)
        await conn.close()
        return None
