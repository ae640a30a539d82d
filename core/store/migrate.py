"""One migration runner for both SQL backends.

Migrations are numbered files in `migrations/`: `0001_create_tables.sqlite.sql` and
`0001_create_tables.postgres.sql` (a dialect pair where the syntax differs) or a plain
`0002_x.sql` shared by both. The id recorded in `schema_migrations` is the number without leading
zeros plus the name (`1_create_tables`), the same on both backends. Each migration runs in its own
transaction together with its tracking row. Statements are idempotent (`IF NOT EXISTS`), so a
database whose tables exist without a tracking row (half-applied, or created by hand) heals.

Several managers may start against one database at once: each migration's transaction first takes
the backend's migration lock (PostgreSQL: an advisory lock; SQLite: BEGIN IMMEDIATE) and looks at
the tracking table again, so a migration another manager applied meanwhile is skipped, not re-run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Protocol

_FILE = re.compile(r"^(\d+)_([a-z0-9_]+?)(?:\.(sqlite|postgres))?\.sql$")

TRACKING_TABLE = "schema_migrations"


@dataclass(frozen=True, slots=True)
class Migration:
    id: str
    number: int
    sql: str

    def statements(self) -> list[str]:
        lines = [ln for ln in self.sql.splitlines() if not ln.strip().startswith("--")]
        return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def load_migrations(dialect: str) -> list[Migration]:
    """Migrations for `dialect`, in order. A dialect-specific file wins over a shared one."""
    chosen: dict[int, tuple[str, str, bool]] = {}
    for entry in resources.files("core.store").joinpath("migrations").iterdir():
        m = _FILE.match(entry.name)
        if not m:
            continue
        number, name, file_dialect = int(m.group(1)), m.group(2), m.group(3)
        if file_dialect not in (None, dialect):
            continue
        specific = file_dialect is not None
        if number in chosen and chosen[number][0] != name:
            raise RuntimeError(f"two migrations share number {number}: {chosen[number][0]} and {name}")
        if number not in chosen or specific:
            chosen[number] = (name, entry.read_text(), specific)
    return [Migration(f"{n}_{name}", n, sql) for n, (name, sql, _) in sorted(chosen.items())]


class MigrationTarget(Protocol):
    """What a backend offers the runner."""

    dialect: str

    async def applied_migrations(self) -> set[str]: ...

    async def apply_migration(self, migration: Migration) -> bool:
        """Run every statement and record the id, all in one transaction; False when another
        runner recorded it first (nothing is run then)."""


async def migrate(target: MigrationTarget) -> list[str]:
    """Apply pending migrations; return the ids applied now (empty when up to date)."""
    done = await target.applied_migrations()
    applied = []
    for migration in load_migrations(target.dialect):
        if migration.id in done:
            continue
        if await target.apply_migration(migration):
            applied.append(migration.id)
    return applied
