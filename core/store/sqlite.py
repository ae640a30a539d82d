"""SQLite backend (aiosqlite), the default: WAL, one connection, writes batched by the writer."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from core.instance import HeldElsewhere, hold_lock_file
from core.store.base import PRUNE_CHUNK, Store, StoreError, WriteOp, causes, plan

# Another process holds the file (BUSY, LOCKED), the disk failed a read or write (IOERR) or is full
# (FULL): the same statements may succeed later.
_TRANSIENT_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL})

T = TypeVar("T")

# housekeeping() copies the write-ahead log into the database every second with a PASSIVE checkpoint,
# which never waits for the writer. But the log starts over (and stops growing) only when a
# checkpoint has copied all of it before the next write, which steady writes (a fleet's heartbeats
# and metrics) never allow: under 200 heartbeats/s and 1,000 tasks/s the log reached 827 MB beside a
# 39 MB database, and grew without end. Past this size the last frames are copied holding the write
# lock, so the next write starts the log over; the file is then cut back to this size. The writes
# wait for that copy and the fsync that ends it (10-35 ms measured under that load), so it is done
# at most once per WAL_RESTART_INTERVAL: the log stays under this size plus that many seconds of
# writes (at most ~260 MB with a 10 s interval under that load, where writes filled ~25 MB/s).
WAL_RESTART_BYTES = 16 * 1024 * 1024
WAL_RESTART_INTERVAL = 5.0
# Before taking the lock, more PASSIVE checkpoints (at most this many) until at most this much is left.
WAL_CATCH_UP_PASSES = 4
WAL_CATCH_UP_BYTES = 256 * 1024

_JSON_TYPE = {None: "null", True: "true", False: "false"}


def _contains(row: str, value: Any, depth: int) -> tuple[str, list[Any]]:
    """A condition that the JSON value of json_each row `row` contains `value` (PostgreSQL's jsonb
    containment: an object contains the keys it is given, an array each element it is given, in
    any place; scalars are equal, numbers by value)."""
    if value is None or isinstance(value, bool):
        return f"{row}.type = ?", [_JSON_TYPE[value]]
    if isinstance(value, (int, float)):
        return f"{row}.type IN ('integer', 'real') AND {row}.atom = ?", [value]
    if isinstance(value, str):
        return f"{row}.type = 'text' AND {row}.atom = ?", [value]
    inner = f"je{depth}"
    clauses = [f"{row}.type = ?"]
    params: list[Any] = ["object" if isinstance(value, dict) else "array"]
    items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
    for key, item in items:
        sql, p = _contains(inner, item, depth + 1)
        if key is None:
            clauses.append(f"EXISTS (SELECT 1 FROM json_each({row}.value) AS {inner} WHERE {sql})")
            params.extend(p)
        else:
            clauses.append(f"EXISTS (SELECT 1 FROM json_each({row}.value) AS {inner} WHERE {inner}.key = ? AND {sql})")
            params.extend([key, *p])
    return " AND ".join(clauses), params


class _Conn:
    __slots__ = ("db",)

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        cursor = await self.db.execute(sql, params)
        count = cursor.rowcount
        await cursor.close()
        return count

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self.db.executemany(sql, rows)

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(await self.db.execute_fetchall(sql, params))


def _prune_sql(table: str, column: str) -> str:
    """Delete up to PRUNE_CHUNK samples of one owner older than its `keep`-th newest (parameters: owner,
    owner, keep - 1, PRUNE_CHUNK): a walk of idx_<table>_newest (migration 5), nothing when the owner
    has `keep` samples or fewer. A statement per owner: in-process it costs no round trip (and SQLite
    has no LATERAL join, with which PostgreSQL's statement walks many owners' indexes in one)."""
    return (f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE {column} = ? AND (timestamp, id) < "
            f"(SELECT timestamp, id FROM {table} WHERE {column} = ? ORDER BY timestamp DESC, id DESC "
            "LIMIT 1 OFFSET ?) LIMIT ?)")


class SqliteStore(Store):
    dialect = "sqlite"
    # A prune's slice holds the one connection: every write waits for it.
    _prune_slice_seconds = 0.002

    def __init__(self, path: Path | str, *, one_manager: bool = False) -> None:
        # ":memory:" is the throw-away database of MANAGER_STORAGE_TYPE=memory.
        self.path = str(path)
        # A manager's store: open() refuses a file another manager process holds (see _hold_for_manager).
        self.one_manager = one_manager
        self._manager_lock: int | None = None
        self._db: aiosqlite.Connection | None = None
        self._checkpointer: aiosqlite.Connection | None = None
        # One connection: another writer's statements must not land inside a transaction.
        self._lock = asyncio.Lock()
        self.wal_restart_bytes = WAL_RESTART_BYTES
        self.wal_restart_interval = WAL_RESTART_INTERVAL
        self._wal_restarted_at = -WAL_RESTART_INTERVAL
        self._page_size = 4096

    @property
    def description(self) -> str:
        return "sqlite (in memory)" if self.path == ":memory:" else f"sqlite {self.path}"

    async def open(self) -> None:
        advice = "Check that the directory is writable or set MANAGER_SQLITE_PATH to another file."
        if self.path != ":memory:":
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a regular file where a directory of the path should be, say
                raise StoreError(f"Cannot open the SQLite database at {self.path} (cannot create its "
                                 f"directory: {exc.strerror or exc}). {advice}") from exc
            if self.one_manager:
                self._hold_for_manager()
        connecting = aiosqlite.connect(self.path, isolation_level=None)
        try:
            db = await connecting
        except sqlite3.Error as exc:
            # aiosqlite stops its worker thread after a failed open, and the thread then answers on
            # this loop: wait for it, or a loop closed meanwhile (the console's core thread ends at
            # once) has it print `RuntimeError: Event loop is closed` with a traceback on the terminal.
            worker = getattr(connecting, "_thread", None)
            if worker is not None and worker.is_alive():
                await asyncio.to_thread(worker.join, 5)
            raise StoreError(f"Cannot open the SQLite database at {self.path} ({exc}). {advice}") from exc
        db.row_factory = sqlite3.Row
        # WAL with synchronous=NORMAL never corrupts the database; commits cost ~0.04 ms instead
        # of ~0.29 ms with FULL. The writer batches commits on top of that.
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.execute("PRAGMA foreign_keys=ON")
        await db.execute("PRAGMA busy_timeout=5000")
        # Checkpoints fsync the database file (10-20 ms here); inside a commit they become the
        # writer's p99. housekeeping() runs them on a second connection instead.
        await db.execute("PRAGMA wal_autocheckpoint=0")
        # The write that starts the log over cuts the file back to this (see WAL_RESTART_BYTES).
        await db.execute(f"PRAGMA journal_size_limit={self.wal_restart_bytes}")
        self._page_size = (await db.execute_fetchall("PRAGMA page_size"))[0][0]
        self._db = db

    async def close(self) -> None:
        if self._checkpointer is not None:
            await self._checkpointer.close()
            self._checkpointer = None
        if self._db is not None:
            await self._db.close()
            self._db = None
        if self._manager_lock is not None:
            os.close(self._manager_lock)  # releases the lock; the file stays, for the next manager
            self._manager_lock = None

    def _hold_for_manager(self) -> None:
        """Lock `<database>.lock` for this process, or refuse: two managers on one file both dispatch
        every queued task and answer as one MQTT client (the manager's id), taking the broker session
        from each other. The lock file names its holder for the error; the kernel drops the lock when
        the holder exits, however it exits."""
        lock_path = Path(f"{self.path}.lock")
        try:
            self._manager_lock = hold_lock_file(lock_path)
        except HeldElsewhere as held:
            raise StoreError(
                f"Another Propeller manager is using the database {self.path}: {held.holder}. Stop it first "
                "(or use that one: its REST API and broker serve proplets and clients), or give this manager "
                "a database of its own with MANAGER_SQLITE_PATH (for `propeller serve` also --sqlite-path), "
                "and its own MANAGER_HTTP_PORT and MANAGER_ENTITY_ID.") from None
        except OSError as exc:
            raise StoreError(f"Cannot open the SQLite database at {self.path} (cannot create {lock_path}: "
                             f"{exc.strerror or exc}). Check that the directory is writable or set "
                             "MANAGER_SQLITE_PATH to another file.") from exc

    async def housekeeping(self) -> None:
        """Copy the write-ahead log into the database (PASSIVE: never blocks the writer), and once
        the log is past `wal_restart_bytes`, copy what was written meanwhile holding the write lock,
        so that the next write starts the log over (see WAL_RESTART_BYTES)."""
        if self.path == ":memory:":
            return
        if self._checkpointer is None:
            self._checkpointer = await aiosqlite.connect(self.path, isolation_level=None)
        frame = self._page_size + 24  # a page and its header
        frames, copied = await self._checkpoint()
        if (frames * frame < self.wal_restart_bytes
                or time.monotonic() - self._wal_restarted_at < self.wal_restart_interval):
            return
        # Each pass copies what was written during the one before: less each time, so the copy made
        # holding the lock is small (its fsync remains: most of the 10-35 ms).
        for _ in range(WAL_CATCH_UP_PASSES):
            if (frames - copied) * frame <= WAL_CATCH_UP_BYTES:
                break
            frames, copied = await self._checkpoint()
        async with self._lock:
            await self._checkpoint()
        self._wal_restarted_at = time.monotonic()

    async def _checkpoint(self) -> tuple[int, int]:
        """A PASSIVE checkpoint: the frames in the log, and how many of them are in the database."""
        assert self._checkpointer is not None
        (_, frames, copied), = await self._checkpointer.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)")
        return int(frames), int(copied)

    def is_transient(self, exc: BaseException) -> bool:
        # By the result code, not the text: a trigger's RAISE() may say anything, and is a refusal.
        # The low byte is the primary code (SQLITE_IOERR_WRITE is SQLITE_IOERR | 3 << 8).
        return any(isinstance(e, sqlite3.Error)
                   and ((getattr(e, "sqlite_errorcode", None) or 0) & 0xFF) in _TRANSIENT_CODES
                   for e in causes(exc))

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[_Conn]:
        # Reads need no lock: aiosqlite runs statements one at a time on its thread, and a read
        # that lands inside the writer's transaction only sees writes about to be committed.
        assert self._db is not None, "store is not open"
        yield _Conn(self._db)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Conn]:
        assert self._db is not None, "store is not open"
        async with self._lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield _Conn(self._db)
            except BaseException:
                await self._db.rollback()
                raise
            else:
                await self._db.commit()

    async def _in_one_trip(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run `body` in one transaction, as one function on aiosqlite's thread (`_execute`, private
        but stable across the pinned versions): each statement sent separately is a thread hop with
        a GIL handoff (~0.1-1 ms under load)."""
        assert self._db is not None, "store is not open"
        db = self._db

        def run() -> T:
            conn = db._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = body(conn)
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
            return result

        async with self._lock:
            return await db._execute(run)

    async def apply(self, ops: Sequence[WriteOp]) -> None:
        """The whole batch (BEGIN, a few executemany and COMMIT) in one trip to aiosqlite's thread
        instead of five or more hops."""
        groups = plan(ops)

        def run(conn: sqlite3.Connection) -> None:
            for group in groups:
                if len(group) == 1:
                    conn.execute(group[0].sql, group[0].params)
                else:
                    conn.executemany(group[0].sql, [op.params for op in group])

        await self._in_one_trip(run)

    async def _prune_slice(self, table: str, column: str, owners: deque[str], keep: int) -> int:
        """As Store._prune_slice, a statement per owner, in one trip to aiosqlite's thread (as apply):
        every write waits for a slice, so a slice is kept to about 2 ms."""
        sql = _prune_sql(table, column)
        budget = self._prune_slice_seconds

        def run(conn: sqlite3.Connection) -> int:
            deleted = 0
            deadline = time.perf_counter() + budget
            while owners:
                owner = owners[0]
                count = conn.execute(sql, (owner, owner, keep - 1, PRUNE_CHUNK)).rowcount
                deleted += count
                if count < PRUNE_CHUNK:
                    owners.popleft()
                if time.perf_counter() >= deadline:
                    break
            return deleted

        return await self._in_one_trip(run)

    def ts_in(self, value: datetime | None) -> Any:
        if value is None:
            return None
        # The core's times are UTC already; astimezone is costly on the hot path.
        if value.tzinfo is not UTC:
            value = value.astimezone(UTC)
        return value.isoformat(timespec="microseconds")

    def ts_out(self, value: Any) -> datetime | None:
        if value is None:
            return None
        return datetime.fromisoformat(value)

    def metadata_clause(self, metadata: dict[str, Any]) -> tuple[str, list[Any]]:
        # JSON containment as PostgreSQL's `metadata @> filter` answers it (the filter is a JSON
        # object the metadata must contain). Comparing json_extract() with the value did not:
        # true matched 1 and 1 matched true (json_extract gives 1 for both), null matched nothing
        # (`= NULL`), and an object or array matched only the same text (keys in the same order,
        # every key and element), not one that contains it.
        clauses = []
        params: list[Any] = []
        for key, value in metadata.items():
            path = f'$."{key}"'  # keys are checked against METADATA_KEY
            if isinstance(value, (dict, list)):
                sql, p = _contains("je0", value, 1)
                clauses.append(f"EXISTS (SELECT 1 FROM json_each(metadata) AS je0 WHERE je0.key = ? AND {sql})")
                params.extend([key, *p])
            elif value is None or isinstance(value, bool):
                clauses.append("json_type(metadata, ?) = ?")
                params.extend([path, _JSON_TYPE[value]])
            elif isinstance(value, (int, float)):
                clauses.append("json_type(metadata, ?) IN ('integer', 'real') AND json_extract(metadata, ?) = ?")
                params.extend([path, path, value])
            else:
                clauses.append("json_type(metadata, ?) = 'text' AND json_extract(metadata, ?) = ?")
                params.extend([path, path, value])
        return " AND ".join(clauses), params

    async def schema(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        async with self.connection() as conn:
            tables = await conn.fetch(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
            for (table,) in tables:
                cols = await conn.fetch(f"PRAGMA table_info({table})")
                idx = await conn.fetch(
                    "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ? "
                    "AND name NOT LIKE 'sqlite_autoindex%'",
                    (table,),
                )
                out[table] = {
                    "columns": sorted(c["name"] for c in cols),
                    "indexes": sorted(i[0] for i in idx),
                }
        return out
