"""What differs between the SQL databases behind the store, in one small record."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

_PLACEHOLDER = re.compile(r"\$(\d+)")
MIGRATIONS_DIR = Path(__file__).with_name("migrations")


@dataclass(frozen=True, slots=True)
class Dialect:
    """SQL fragments that differ per database. Queries are written with ``$n``."""

    name: str
    id_column: str
    blob_type: str
    key_type: str
    for_update: str
    skip_locked: str
    numbered_param: str

    def sql(self, query: str) -> str:
        """Rewrite ``$n`` placeholders into this database's numbered form."""
        if self.numbered_param == "$":
            return query
        return _numbered(query, self.numbered_param)

    def render_migration(self, text: str) -> str:
        """Fill a migration's ``{{ID}}``, ``{{BLOB}}`` and ``{{KEY}}`` slots."""
        return (
            text.replace("{{ID}}", self.id_column)
            .replace("{{BLOB}}", self.blob_type)
            .replace("{{KEY}}", self.key_type)
        )


@functools.lru_cache(maxsize=2048)
def _numbered(query: str, param: str) -> str:
    """``query`` with ``$n`` written ``<param>n`` (memoized: the store's queries are a
    fixed set of strings, rewritten on every statement otherwise)."""
    return _PLACEHOLDER.sub(lambda m: f"{param}{m.group(1)}", query)


SQLITE = Dialect(
    name="sqlite",
    id_column="INTEGER PRIMARY KEY AUTOINCREMENT",
    blob_type="BLOB",
    key_type="TEXT",
    for_update="",
    skip_locked="",
    numbered_param="?",
)

POSTGRES = Dialect(
    name="postgres",
    id_column="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    blob_type="BYTEA",
    key_type='TEXT COLLATE "C"',
    for_update=" FOR UPDATE",
    skip_locked=" FOR UPDATE SKIP LOCKED",
    numbered_param="$",
)


def migrations() -> list[tuple[int, str]]:
    """Numbered migrations shipped with this code, ascending: ``NNNN_name.sql``."""
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        number = int(path.name.split("_", 1)[0])
        found.append((number, path.read_text(encoding="utf-8")))
    numbers = [n for n, _ in found]
    if numbers != list(range(1, len(numbers) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..N without gaps, found {numbers}")
    return found


def split_statements(script: str) -> list[str]:
    """Split a migration into statements (our migrations keep ';' out of literals)."""
    body = "\n".join(line for line in script.splitlines() if not line.strip().startswith("--"))
    return [stmt.strip() for stmt in body.split(";") if stmt.strip()]
