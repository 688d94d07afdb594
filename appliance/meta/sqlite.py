"""SQLite metadata store: the embedded default (one process, WAL, short transactions).

One connection serves every transaction in turn (an asyncio lock orders them), which
makes each transaction serializable. An exclusive ``flock`` on ``<db>.lock`` keeps a
second process off the same database (``StoreLocked``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

import aiosqlite

from appliance.clock import utcnow
from appliance.meta.dialect import SQLITE, Dialect
from appliance.meta.errors import MetaError, StoreLocked, StoreUnavailable
from appliance.meta.sql import Row, SqlMetadataStore, Tx
from appliance.meta.store import LeaderLock

_UNAVAILABLE_HINTS = (
    "locked",
    "unable to open",
    "disk i/o",
    "readonly",
    "not a database",
    "malformed",
)


class _SqliteTx:
    def __init__(self, conn: aiosqlite.Connection, dialect: Dialect) -> None:
        self._conn = conn
        self._dialect = dialect

    async def execute(self, query: str, *args: Any) -> int:
        async with self._conn.execute(self._dialect.sql(query), args) as cursor:
            return cursor.rowcount

    async def executemany(self, query: str, rows: Iterable[Sequence[Any]]) -> None:
        batch = [tuple(r) for r in rows]
        if batch:
            await self._conn.executemany(self._dialect.sql(query), batch)

    async def fetch(self, query: str, *args: Any) -> list[Row]:
        async with self._conn.execute(self._dialect.sql(query), args) as cursor:
            return cast(list[Row], list(await cursor.fetchall()))

    async def fetchrow(self, query: str, *args: Any) -> Row | None:
        async with self._conn.execute(self._dialect.sql(query), args) as cursor:
            return cast(Row | None, await cursor.fetchone())

    async def script(self, statements: Sequence[str]) -> None:
        for statement in statements:
            await self._conn.execute(statement)


class _LocalLock:
    def __init__(self, held: set[str], name: str) -> None:
        self._held = held
        self._name = name

    async def release(self) -> None:
        self._held.discard(self._name)


class SqliteMetadataStore(SqlMetadataStore):
    """MetadataStore on one SQLite file. Not for several processes (see module doc)."""

    dialect = SQLITE

    def __init__(
        self,
        path: Path,
        *,
        gc_delay: timedelta = timedelta(hours=1),
        clock: Callable[[], datetime] = utcnow,
        busy_timeout_ms: int = 5000,
    ) -> None:
        super().__init__(gc_delay=gc_delay, clock=clock)
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._lock_fd: int | None = None
        self._held: set[str] = set()

    async def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._take_file_lock()
        conn: aiosqlite.Connection | None = None
        try:
            conn = await aiosqlite.connect(str(self._path), isolation_level=None)
            conn.row_factory = sqlite3.Row
            for pragma in (
                "PRAGMA journal_mode = WAL",
                "PRAGMA synchronous = NORMAL",
                "PRAGMA foreign_keys = ON",
                f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}",
            ):
                await conn.execute(pragma)
        except sqlite3.Error as exc:
            if conn is not None:
                await conn.close()
            self._drop_file_lock()
            raise StoreUnavailable(f"cannot open SQLite database {self._path}: {exc}") from exc
        self._conn = conn
        try:
            await self._run(self._migrate_from_disk)
        except BaseException:
            await self.close()
            raise

    async def _migrate_from_disk(self, tx: Tx) -> None:
        exists = await tx.fetchrow(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'settings'"
        )
        current = 0
        if exists is not None:
            row = await tx.fetchrow("SELECT value FROM settings WHERE name = 'schema_version'")
            current = 0 if row is None else int(row["value"])
        await self._migrate(tx, current)

    def _take_file_lock(self) -> None:
        lock_path = self._path.with_name(self._path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(
                f"{self._path} is in use by another Cairn process; SQLite allows a single "
                "instance (use database.postgres for several)"
            ) from None
        self._lock_fd = fd

    def _drop_file_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def close(self) -> None:
        if self._conn is not None:
            async with self._lock:
                await self._conn.close()
            self._conn = None
        self._drop_file_lock()

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[Tx]:
        if self._conn is None:
            raise StoreUnavailable("the SQLite store is not open")
        async with self._lock:
            conn = self._conn
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteTx(conn, self.dialect)
            except BaseException:
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT")

    def _transaction(self) -> AbstractAsyncContextManager[Tx]:
        return self._tx()

    def _is_retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc).lower()

    def _translate(self, exc: BaseException) -> BaseException | None:
        if isinstance(exc, MetaError):
            return None
        if isinstance(exc, sqlite3.Error):
            text = str(exc).lower()
            if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError) and any(
                hint in text for hint in _UNAVAILABLE_HINTS
            ):
                return StoreUnavailable(f"SQLite database {self._path}: {exc}")
        if isinstance(exc, ValueError) and "closed" in str(exc).lower():
            return StoreUnavailable("the SQLite store is closed")
        return None

    async def try_lock(self, name: str) -> LeaderLock | None:
        if name in self._held:
            return None
        self._held.add(name)
        return _LocalLock(self._held, name)
