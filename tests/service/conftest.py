"""Service-layer fixtures: the moto server, and the database section on both stores."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import pg_dsn
from tests.fixtures_moto import moto_s3

__all__ = ["moto_s3"]


@pytest.fixture(params=["sqlite", "postgres"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """The ``database`` config section for each store kind (a fresh PG schema)."""
    if request.param == "sqlite":
        yield {"sqlite": {"path": str(tmp_path / "cairn.db")}}
        return
    dsn = pg_dsn()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(dsn)
    await conn.execute(f"CREATE SCHEMA {schema}")
    yield {"postgres": {"dsn": dsn, "schema": schema}}
    await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    await conn.close()
