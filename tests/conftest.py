"""Fixtures shared by every test layer: metadata stores on SQLite and PostgreSQL.

PostgreSQL tests use ``CAIRN_TEST_PG_DSN`` (set by ``make test`` after it starts the
server); each test gets a schema of its own, dropped afterwards. With
``CAIRN_REQUIRE_PG=1`` a missing server fails the run instead of skipping.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.meta.postgres import PostgresMetadataStore
from appliance.meta.sql import SqlMetadataStore
from appliance.meta.sqlite import SqliteMetadataStore

STORE_KINDS = ["sqlite", "postgres"]


@dataclass
class FakeClock:
    """A clock tests move by hand."""

    now: datetime = field(default_factory=lambda: datetime(2026, 1, 15, 12, 0, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def pg_dsn() -> str:
    dsn = os.environ.get("CAIRN_TEST_PG_DSN", "")
    if not dsn:
        if os.environ.get("CAIRN_REQUIRE_PG") == "1":
            pytest.fail("CAIRN_REQUIRE_PG=1 but CAIRN_TEST_PG_DSN is not set")
        pytest.skip("PostgreSQL not configured (set CAIRN_TEST_PG_DSN)")
    return dsn


StoreFactory = Callable[..., SqlMetadataStore]


@pytest.fixture(params=STORE_KINDS)
async def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreFactory]:
    """Make stores of one kind that share one database (a file, or a PG schema)."""
    kind: str = request.param
    made: list[SqlMetadataStore] = []
    schema = f"t_{uuid.uuid4().hex[:16]}"
    if kind == "postgres":
        import asyncpg

        dsn = pg_dsn()
        try:
            conn = await asyncpg.connect(dsn, timeout=10)
        except Exception as exc:  # a configured but dead server is a failure, not a skip
            pytest.fail(f"cannot reach PostgreSQL at CAIRN_TEST_PG_DSN: {exc}")
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.close()

    def make(**kwargs: Any) -> SqlMetadataStore:
        store: SqlMetadataStore
        if kind == "sqlite":
            store = SqliteMetadataStore(tmp_path / "meta.db", **kwargs)
        else:
            store = PostgresMetadataStore(
                dsn, server_settings={"search_path": schema}, max_connections=20, **kwargs
            )
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()
    if kind == "postgres":
        conn = await asyncpg.connect(dsn, timeout=10)
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(store_factory: StoreFactory, clock: FakeClock) -> SqlMetadataStore:
    """An open store on a fresh database, with a hand-moved clock and a 60 s GC delay."""
    made = store_factory(clock=clock, gc_delay=timedelta(seconds=60))
    await made.open()
    return made


class _ErrorLogs(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def fail_on_error_logs(request: pytest.FixtureRequest) -> Iterator[None]:
    """An unexpected ERROR log fails the test; mark ``allow_error_logs`` where expected."""
    handler = _ErrorLogs()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
    if handler.records and request.node.get_closest_marker("allow_error_logs") is None:
        lines = "\n".join(f"{r.name}: {r.getMessage()}" for r in handler.records[:5])
        pytest.fail(f"unexpected ERROR logs:\n{lines}")
