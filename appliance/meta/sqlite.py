"""SQLite metadata store: the embedded default (one process, WAL, short transactions).

One connection serves every transaction in turn (an asyncio lock orders them), which
makes each transaction serializable. An exclusive ``flock`` on ``<db>.lock`` keeps a
second process off the same database (``StoreLocked``).

Statements run on the event loop's thread, not in a worker thread: with WAL and
``synchronous=NORMAL`` a commit does not fsync, so a statement takes microseconds, less
than the two thread hops per statement a worker thread (aiosqlite) costs. Only this
process uses the file, so no statement waits on another writer. See docs/metadata.md.
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

_DAMAGE_HINTS = ("not a database", "malformed", "disk i/o")
"""Errors after which the connection is replaced (its page cache may hold bad pages)."""


class _SqliteTx:
    def __init__(self, conn: sqlite3.Connection, dialect: Dialect) -> None:
        self._conn = conn
        self._dialect = dialect

    async def execute(self, query: str, *args: Any) -> int:
        return self._conn.execute(self._dialect.sql(query), args).rowcount

    async def executemany(self, query: str, rows: Iterable[Sequence[Any]]) -> None:
        batch = [tuple(r) for r in rows]
        if batch:
            self._conn.executemany(self._dialect.sql(query), batch)

    async def fetch(self, query: str, *args: Any) -> list[Row]:
        return cast(list[Row], self._conn.execute(self._dialect.sql(query), args).fetchall())

    async def fetchrow(self, query: str, *args: Any) -> Row | None:
        return cast(Row | None, self._conn.execute(self._dialect.sql(query), args).fetchone())

    async def script(self, statements: Sequence[str]) -> None:
        for statement in statements:
            self._conn.execute(statement)


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
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()
        self._lock_fd: int | None = None
        self._held: set[str] = set()
        self._damaged = False

    async def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._take_file_lock()
        try:
            self._conn = self._connect()
        except StoreUnavailable:
            self._drop_file_lock()
            raise
        try:
            await self._run(self._migrate_from_disk)
        except BaseException:
            await self.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        """A configured connection; raises ``StoreUnavailable``."""
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(str(self._path), isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            for pragma in (
                "PRAGMA journal_mode = WAL",
                "PRAGMA synchronous = NORMAL",
                "PRAGMA foreign_keys = ON",
                f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}",
            ):
                conn.execute(pragma)
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise StoreUnavailable(f"cannot open SQLite database {self._path}: {exc}") from exc
        return conn

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
                self._conn.close()
            self._conn = None
        self._drop_file_lock()

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[Tx]:
        if self._conn is None:
            raise StoreUnavailable("the SQLite store is not open")
        async with self._lock:
            if self._damaged:
                # the file was unreadable: a new connection drops pages cached from it
                conn = self._connect()
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn, self._damaged = conn, False
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield _SqliteTx(conn, self.dialect)
                except BaseException:
                    with contextlib.suppress(sqlite3.Error, ValueError):
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                text = str(exc).lower()
                if any(hint in text for hint in _DAMAGE_HINTS):
                    self._damaged = True
                raise
        # Statements never suspend: yield once per transaction so a caller looping over
        # store calls cannot starve the other tasks on the loop.
        await asyncio.sleep(0)

    def _transaction(self) -> AbstractAsyncContextManager[Tx]:
        return self._tx()

    def _is_retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc).lower()

    def _is_foreign_key_violation(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError) and "FOREIGN KEY" in str(exc)

    def _translate(self, exc: BaseException) -> BaseException | None:
        if isinstance(exc, MetaError):
            return None
        if isinstance(exc, sqlite3.Error):
            text = str(exc).lower()
            if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError) and any(
                hint in text for hint in _UNAVAILABLE_HINTS
            ):
                return StoreUnavailable(f"SQLite database {self._path}: {exc}")
        if isinstance(exc, sqlite3.ProgrammingError) and "closed" in str(exc).lower():
            return StoreUnavailable("the SQLite store is closed")
        return None

    async def try_lock(self, name: str) -> LeaderLock | None:
        if name in self._held:
            return None
        self._held.add(name)
        return _LocalLock(self._held, name)
