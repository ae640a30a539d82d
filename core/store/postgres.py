"""PostgreSQL backend (asyncpg): a connection pool, JSONB columns, the same SQL as SQLite."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg

from core.store.base import Store, StoreError, StoreUnavailable, causes, dumps

_PLACEHOLDER = re.compile(r"\?")
_converted: dict[str, str] = {}
# The advisory lock that serialises migration runners on one database (see core.store.migrate).
_MIGRATION_LOCK_KEY = 0x70726F70_6D696772  # "propmigr"

# The server is away or going away (SQLSTATE classes 08 and 57P01-03), has no connection slot
# free (53300), or gave up a transaction that may succeed when run again (class 40).
_TRANSIENT = (
    OSError,  # refused, reset, timed out (TimeoutError is an OSError)
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.TransactionRollbackError,
)


def _pg(sql: str) -> str:
    """`?` placeholders to `$1, $2, ...` (cached: the same few statements run all the time)."""
    out = _converted.get(sql)
    if out is None:
        counter = iter(range(1, 10_000))
        out = _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)
        _converted[sql] = out
    return out


class _Conn:
    __slots__ = ("conn",)

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        status = await self.conn.execute(_pg(sql), *params)
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self.conn.executemany(_pg(sql), rows)

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(await self.conn.fetch(_pg(sql), *params))


async def _init_connection(conn: asyncpg.Connection) -> None:
    # JSON travels as text both ways, exactly as with SQLite; the shared code encodes and decodes.
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename, encoder=lambda v: v if isinstance(v, str) else dumps(v),
            decoder=lambda v: v, schema="pg_catalog", format="text",
        )


class PostgresStore(Store):
    dialect = "postgres"
    _IN_LIST = "= ANY(?::text[])"

    def _list_param(self, values: Sequence[str]) -> Any:
        return list(values)

    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 10) -> None:
        self.dsn = dsn
        self._pool: asyncpg.Pool | None = None
        self._min = min_size
        self._max = max_size

    def is_transient(self, exc: BaseException) -> bool:
        # asyncpg reports a connection lost under a transaction as an InterfaceError ("the underlying
        # connection is closed") raised while handling the ConnectionDoesNotExistError.
        return any(isinstance(e, _TRANSIENT) or (isinstance(e, asyncpg.InterfaceError) and "closed" in str(e))
                   for e in causes(exc))

    @property
    def description(self) -> str:
        safe = re.sub(r"//([^:@/]+):[^@/]*@", r"//\1:***@", self.dsn)
        return f"postgres {safe}"

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=self._min, max_size=self._max, init=_init_connection
            )
        except (OSError, asyncpg.PostgresError) as exc:
            # A server that accepts the connection and never answers ends in asyncpg's connect timeout
            # (60 s unless the DSN sets connect_timeout), a TimeoutError with no text of its own.
            reason = str(exc) or ("the server accepted the connection but did not answer in time"
                                  if isinstance(exc, TimeoutError) else type(exc).__name__)
            raise StoreError(
                f"Cannot connect to PostgreSQL ({self.description}): {reason}. Check that the server runs "
                "and the MANAGER_POSTGRES_* settings (host, port, user, password, database)."
            ) from exc

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[_Conn]:
        assert self._pool is not None, "store is not open"
        try:
            async with self._pool.acquire() as conn:
                yield _Conn(conn)
        except Exception as exc:
            # A read while the server is away: the caller (the REST API answers 503) is told so
            # plainly; the pool connects again by itself on a later acquire.
            if self.is_transient(exc):
                raise StoreUnavailable(
                    f"The database ({self.description}) cannot be reached ({str(exc) or type(exc).__name__}). "
                    "Try again shortly: the manager reconnects by itself once the server is back.") from exc
            raise

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Conn]:
        assert self._pool is not None, "store is not open"
        async with self._pool.acquire() as conn, conn.transaction():
            yield _Conn(conn)

    async def lock_migrations(self, conn: Any) -> None:
        # A transaction-level advisory lock: released at commit or rollback, even if the
        # connection is lost. The key is arbitrary but fixed ("propeller migrations").
        await conn.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK_KEY,))

    def ts_in(self, value: datetime | None) -> Any:
        return value

    def ts_out(self, value: Any) -> datetime | None:
        return value

    def metadata_clause(self, metadata: dict[str, Any]) -> tuple[str, list[Any]]:
        return "metadata @> ?::jsonb", [dumps(metadata)]

    async def schema(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        async with self.connection() as conn:
            cols = await conn.fetch(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema()"
            )
            idx = await conn.fetch(
                "SELECT tablename, indexname FROM pg_indexes WHERE schemaname = current_schema() "
                "AND indexname NOT LIKE '%_pkey'"
            )
        for table, column in cols:
            out.setdefault(table, {"columns": [], "indexes": []})["columns"].append(column)
        for table, index in idx:
            out.setdefault(table, {"columns": [], "indexes": []})["indexes"].append(index)
        for entry in out.values():
            entry["columns"].sort()
            entry["indexes"].sort()
        return out
