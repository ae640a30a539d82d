"""PostgreSQL backend (asyncpg): a connection pool, JSONB columns, the same SQL as SQLite."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from itertools import islice
from typing import Any

import asyncpg

from core.instance import this_process
from core.store.base import (
    PRUNE_CHUNK,
    DatabaseTakenOver,
    Store,
    StoreError,
    StoreUnavailable,
    WriteOp,
    causes,
    dumps,
)

log = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(r"\?")
_converted: dict[str, str] = {}
# The advisory lock that serialises migration runners on one database (see core.store.migrate).
_MIGRATION_LOCK_KEY = 0x70726F70_6D696772  # "propmigr"
# The session-level advisory lock a manager holds on its database for its life (see
# PostgresStore.open). pg_locks shows a bigint key as classid (high half) and objid (low half).
_MANAGER_LOCK_KEY = 0x70726F70_6D6E6772  # "propmngr"
_MANAGER_LOCK_HOLDER = (
    "SELECT a.application_name, host(a.client_addr), a.backend_start, l.pid FROM pg_locks l "
    "LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
    f"AND l.classid = {_MANAGER_LOCK_KEY >> 32} AND l.objid = {_MANAGER_LOCK_KEY & 0xFFFFFFFF} "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)
# How long PostgreSQL may take to answer a statement, or to accept a new connection, before the
# connection is given up as lost. A connection that silently stops answering (a network partition, a
# NAT that dropped its state, a host gone: no RST, no FIN) is otherwise noticed only when the kernel
# stops retransmitting, after about 15 minutes, and the writer's batch waits on it all that time.
# asyncpg's command_timeout and connect timeout, not TCP keepalive or TCP_USER_TIMEOUT: asyncpg does
# not set those, and they act only when the far end's kernel stops acknowledging, which a stalled
# server or a proxy that stops forwarding does not. Far above what the manager's statements take (a
# batch of 2,000 writes commits in well under a second); one that does take longer is given up and
# retried like any other write the database could not take.
ANSWER_TIMEOUT = 10.0
# How long an upkeep statement (a migration, e.g. an index build on a large table, a wait for another
# manager's migrations, metrics pruning) may run: the server cancels it after this long
# (statement_timeout), and the connection is given up as lost only when the server has not answered
# ANSWER_TIMEOUT after that. Under ANSWER_TIMEOUT, such a statement was killed at 10 s and reported as
# a lost connection, and a migration that needs longer could never complete.
MAINTENANCE_TIMEOUT = 1800.0
# How often the lock's connection is checked when nothing was heard from it; the check itself may
# take ANSWER_TIMEOUT. An idle manager notices a silent connection within the sum of the two.
LOCK_CHECK_INTERVAL = 5.0
# How many times the manager lock is tried when each attempt finds it held and then free (see
# _take_manager_lock); beyond that, whoever takes and drops it so often is reported as its holder.
_LOCK_ATTEMPTS = 5

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
    StoreUnavailable,  # this store's own "not now" (a write while the manager lock is being taken again)
)

# Owners one prune statement looks at: the first statement's, and the most. Between the two, each
# statement takes as many as the one before covered in a quarter of a prune slice, and at most twice
# as many as it: an owner costs its index walk up to the `keep`-th sample (0.01 ms for 50 samples,
# 0.16 ms for 1,000), so owners of more samples than the ones before make a statement longer.
PRUNE_OWNERS_FIRST = 100
PRUNE_OWNERS_MAX = 1000


def _prune_sql(table: str, column: str) -> str:
    """Delete, of the owners in an array (parameters: owners, keep, PRUNE_CHUNK), the samples older
    than each one's `keep`-th newest, the first PRUNE_CHUNK of them in the array's order; answer how
    many were found and deleted and the array position of the last owner found. Many owners a
    statement because each statement is a round trip: one per owner took 3.6 s for the 20,200 owners
    of a store's first prune (benchmarks/bench_prune.py).

    Each owner is a walk of idx_<table>_newest (migration 5) past its `keep` newest; unnest's
    ordinality is the order the walks run in, so ORDER BY it costs no sort and the LIMIT ends the
    statement at the PRUNE_CHUNK-th sample found. The ids go to the DELETE as an array: an index scan
    of the primary key whatever the planner guesses of their number."""
    return (f"WITH doomed AS MATERIALIZED (SELECT o.n, old.id FROM unnest(?::text[]) WITH ORDINALITY AS o(owner, n) "
            f"CROSS JOIN LATERAL (SELECT id FROM {table} WHERE {column} = o.owner "
            "ORDER BY timestamp DESC, id DESC OFFSET ?) AS old ORDER BY o.n LIMIT ?), "
            f"gone AS (DELETE FROM {table} WHERE id = ANY (ARRAY(SELECT id FROM doomed)) RETURNING 1) "
            "SELECT (SELECT count(*) FROM doomed), (SELECT max(n) FROM doomed), (SELECT count(*) FROM gone)")


def _pg(sql: str) -> str:
    """`?` placeholders to `$1, $2, ...` (cached: the same few statements run all the time)."""
    out = _converted.get(sql)
    if out is None:
        counter = iter(range(1, 10_000))
        out = _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)
        _converted[sql] = out
    return out


class NoAnswer(TimeoutError):
    """PostgreSQL did not answer within ANSWER_TIMEOUT; the connection was given up (an OSError, so a
    transient failure: the writer tries its batch again, a read answers "unavailable")."""


@contextmanager
def _given_up_when_silent(conn: asyncpg.Connection, limit: float | None = None) -> Iterator[None]:
    """End `conn` when a statement on it times out. asyncpg would first send a cancel request and wait
    for it, for as long again, over a connection of its own that takes the same silent road; a
    connection that did not answer is not trusted again anyway (its session may still run the
    statement, so the next one could not start before that ends)."""
    try:
        yield
    except TimeoutError as exc:
        if isinstance(exc, NoAnswer):  # a statement's own guard, inside this one, ended the connection
            raise
        conn.terminate()
        raise NoAnswer(f"no answer within {limit or ANSWER_TIMEOUT:g} s; the connection was given up as lost") from exc


class _Conn:
    __slots__ = ("conn", "timeout")

    def __init__(self, conn: asyncpg.Connection, timeout: float | None = None) -> None:
        self.conn = conn
        # None: the pool's command_timeout, ANSWER_TIMEOUT (see maintenance for the others)
        self.timeout = timeout

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with _given_up_when_silent(self.conn, self.timeout):
            status = await self.conn.execute(_pg(sql), *params, timeout=self.timeout)
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with _given_up_when_silent(self.conn, self.timeout):
            await self.conn.executemany(_pg(sql), rows, timeout=self.timeout)

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with _given_up_when_silent(self.conn, self.timeout):
            return list(await self.conn.fetch(_pg(sql), *params, timeout=self.timeout))


def _is_closed(conn: asyncpg.Connection) -> bool:
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:  # a pool's connection that terminate() handed back to the pool
        return True


async def _init_connection(conn: asyncpg.Connection) -> None:
    # JSON travels as text both ways, exactly as with SQLite; the shared code encodes and decodes.
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename, encoder=lambda v: v if isinstance(v, str) else dumps(v),
            decoder=lambda v: v, schema="pg_catalog", format="text",
        )


def _is_transient(exc: BaseException) -> bool:
    # asyncpg reports a connection lost under a transaction as an InterfaceError ("the underlying
    # connection is closed") raised while handling the ConnectionDoesNotExistError.
    return any(isinstance(e, _TRANSIENT) or (isinstance(e, asyncpg.InterfaceError) and "closed" in str(e))
               for e in causes(exc))


def _quiet_pool_reconnects(record: logging.LogRecord) -> bool:
    """asyncpg's pool logs each failed attempt to reconnect its idle connections as a warning with a
    35-line traceback, every 1 to 4 s for as long as the server is away: an outage of ten minutes
    wrote hundreds of them. The store writer says once that the database is unreachable and once
    that it is back; a failure of another kind (a password refused, a database dropped) still shows."""
    if record.exc_info and str(record.msg).startswith("Failed to restore the pool connection floor"):
        exc = record.exc_info[1]
        return exc is None or not _is_transient(exc)
    return True


class PostgresStore(Store):
    dialect = "postgres"
    _IN_LIST = "= ANY(?::text[])"

    def _list_param(self, values: Sequence[str]) -> Any:
        return list(values)

    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 10, one_manager: bool = False) -> None:
        self.dsn = dsn
        self._pool: asyncpg.Pool | None = None
        self._min = min_size
        self._max = max_size
        # A manager's store: open() takes the manager lock or refuses (see _take_manager_lock).
        self.one_manager = one_manager
        # The connection (outside the pool) whose session holds the manager lock; None while the
        # lock is not held, and then no batch is applied.
        self._lock_conn: asyncpg.Connection | None = None
        # The server process of the lock's latest session. After a silent loss the server may keep
        # that session, and the lock with it, until its own TCP keepalive gives up (two hours by
        # default): taking the lock again ends it (see _take_manager_lock).
        self._lock_pid: int | None = None
        self._lock_lost = asyncio.Event()
        # Held while a batch runs on the lock's connection (see apply); one use at a time.
        self._lock_conn_busy = asyncio.Lock()
        self._closing = False
        self._prune_owners_per_statement = PRUNE_OWNERS_FIRST

    def is_transient(self, exc: BaseException) -> bool:
        return _is_transient(exc)

    @property
    def description(self) -> str:
        safe = re.sub(r"//([^:@/]+):[^@/]*@", r"//\1:***@", self.dsn)
        return f"postgres {safe}"

    async def open(self) -> None:
        self._closing = False
        logging.getLogger("asyncpg.pool").addFilter(_quiet_pool_reconnects)  # once: filters are a set
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=self._min, max_size=self._max, init=_init_connection,
                timeout=ANSWER_TIMEOUT, command_timeout=ANSWER_TIMEOUT,
            )
            if self.one_manager:
                holder = await self._take_manager_lock()
                if holder is not None:
                    await self.close()
                    raise StoreError(
                        f"Another Propeller manager is using the database ({self.description}): {holder}. "
                        "Stop it first (or use that one: its REST API and broker serve proplets and clients), "
                        "or give this manager a database of its own (MANAGER_POSTGRES_DB), and its own "
                        "MANAGER_HTTP_PORT and MANAGER_ENTITY_ID.")
        except (OSError, asyncpg.PostgresError) as exc:
            await self.close()
            # A server that accepts the connection and never answers ends in asyncpg's connect timeout
            # (ANSWER_TIMEOUT), a TimeoutError with no text of its own.
            reason = str(exc) or (f"the server accepted the connection but did not answer within "
                                  f"{ANSWER_TIMEOUT:g} s" if isinstance(exc, TimeoutError) else type(exc).__name__)
            raise StoreError(
                f"Cannot connect to PostgreSQL ({self.description}): {reason}. Check that the server runs "
                "and the MANAGER_POSTGRES_* settings (host, port, user, password, database)."
            ) from exc

    async def close(self) -> None:
        self._closing = True
        if self._lock_conn is not None:
            conn, self._lock_conn = self._lock_conn, None
            try:
                await conn.close(timeout=5)  # ends the session, which releases the lock
            except Exception:
                conn.terminate()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    # ---- the one-manager lock -------------------------------------------------------------

    async def _take_manager_lock(self) -> str | None:
        """Take the manager lock on a connection of its own; None when taken, else who holds it.

        Two managers on one database would both recover and dispatch its queued tasks. A
        session-level advisory lock is held as long as its connection lives, and PostgreSQL drops it
        when the holder goes away however it goes (a crash, a lost host), so no stale lock is left;
        but a client that vanished without a word is noticed by the server only when its TCP
        keepalive gives up, so a session of this manager's that the manager gave up as silent may
        still hold the lock: it is ended here (raising StoreUnavailable, so that the caller tries
        again). The connection's application_name says who holds it, for the refusal another manager
        shows."""
        name = this_process()[:63]
        conn = await asyncpg.connect(self.dsn, timeout=ANSWER_TIMEOUT, command_timeout=ANSWER_TIMEOUT,
                                     server_settings={"application_name": name})
        try:
            # A holder that lets go between the attempt and the look-up (this manager's own earlier
            # session, ended a moment ago, most often) leaves no row: the lock is tried again then.
            # Read as "another manager holds it", that stopped a manager whose lock's connection had
            # merely been replaced, or refused to start one.
            for _ in range(_LOCK_ATTEMPTS):
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", _MANAGER_LOCK_KEY):
                    break
                rows = await self._lock_holder(conn)
                if rows:
                    if self._lock_pid is not None and (rows[0][0], rows[0][3]) == (name, self._lock_pid):
                        await self._end_own_session(conn, self._lock_pid)
                    await conn.close()
                    return self._holder(rows)
            else:
                await conn.close()
                return self._holder([])
            await _init_connection(conn)  # batches run on it (see apply)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._lock_connection_ended)
        self._lock_conn = conn
        self._lock_pid = conn.get_server_pid()
        self._lock_lost.clear()
        return None

    async def _lock_holder(self, conn: asyncpg.Connection) -> list[Any]:
        """The session holding the manager lock (application name, address, start, server process),
        or no row when none does."""
        return list(await conn.fetch(_MANAGER_LOCK_HOLDER))

    async def _end_own_session(self, conn: asyncpg.Connection, pid: int) -> None:
        """End this manager's earlier lock session, which the server has not yet found gone. It runs
        nothing that could still commit: a batch it was running is rolled back, and the writer tries
        that batch again on the new session."""
        try:
            ended = await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        except asyncpg.PostgresError as exc:  # e.g. a role that may not signal its own sessions
            ended, why = False, str(exc)
        else:
            why = "" if ended else "it had ended meanwhile"
        log.warning("this manager's lock on %s is still held by its own earlier session (server process %d), "
                    "which the server has not yet found gone; %s", self.description, pid,
                    "ended it" if ended else f"could not end it ({why}); waiting for the server to drop it")
        raise StoreUnavailable(f"This manager's lock on the database ({self.description}) is still held by "
                               f"its own earlier session (server process {pid}); taking it again.")

    @staticmethod
    def _holder(rows: list[Any]) -> str:
        if not rows:  # released between each of our attempts and its look-up
            return (f"a session that released it between each of {_LOCK_ATTEMPTS} attempts and the look-up "
                    "of its holder (start this one again)")
        name, address, since, pid = rows[0]
        who = name or f"a session that did not name itself (server process {pid})"
        where = f"connected from {address}" if address else "connected through a local socket"
        when = f" since {since:%Y-%m-%d %H:%M:%S %Z}" if since is not None else ""
        return f"{who}, {where}{when}"

    def _lock_connection_ended(self, conn: asyncpg.Connection) -> None:
        if conn is not self._lock_conn or self._closing:
            return
        self._lock_conn = None
        self._lock_lost.set()
        log.warning("the connection holding this manager's lock on %s was lost; writes wait until the lock "
                    "is taken again", self.description)

    @property
    def holds_manager_lock(self) -> bool:
        return not self.one_manager or self._lock_conn is not None

    async def keep_manager_lock(self) -> None:
        """Take the manager lock again whenever its connection is lost (a server restart ends every
        session, and with it the lock). Writes wait meanwhile (apply() raises StoreUnavailable, so
        the writer retries them). If another manager took the lock meanwhile, it has recovered the
        database as its own: raise DatabaseTakenOver, which stops this manager."""
        if not self.one_manager:
            return
        while True:
            try:
                async with asyncio.timeout(LOCK_CHECK_INTERVAL):
                    await self._lock_lost.wait()
            except TimeoutError:
                await self._check_lock_connection()
                continue
            await self._retake_manager_lock()

    async def _check_lock_connection(self) -> None:
        """A connection cut without a word (a host or network gone) is noticed only when used."""
        conn = self._lock_conn
        if conn is None or self._lock_conn_busy.locked():  # a batch under way uses it, and sees a loss
            return
        async with self._lock_conn_busy:  # a batch must not find the connection in use (asyncpg refuses)
            try:
                await conn.fetchval("SELECT 1", timeout=ANSWER_TIMEOUT)
            except Exception as exc:
                log.debug("the manager lock's connection failed its check", exc_info=exc)
                conn.terminate()  # the termination listener marks the lock lost

    async def _retake_manager_lock(self) -> None:
        lost_at = time.monotonic()
        delay = 0.1
        while True:
            try:
                holder = await self._take_manager_lock()
            except Exception as exc:
                if not self.is_transient(exc):
                    raise StoreError(f"Cannot take this manager's lock on the database ({self.description}) "
                                     f"again: {exc}. Check the MANAGER_POSTGRES_* settings and restart the "
                                     "manager.") from exc
                await asyncio.sleep(delay)
                # At most 0.5 s (a refused connection costs nothing): writes wait for the lock, and
                # the writer's next retry should find it taken.
                delay = min(delay * 2, 0.5)
                continue
            if holder is not None:
                raise DatabaseTakenOver(
                    f"Another Propeller manager took the database ({self.description}) while this one's "
                    f"connection to it was lost: {holder}. This manager stops so that only one manager "
                    "dispatches its tasks. Use that one, or stop it and start this one again (or give this "
                    "one a database of its own with MANAGER_POSTGRES_DB).")
            log.warning("took this manager's lock on %s again after %.1f s", self.description,
                        time.monotonic() - lost_at)
            return

    async def apply(self, ops: Sequence[WriteOp]) -> None:
        if not self.one_manager:
            await super().apply(ops)
            return
        # A manager's batches run in the session that holds the lock: one that commits was committed
        # under the lock. (On a pool connection, a batch under way when the lock's session ended
        # committed even after another manager had taken the database over.) While the lock is not
        # held the writer keeps the batch and tries again.
        async with self._lock_conn_busy:
            conn = self._lock_conn
            if conn is None:
                raise StoreUnavailable(f"This manager's lock on the database ({self.description}) is being "
                                       "taken again after its connection was lost.")
            await self._apply_in(self._transaction_on(conn), ops)

    @staticmethod
    @asynccontextmanager
    async def _transaction_on(conn: asyncpg.Connection, *, upkeep: bool = False) -> AsyncIterator[_Conn]:
        """A transaction on `conn`; an `upkeep` one lets its statements run MAINTENANCE_TIMEOUT."""
        transaction = conn.transaction()
        try:
            with _given_up_when_silent(conn):  # BEGIN and COMMIT; the statements' own in _Conn
                await transaction.start()
                try:
                    if upkeep:
                        await conn.execute(f"SET LOCAL statement_timeout = {int(MAINTENANCE_TIMEOUT * 1000)}")
                        yield _Conn(conn, MAINTENANCE_TIMEOUT + ANSWER_TIMEOUT)
                    else:
                        yield _Conn(conn)
                except BaseException:
                    # A connection given up (NoAnswer) has no transaction left to roll back: its own
                    # error says why, not a failed ROLLBACK's "the connection is closed".
                    if not _is_closed(conn):
                        await transaction.rollback()
                    raise
                await transaction.commit()
        except asyncpg.InternalClientError as exc:
            # asyncpg's protocol out of step with a session the server ended under it ("cannot switch
            # to state 15; another operation (2) is in progress" from a COMMIT as PostgreSQL shut
            # down): the connection is unusable, and a COMMIT's fate unknown. Taken for a refusal,
            # the batch was dropped; as a lost connection it is tried again (a no-op if it was stored).
            conn.terminate()
            raise StoreUnavailable(f"the connection to the database broke ({exc})") from exc

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
        async with self._pool.acquire() as conn, self._transaction_on(conn) as in_transaction:
            yield in_transaction

    @asynccontextmanager
    async def maintenance(self, what: str) -> AsyncIterator[_Conn]:
        """A transaction whose statements the server cancels after MAINTENANCE_TIMEOUT (a slow
        statement is not a lost connection: that is still given up ANSWER_TIMEOUT later)."""
        assert self._pool is not None, "store is not open"
        try:
            async with self._pool.acquire() as conn, self._transaction_on(conn, upkeep=True) as in_transaction:
                yield in_transaction
        except asyncpg.QueryCanceledError as exc:
            raise StoreError(
                f"{what[:1].upper()}{what[1:]} did not finish within {MAINTENANCE_TIMEOUT:g} s on the database "
                f"({self.description}) and was cancelled ({exc}). Look for a session holding locks on its "
                "tables (pg_stat_activity), or run it by hand when the database is less busy.") from exc

    async def _prune_slice(self, table: str, column: str, owners: deque[str], keep: int) -> int:
        """As Store._prune_slice, with many owners per statement (see _prune_sql)."""
        sql = _prune_sql(table, column)
        deleted = 0
        async with self.maintenance("pruning metrics") as conn:
            deadline = time.perf_counter() + self._prune_slice_seconds
            while owners:
                batch = list(islice(owners, self._prune_owners_per_statement))
                started = time.perf_counter()
                found, last, count = (await conn.fetch(sql, (batch, keep, PRUNE_CHUNK)))[0]
                took = time.perf_counter() - started
                deleted += count
                # A statement that found PRUNE_CHUNK samples stopped at the owner of the last one:
                # those before it are done, it may have more, those after it were not looked at.
                # (Found, not deleted: a sample deleted meanwhile with its task still counts.)
                looked_at = len(batch) if found < PRUNE_CHUNK else last
                for _ in range(looked_at if found < PRUNE_CHUNK else last - 1):
                    owners.popleft()
                wanted = int(looked_at * self._prune_slice_seconds / 4 / max(took, 1e-4))
                self._prune_owners_per_statement = max(1, min(PRUNE_OWNERS_MAX, 2 * len(batch), wanted))
                if time.perf_counter() >= deadline:
                    break
        return deleted

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
