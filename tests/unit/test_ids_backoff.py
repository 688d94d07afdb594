"""Pure helpers: sortable ids, backoff, time encoding, migration numbering."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta

import pytest

from appliance.clock import from_micros, month_of, to_micros
from appliance.ids import new_sortable_id, sortable_id_time_ms
from appliance.meta.backoff import Backoff
from appliance.meta.dialect import POSTGRES, SQLITE, migrations, split_statements

pytestmark = pytest.mark.unit


def test_sortable_ids_sort_by_time_and_carry_it() -> None:
    ids = [new_sortable_id(ms) for ms in (5, 1_000, 1_700_000_000_000, 2**48 - 1)]
    assert ids == sorted(ids)
    assert [sortable_id_time_ms(i) for i in ids] == [5, 1_000, 1_700_000_000_000, 2**48 - 1]
    assert len({new_sortable_id(7) for _ in range(1000)}) == 1000
    with pytest.raises(ValueError, match="out of range"):
        new_sortable_id(2**48)
    with pytest.raises(ValueError, match="not a sortable id"):
        sortable_id_time_ms("short")


def test_successive_ids_of_a_process_sort_in_creation_order() -> None:
    """Two writes that begin one after the other must not swap places (a later PUT
    losing to an earlier one committed in the same millisecond): ids carry the
    microsecond."""
    ids = []
    for _ in range(2000):
        ids.append(new_sortable_id())
        deadline = time.perf_counter_ns() + 1_500  # at least the next microsecond
        while time.perf_counter_ns() < deadline:
            pass
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_backoff_doubles_up_to_the_cap_with_bounded_jitter() -> None:
    plain = Backoff(base_seconds=1, factor=2, max_seconds=10, jitter=0)
    assert [plain.delay(a).total_seconds() for a in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    jittered = Backoff(base_seconds=4, factor=2, max_seconds=100, jitter=0.5)
    rng = random.Random(1)
    delays = [jittered.delay(2, rng).total_seconds() for _ in range(200)]
    assert all(4 <= d <= 8 for d in delays)
    assert max(delays) - min(delays) > 2


def test_micros_round_trip_and_months() -> None:
    moment = datetime(2026, 3, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    assert from_micros(to_micros(moment)) == moment
    assert month_of(moment) == "2026-03"
    assert month_of(moment + timedelta(microseconds=1)) == "2026-04"
    with pytest.raises(ValueError, match="naive"):
        to_micros(datetime(2026, 1, 1))


def test_migrations_are_numbered_and_render_for_both_databases() -> None:
    shipped = migrations()
    assert [n for n, _ in shipped] == list(range(1, len(shipped) + 1))
    for _, text in shipped:
        for dialect in (SQLITE, POSTGRES):
            rendered = dialect.render_migration(text)
            assert "{{" not in rendered
            assert all(stmt.split()[0] == "CREATE" for stmt in split_statements(rendered))


def test_placeholders_are_rewritten_for_sqlite_only() -> None:
    query = "SELECT * FROM t WHERE a = $1 AND b = $12"
    assert SQLITE.sql(query) == "SELECT * FROM t WHERE a = ?1 AND b = ?12"
    assert POSTGRES.sql(query) == query
