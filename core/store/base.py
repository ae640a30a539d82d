"""The store interface and the SQL shared by both backends.

Queries are written once with `?` placeholders; each backend adapter supplies the connection, the
placeholder style and the value conversions (booleans, timestamps, JSON). Outside the adapters
nothing knows which backend is in use.
"""

from __future__ import annotations

import abc
import re
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

import orjson

from core.cron import Schedule
from core.domain import (
    MODULE_HEAD_BYTES,
    FLRound,
    FLUpdateRecord,
    Job,
    Proplet,
    PropletMetrics,
    RoundState,
    Task,
    TaskEvent,
    TaskLimits,
    TaskMetrics,
    TaskState,
)
from core.store.migrate import TRACKING_TABLE, Migration

# Metadata filter keys are restricted like upstream's, since SQLite puts them into a JSON path.
METADATA_KEY = re.compile(r"^[a-zA-Z0-9._\-]+$")

# How deep a metadata filter's values may nest: SQLite's containment query nests a subquery per
# level, and its parser gives up ("parser stack overflow") at about eight; the same bound on both
# backends so that a filter works on either.
METADATA_FILTER_DEPTH = 6
# A task id's start, as the console shows it (8 characters) or longer: hex digits and the dashes of a UUID.
TASK_ID_PREFIX = re.compile(r"[0-9a-f-]{1,36}")
_HEX = "0123456789abcdef"


def _id_prefix_clause(id_prefix: str, params: list[Any], what: str = "task") -> str:
    """Ids that start with `id_prefix`: a range on the primary key, which both backends answer from
    its index (a bare LIKE is a full scan on PostgreSQL outside the C collation), then LIKE for
    exactness. The prefix holds hex digits and dashes only, so it has no LIKE wildcards to escape."""
    prefix = id_prefix.strip().lower()
    if not TASK_ID_PREFIX.fullmatch(prefix):
        raise ValueError(f"invalid id prefix {id_prefix!r}: use the start of a {what} id (hex digits and "
                         "'-', at most 36 characters)")
    bare = prefix.rstrip("-")
    if not bare:
        params.append(prefix + "%")
        return "id LIKE ?"
    # The next hex digit bounds the range; after 'f', 'g' (a letter after every hex digit in any collation).
    following = "g" if bare[-1] == "f" else _HEX[_HEX.index(bare[-1]) + 1]
    params.extend((bare, bare[:-1] + following, prefix + "%"))
    return "id >= ? AND id < ? AND id LIKE ?"


def _nesting(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_nesting(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_nesting(v) for v in value), default=0)
    return 0


T = TypeVar("T")


class StoreError(RuntimeError):
    """The database failed; the message says which backend and what to check."""


class StoreUnavailable(StoreError):
    """The database cannot be reached for now (server down, connection lost); the same write may
    succeed once it is back, unlike one the database refused."""


class CommitInDoubt(StoreUnavailable):
    """The connection was lost while a batch's COMMIT was under way: the batch may have been stored
    (applied again, it is a no-op if so), so nobody waiting for it may be told it was not."""


class DatabaseTakenOver(StoreError):
    """Another manager took this manager's database while this one was cut off from it: this one
    must stop, or the two would both dispatch its tasks."""


def causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and those it was raised from or while handling (a failed rollback hides the
    lost connection that made it fail)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


class Conn(Protocol):
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]: ...


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    total: int


# The module is not among them: it is stored once per digest in `modules` (migration 6).
_TASK_COLUMNS = (
    "id", "name", "kind", "state", "image_url", "wasm_digest", "cli_args", "inputs", "env",
    "daemon", "latent", "encrypted", "kbs_resource_path", "proplet_id", "pinned", "broadcast",
    "priority", "metadata", "monitoring_profile", "hal_storage_path", "mode", "depends_on", "run_if",
    "workflow_id", "job_id", "limits", "max_retries", "attempt", "retries", "results", "error", "reason",
    "queued_at", "start_time", "finish_time", "created_at", "updated_at",
)
# What changes after creation (the module and the identity do not change on a state update).
_TASK_MUTABLE = (
    "name", "state", "image_url", "wasm_digest", "cli_args", "inputs", "env", "daemon", "latent",
    "proplet_id", "pinned", "broadcast", "priority", "metadata", "limits", "max_retries", "attempt",
    "retries", "results", "error", "reason", "queued_at", "start_time", "finish_time", "updated_at",
)
_TASK_SELECT = ", ".join(_TASK_COLUMNS)
# A task's module: stored for a task without an image_url (a digest beside an image_url pins bytes
# fetched from elsewhere, which are not stored).
_TASK_MODULE = "(SELECT data FROM modules WHERE digest = tasks.wasm_digest AND tasks.image_url = '') AS file"

_PROPLET_COLUMNS = (
    "id", "name", "namespace", "metadata", "alive_history", "online", "offline_reason",
    "created_at", "updated_at",
)

# The writer may apply a batch again when the connection died during its COMMIT, which may have
# succeeded: every write below is a no-op when repeated. An insert under a client-chosen id finding
# a row with that id leaves it alone if it is this very write's (the same creation time), and
# otherwise sets the NOT NULL name to NULL, which the database refuses: a second caller choosing an
# id in use is still told (a NOT EXISTS guard does the same, but costs SQLite a temporary table per
# statement). Event and metrics rows carry an id chosen when the write is built (Store._row_id),
# which a repeat finds taken.
SQL_INSERT_TASK = (
    f"INSERT INTO tasks ({', '.join(_TASK_COLUMNS)}) VALUES ({', '.join('?' * len(_TASK_COLUMNS))}) "
    "ON CONFLICT (id) DO UPDATE SET name = NULL WHERE tasks.created_at <> excluded.created_at"
)
SQL_UPDATE_TASK = (
    f"UPDATE tasks SET {', '.join(f'{c} = ?' for c in _TASK_MUTABLE)} WHERE id = ?"
)
# What a state transition changes: the hot path writes only these.
_TASK_STATE_COLUMNS = (
    "state", "proplet_id", "attempt", "retries", "results", "error", "reason", "queued_at", "start_time",
    "finish_time", "updated_at",
)
SQL_UPDATE_TASK_STATE = (
    f"UPDATE tasks SET {', '.join(f'{c} = ?' for c in _TASK_STATE_COLUMNS)} WHERE id = ?"
)
SQL_UPDATE_TASK_MODULE = "UPDATE tasks SET wasm_digest = ?, updated_at = ? WHERE id = ?"
SQL_DELETE_TASK = "DELETE FROM tasks WHERE id = ?"
SQL_PUT_MODULE = "INSERT INTO modules (digest, data) VALUES (?, ?) ON CONFLICT (digest) DO NOTHING"
SQL_FORGET_MODULE = "DELETE FROM modules WHERE digest = ? AND NOT EXISTS (SELECT 1 FROM tasks WHERE wasm_digest = ?)"
SQL_INSERT_EVENT = (
    "INSERT INTO task_events (id, task_id, state, attempt, proplet_id, detail, at) VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (id) DO NOTHING"
)
SQL_UPSERT_PROPLET = (
    f"INSERT INTO proplets ({', '.join(_PROPLET_COLUMNS)}) VALUES ({', '.join('?' * len(_PROPLET_COLUMNS))}) "
    "ON CONFLICT (id) DO UPDATE SET name = excluded.name, namespace = excluded.namespace, "
    "metadata = excluded.metadata, alive_history = excluded.alive_history, online = excluded.online, "
    "offline_reason = excluded.offline_reason, updated_at = excluded.updated_at"
)
SQL_DELETE_PROPLET = "DELETE FROM proplets WHERE id = ?"
SQL_PUT_SCHEDULE = (
    "INSERT INTO task_schedules (task_id, expression, timezone, recurring, next_run) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (task_id) DO UPDATE SET expression = excluded.expression, timezone = excluded.timezone, "
    "recurring = excluded.recurring, next_run = excluded.next_run"
)
SQL_DELETE_SCHEDULE = "DELETE FROM task_schedules WHERE task_id = ?"
SQL_INSERT_JOB = (
    "INSERT INTO jobs (id, name, execution_mode, created_at, updated_at) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET name = NULL WHERE jobs.created_at <> excluded.created_at"
)
_JOB_SELECT = "id, name, execution_mode, created_at, updated_at"
_FL_ROUND_COLUMNS = (
    "round_id", "experiment_id", "model_ref", "task_wasm_image", "participants", "started", "hyperparams",
    "k_of_n", "timeout_s", "state", "reason", "model_version", "created_at", "deadline", "completed_at",
)
SQL_PUT_FL_ROUND = (
    f"INSERT INTO fl_rounds ({', '.join(_FL_ROUND_COLUMNS)}) VALUES ({', '.join('?' * len(_FL_ROUND_COLUMNS))}) "
    "ON CONFLICT (round_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _FL_ROUND_COLUMNS[1:])
)
# The first update of a participant counts; a repeat (the same update by REST and in the result) is ignored.
SQL_INSERT_FL_UPDATE = (
    "INSERT INTO fl_updates (round_id, proplet_id, num_samples, body, source, received_at) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (round_id, proplet_id) DO NOTHING"
)
# Versions come from the one round loop: a version stored already is this write's.
SQL_INSERT_FL_MODEL = (
    "INSERT INTO fl_models (version, round_id, data, created_at) VALUES (?, ?, ?, ?) ON CONFLICT (version) DO NOTHING"
)
SQL_INSERT_PROPLET_METRICS = (
    "INSERT INTO proplet_metrics (id, proplet_id, namespace, timestamp, cpu_metrics, memory_metrics) "
    "SELECT ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM proplets WHERE id = ?) ON CONFLICT (id) DO NOTHING"
)
SQL_INSERT_TASK_METRICS = (
    "INSERT INTO task_metrics (id, task_id, proplet_id, timestamp, metrics, aggregated) "
    "SELECT ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM tasks WHERE id = ?) ON CONFLICT (id) DO NOTHING"
)
# Tables whose rows get their id from Store._row_id.
_BUILT_ID_TABLES = ("task_events", "proplet_metrics", "task_metrics")

# Metrics tables, the column naming each sample's owner, and the owners' table (see prune_metrics).
_METRICS_TABLES = (("proplet_metrics", "proplet_id", "proplets"), ("task_metrics", "task_id", "tasks"))
# Rows one prune statement deletes at most: on SQLite 200 take about 0.6 ms.
PRUNE_CHUNK = 200
# Owners noted for the next prune, per table; beyond it the next prune looks at every owner.
PRUNE_NOTED_MAX = 20_000
# Owners read per page when a prune looks at every owner.
PRUNE_SWEEP_PAGE = 500


@dataclass(slots=True)
class _PruneState:
    """Which owners the next prune looks at (see Store.prune_metrics)."""

    noted: dict[str, dict[str, None]] = field(
        default_factory=lambda: {table: {} for table, _, _ in _METRICS_TABLES})
    sweep_due: bool = True  # a store's first prune looks at every owner: samples of earlier runs


def dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


class Store(abc.ABC):
    """A task/proplet store over one SQL backend."""

    dialect: str = ""
    # Seconds of pruning per transaction (see prune_metrics).
    _prune_slice_seconds = 0.05
    _prune_state: _PruneState | None = None

    # ---- backend primitives -------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def connection(self) -> Any:
        """`async with store.connection() as conn`: a Conn outside any transaction."""

    @abc.abstractmethod
    def transaction(self) -> Any:
        """`async with store.transaction() as conn`: a Conn inside one transaction."""

    def maintenance(self, what: str) -> Any:
        """`async with store.maintenance("migration 5_x") as conn`: a Conn inside one transaction, for
        upkeep (migrations, pruning) whose statements may take far longer than the hot path's; `what`
        names it in the error if it takes too long."""
        return self.transaction()

    def is_transient(self, exc: BaseException) -> bool:
        """Whether `exc` says the database could not be reached, so the same statements may succeed
        later (the writer retries them), rather than that it refused them."""
        return False

    @abc.abstractmethod
    def ts_in(self, value: datetime | None) -> Any: ...

    @abc.abstractmethod
    def ts_out(self, value: Any) -> datetime | None: ...

    @abc.abstractmethod
    def metadata_clause(self, metadata: dict[str, Any]) -> tuple[str, list[Any]]:
        """A WHERE fragment matching tasks whose metadata contains every given key/value."""

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Where the data lives, for the console header and `propeller info`."""

    def bool_in(self, value: bool) -> Any:
        return value

    # The last id given to an event or metrics row (see SQL_INSERT_TASK), by any store of this
    # process: one counter for all, so that two stores (tests open several, on one database at
    # times) never give two rows one id, which ON CONFLICT (id) DO NOTHING would drop unseen.
    _last_row_id = 0

    def _row_id(self) -> int:
        """A new row id, larger than those given before: histories are read in id order. Ids follow
        the clock (microseconds × 1024, so a later manager starts above an earlier one's) and stay
        above the largest stored (see reserve_row_ids). Unique in the process (one counter) and
        across managers, since one manager at a time writes a database (its lock)."""
        row_id = max(Store._last_row_id + 1, time.time_ns() // 1000 << 10)
        Store._last_row_id = row_id
        return row_id

    async def reserve_row_ids(self) -> None:
        """After the migrations: start row ids above every id stored, in case the clock was set back
        since they were written (a repeated id would make a new row a no-op)."""
        floor = 0
        async with self.connection() as conn:
            for table in _BUILT_ID_TABLES:
                floor = max(floor, (await conn.fetch(f"SELECT MAX(id) FROM {table}"))[0][0] or 0)
        Store._last_row_id = max(Store._last_row_id, floor)

    async def housekeeping(self) -> None:  # noqa: B027 - an optional hook; PostgreSQL needs none
        """Periodic upkeep of the backend (called every second by the core)."""

    @property
    def holds_manager_lock(self) -> bool:
        """False while the one-manager lock is lost and being taken again (no write is applied then)."""
        return True

    async def keep_manager_lock(self) -> None:  # noqa: B027 - SQLite's file lock lasts as long as the process
        """Run for the manager's life: take the one-manager lock again whenever it is lost, and raise
        DatabaseTakenOver if another manager took it meanwhile. Returns at once where the lock
        cannot be lost."""

    # ---- migrations ---------------------------------------------------------------------

    async def lock_migrations(self, conn: Conn) -> None:  # noqa: B027 - SQLite's BEGIN IMMEDIATE is the lock
        """Inside a transaction: wait until no other runner migrates this database (held to its end)."""

    async def applied_migrations(self) -> set[str]:
        async with self.maintenance("waiting for another manager's migrations") as conn:
            await self.lock_migrations(conn)
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {TRACKING_TABLE} (id TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
        async with self.connection() as conn:
            rows = await conn.fetch(f"SELECT id FROM {TRACKING_TABLE}")
        return {r[0] for r in rows}

    async def apply_migration(self, migration: Migration) -> bool:
        from core.domain import utcnow

        async with self.maintenance(f"migration {migration.id}") as conn:
            # Two managers starting at once both found the migration pending: without the lock,
            # PostgreSQL's concurrent CREATE TABLE IF NOT EXISTS failed one of them (a duplicate
            # key in pg_type), and a migration that is not idempotent would run twice. Under the
            # lock the tracking table tells whether the other runner applied it meanwhile.
            await self.lock_migrations(conn)
            if await conn.fetch(f"SELECT 1 FROM {TRACKING_TABLE} WHERE id = ?", (migration.id,)):
                return False
            for statement in migration.statements():
                await conn.execute(statement)
            await conn.execute(
                f"INSERT INTO {TRACKING_TABLE} (id, applied_at) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
                (migration.id, utcnow().isoformat()),
            )
        return True

    # ---- row conversion -----------------------------------------------------------------

    def task_row(self, t: Task) -> tuple[Any, ...]:
        values = {
            "id": t.id, "name": t.name, "kind": t.kind, "state": int(t.state),
            "image_url": t.image_url, "wasm_digest": t.wasm_digest,
            "cli_args": None if t.cli_args is None else dumps(t.cli_args),
            "inputs": dumps(t.inputs), "env": dumps(t.env),
            "daemon": self.bool_in(t.daemon), "latent": self.bool_in(t.latent),
            "encrypted": self.bool_in(t.encrypted), "kbs_resource_path": t.kbs_resource_path,
            "proplet_id": t.proplet_id, "pinned": self.bool_in(t.pinned),
            "broadcast": self.bool_in(t.broadcast),
            "priority": t.priority, "metadata": dumps(t.metadata),
            "monitoring_profile": None if t.monitoring_profile is None else dumps(t.monitoring_profile),
            "hal_storage_path": t.hal_storage_path, "mode": t.mode,
            "depends_on": dumps(t.depends_on), "run_if": t.run_if, "workflow_id": t.workflow_id,
            "job_id": t.job_id, "limits": dumps(t.limits.to_dict()), "max_retries": t.max_retries,
            "attempt": t.attempt, "retries": t.retries, "results": None if t.results is None else dumps(t.results),
            "error": t.error, "reason": t.reason, "queued_at": self.ts_in(t.queued_at),
            "start_time": self.ts_in(t.start_time), "finish_time": self.ts_in(t.finish_time),
            "created_at": self.ts_in(t.created_at), "updated_at": self.ts_in(t.updated_at),
        }
        return tuple(values[c] for c in _TASK_COLUMNS)

    def task_update_row(self, t: Task) -> tuple[Any, ...]:
        # Same order as _TASK_MUTABLE; built directly because it runs on every state transition.
        ts = self.ts_in
        return (
            t.name, int(t.state), t.image_url, t.wasm_digest,
            None if t.cli_args is None else dumps(t.cli_args), dumps(t.inputs), dumps(t.env),
            t.daemon, t.latent, t.proplet_id, t.pinned, t.broadcast, t.priority, dumps(t.metadata),
            dumps(t.limits.to_dict()), t.max_retries, t.attempt, t.retries,
            None if t.results is None else dumps(t.results), t.error, t.reason,
            ts(t.queued_at), ts(t.start_time), ts(t.finish_time), ts(t.updated_at), t.id,
        )

    def task_from_row(self, row: Any, file: bytes = b"") -> Task:
        limits = _json(row["limits"]) or {}
        return Task(
            id=row["id"], name=row["name"], kind=row["kind"], state=TaskState(row["state"]),
            image_url=row["image_url"], file=file, wasm_digest=row["wasm_digest"],
            cli_args=_json(row["cli_args"]), inputs=_json(row["inputs"]) or [],
            env=_json(row["env"]) or {}, daemon=bool(row["daemon"]), latent=bool(row["latent"]),
            encrypted=bool(row["encrypted"]), kbs_resource_path=row["kbs_resource_path"],
            proplet_id=row["proplet_id"], pinned=bool(row["pinned"]), broadcast=bool(row["broadcast"]),
            priority=row["priority"],
            metadata=_json(row["metadata"]) or {}, monitoring_profile=_json(row["monitoring_profile"]),
            hal_storage_path=row["hal_storage_path"], mode=row["mode"],
            depends_on=_json(row["depends_on"]) or [], run_if=row["run_if"],
            workflow_id=row["workflow_id"], job_id=row["job_id"],
            limits=TaskLimits(**limits), max_retries=row["max_retries"], attempt=row["attempt"], retries=row["retries"],
            results=_json(row["results"]), error=row["error"], reason=row["reason"],
            queued_at=self.ts_out(row["queued_at"]), start_time=self.ts_out(row["start_time"]),
            finish_time=self.ts_out(row["finish_time"]),
            created_at=self.ts_out(row["created_at"]),  # type: ignore[arg-type]
            updated_at=self.ts_out(row["updated_at"]),  # type: ignore[arg-type]
        )

    def proplet_row(self, p: Proplet, now: datetime) -> tuple[Any, ...]:
        history = [ts.isoformat() for ts in p.alive_history]
        return (
            p.id, p.name, p.namespace, dumps(p.metadata), dumps(history), self.bool_in(p.online),
            p.offline_reason, self.ts_in(p.created_at), self.ts_in(now),
        )

    def proplet_from_row(self, row: Any) -> Proplet:
        return Proplet(
            id=row["id"], name=row["name"], namespace=row["namespace"],
            metadata=_json(row["metadata"]) or {},
            alive_history=[datetime.fromisoformat(s) for s in _json(row["alive_history"]) or []],
            online=bool(row["online"]), offline_reason=row["offline_reason"],
            created_at=self.ts_out(row["created_at"]),  # type: ignore[arg-type]
        )

    # ---- reads --------------------------------------------------------------------------

    async def get_task(self, task_id: str, *, with_file: bool = True) -> Task | None:
        columns = _TASK_SELECT + (", " + _TASK_MODULE if with_file else "")
        async with self.connection() as conn:
            rows = await conn.fetch(f"SELECT {columns} FROM tasks WHERE id = ?", (task_id,))
        if not rows:
            return None
        row = rows[0]
        return self.task_from_row(row, bytes(row["file"] or b"") if with_file else b"")

    # How a statement matches a column against a list passed as one parameter (a JSON array here;
    # PostgreSQL takes an array): one prepared statement whatever the list's length.
    _IN_LIST = "IN (SELECT value FROM json_each(?))"

    def _list_param(self, values: Sequence[str]) -> Any:
        return dumps(list(values))

    async def get_tasks(self, task_ids: Sequence[str]) -> dict[str, Task]:
        """The tasks (without their module) of those ids that exist, by id, in one query."""
        async with self.connection() as conn:
            rows = await conn.fetch(f"SELECT {_TASK_SELECT} FROM tasks WHERE id {self._IN_LIST}",
                                    (self._list_param(task_ids),))
        return {row["id"]: self.task_from_row(row) for row in rows}

    async def list_tasks(
        self,
        *,
        offset: int = 0,
        limit: int = 100,
        metadata: dict[str, Any] | None = None,
        states: Sequence[TaskState] | None = None,
        proplet_id: str | None = None,
        id_prefix: str | None = None,
    ) -> Page[Task]:
        where, params = self._task_filter(metadata, states, proplet_id, id_prefix)
        async with self.connection() as conn:
            total = (await conn.fetch(f"SELECT COUNT(*) FROM tasks{where}", params))[0][0]
            rows = await conn.fetch(
                f"SELECT {_TASK_SELECT} FROM tasks{where} ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                (*params, limit, offset),
            )
        return Page([self.task_from_row(r) for r in rows], int(total))

    def _task_filter(
        self,
        metadata: dict[str, Any] | None,
        states: Sequence[TaskState] | None,
        proplet_id: str | None,
        id_prefix: str | None = None,
    ) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if id_prefix is not None:
            clauses.append(_id_prefix_clause(id_prefix, params))
        if metadata:
            for key, value in metadata.items():
                if not METADATA_KEY.match(key):
                    raise ValueError(f"metadata key {key!r} may only contain letters, digits, '.', '_' and '-'")
                if _nesting(value) > METADATA_FILTER_DEPTH:
                    raise ValueError(f"a metadata filter's values may nest at most {METADATA_FILTER_DEPTH} "
                                     "objects or arrays deep")
            sql, p = self.metadata_clause(metadata)
            clauses.append(sql)
            params.extend(p)
        if states:
            clauses.append(f"state IN ({', '.join('?' * len(states))})")
            params.extend(int(s) for s in states)
        if proplet_id:
            clauses.append("proplet_id = ?")
            params.append(proplet_id)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params

    async def group_tasks(self, *, workflow_id: str = "", job_id: str = "") -> list[Task]:
        """The tasks of one workflow or job, in the order they were created."""
        column, value = ("workflow_id", workflow_id) if workflow_id else ("job_id", job_id)
        if not value:
            return []
        async with self.connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_TASK_SELECT} FROM tasks WHERE {column} = ? ORDER BY created_at, id", (value,))
        return [self.task_from_row(r) for r in rows]

    async def groups_with_waiting_dependents(self) -> list[tuple[str, str]]:
        """(workflow_id, job_id) of groups with a task that waits for others (a dependent, or a later
        task of a sequential job) and has not started."""
        async with self.connection() as conn:
            rows = await conn.fetch(
                "SELECT DISTINCT workflow_id, job_id FROM tasks WHERE state = ? AND queued_at IS NULL AND ("
                "(depends_on <> '[]' AND (workflow_id <> '' OR job_id <> '')) "
                "OR job_id IN (SELECT id FROM jobs WHERE execution_mode = 'sequential'))", (int(TaskState.PENDING),))
        return [(r[0], r[1]) for r in rows]

    async def group_has_waiting_dependents(self, *, workflow_id: str = "", job_id: str = "") -> bool:
        """Whether a task of the group waits for others and has not started."""
        column, value = ("workflow_id", workflow_id) if workflow_id else ("job_id", job_id)
        async with self.connection() as conn:
            rows = await conn.fetch(
                f"SELECT 1 FROM tasks WHERE {column} = ? AND state = ? AND queued_at IS NULL "
                "AND depends_on <> '[]' LIMIT 1", (value, int(TaskState.PENDING)))
        return bool(rows)

    async def task_schedules(self) -> list[Schedule]:
        async with self.connection() as conn:
            rows = await conn.fetch("SELECT task_id, expression, timezone, recurring, next_run FROM task_schedules")
        schedules = []
        for r in rows:
            next_run = self.ts_out(r[4])
            assert next_run is not None
            schedules.append(Schedule(r[0], r[1], r[2], bool(r[3]), next_run))
        return schedules

    def op_put_schedule(self, s: Schedule) -> WriteOp:
        # After task inserts (the row refers to its task); the latest of a task's puts wins.
        return WriteOp(SQL_PUT_SCHEDULE, (s.task_id, s.expression, s.timezone, self.bool_in(s.recurring),
                                          self.ts_in(s.next_run)), phase=_PHASE_TASK_UPDATE, key=s.task_id)

    def op_delete_schedule(self, task_id: str) -> WriteOp:
        return WriteOp(SQL_DELETE_SCHEDULE, (task_id,), barrier=True)

    async def get_job(self, job_id: str) -> Job | None:
        async with self.connection() as conn:
            rows = await conn.fetch(f"SELECT {_JOB_SELECT} FROM jobs WHERE id = ?", (job_id,))
        return self._job_from_row(rows[0]) if rows else None

    async def list_jobs(self, offset: int, limit: int, id_prefix: str | None = None) -> Page[Job]:
        """Jobs, newest first; those whose id starts with `id_prefix` if given."""
        params: list[Any] = []
        where = f" WHERE {_id_prefix_clause(id_prefix, params, 'job')}" if id_prefix is not None else ""
        async with self.connection() as conn:
            total = (await conn.fetch(f"SELECT COUNT(*) FROM jobs{where}", tuple(params)))[0][0]
            rows = await conn.fetch(
                f"SELECT {_JOB_SELECT} FROM jobs{where} ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                (*params, limit, offset))
        return Page([self._job_from_row(r) for r in rows], int(total))

    def _job_from_row(self, row: Any) -> Job:
        created, updated = self.ts_out(row[3]), self.ts_out(row[4])
        assert created is not None and updated is not None
        return Job(id=row[0], name=row[1], execution_mode=row[2], created_at=created, updated_at=updated)

    def op_insert_job(self, job: Job) -> WriteOp:
        # The same phase as task inserts, queued before them: a job's row is written first.
        return WriteOp(SQL_INSERT_JOB, (job.id, job.name, job.execution_mode, self.ts_in(job.created_at),
                                        self.ts_in(job.updated_at)), phase=_PHASE_TASK_INSERT)

    # ---- federated learning ---------------------------------------------------------------

    def op_put_fl_round(self, r: FLRound) -> WriteOp:
        return WriteOp(SQL_PUT_FL_ROUND, (
            r.round_id, r.experiment_id, r.model_ref, r.task_wasm_image, dumps(r.participants), dumps(r.started),
            dumps(r.hyperparams), r.k_of_n, r.timeout_s, str(r.state), r.reason, r.model_version,
            self.ts_in(r.created_at), self.ts_in(r.deadline), self.ts_in(r.completed_at)), barrier=True)

    def op_insert_fl_update(self, u: FLUpdateRecord) -> WriteOp:
        return WriteOp(SQL_INSERT_FL_UPDATE, (u.round_id, u.proplet_id, u.num_samples, dumps(u.body), u.source,
                                              self.ts_in(u.received_at)), barrier=True)

    def op_insert_fl_model(self, version: int, round_id: str, data: dict[str, Any], at: datetime) -> WriteOp:
        return WriteOp(SQL_INSERT_FL_MODEL, (version, round_id, dumps(data), self.ts_in(at)), barrier=True)

    def _fl_round_from_row(self, r: Any) -> FLRound:
        deadline, created_at = self.ts_out(r[13]), self.ts_out(r[12])
        assert deadline is not None and created_at is not None
        return FLRound(
            round_id=r[0], experiment_id=r[1], model_ref=r[2], task_wasm_image=r[3],
            participants=orjson.loads(r[4]), started=orjson.loads(r[5]), hyperparams=orjson.loads(r[6]),
            k_of_n=r[7], timeout_s=float(r[8]), state=RoundState(r[9]), reason=r[10], model_version=r[11],
            created_at=created_at, deadline=deadline, completed_at=self.ts_out(r[14]))

    async def fl_round(self, round_id: str) -> FLRound | None:
        async with self.connection() as conn:
            rows = await conn.fetch(f"SELECT {', '.join(_FL_ROUND_COLUMNS)} FROM fl_rounds WHERE round_id = ?",
                                    (round_id,))
        return self._fl_round_from_row(rows[0]) if rows else None

    async def fl_rounds(self, offset: int, limit: int, *, state: RoundState | None = None) -> Page[FLRound]:
        where, params = ("WHERE state = ?", [str(state)]) if state is not None else ("", [])
        async with self.connection() as conn:
            total = (await conn.fetch(f"SELECT COUNT(*) FROM fl_rounds {where}", params))[0][0]
            rows = await conn.fetch(
                f"SELECT {', '.join(_FL_ROUND_COLUMNS)} FROM fl_rounds {where} "
                "ORDER BY created_at DESC, round_id LIMIT ? OFFSET ?", [*params, limit, offset])
        return Page([self._fl_round_from_row(r) for r in rows], total)

    async def fl_updates(self, round_id: str) -> list[FLUpdateRecord]:
        async with self.connection() as conn:
            rows = await conn.fetch(
                "SELECT round_id, proplet_id, num_samples, body, source, received_at FROM fl_updates "
                "WHERE round_id = ? ORDER BY received_at, proplet_id", (round_id,))
        out = []
        for r in rows:
            received_at = self.ts_out(r[5])
            assert received_at is not None
            out.append(FLUpdateRecord(r[0], r[1], r[2], orjson.loads(r[3]), r[4], received_at))
        return out

    async def fl_update_counts(self, round_ids: list[str]) -> dict[str, int]:
        """How many updates each of these rounds has (rounds with none are left out)."""
        if not round_ids:
            return {}
        async with self.connection() as conn:
            rows = await conn.fetch(f"SELECT round_id, COUNT(*) FROM fl_updates WHERE round_id {self._IN_LIST} "
                                    "GROUP BY round_id", (self._list_param(round_ids),))
        return {r[0]: r[1] for r in rows}

    async def fl_model(self, version: int) -> dict[str, Any] | None:
        async with self.connection() as conn:
            rows = await conn.fetch("SELECT data FROM fl_models WHERE version = ?", (version,))
        return orjson.loads(rows[0][0]) if rows else None

    async def fl_models(self) -> list[tuple[int, str, datetime]]:
        """(version, round that made it, when), newest first."""
        async with self.connection() as conn:
            rows = await conn.fetch("SELECT version, round_id, created_at FROM fl_models ORDER BY version DESC")
        return [(r[0], r[1], self.ts_out(r[2]) or datetime.min) for r in rows]

    async def active_tasks(self) -> list[Task]:
        """Tasks the dispatcher owns after a restart: queued, scheduled or running."""
        async with self.connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_TASK_SELECT} FROM tasks WHERE state IN (?, ?) "
                "OR (state = ? AND queued_at IS NOT NULL) ORDER BY created_at",
                (int(TaskState.SCHEDULED), int(TaskState.RUNNING), int(TaskState.PENDING)),
            )
        return [self.task_from_row(r) for r in rows]

    async def count_tasks_by_state(self) -> dict[TaskState, int]:
        async with self.connection() as conn:
            rows = await conn.fetch("SELECT state, COUNT(*) FROM tasks GROUP BY state")
        return {TaskState(r[0]): int(r[1]) for r in rows}

    async def module_heads(self, digests: Sequence[str]) -> dict[str, tuple[int, bytes]]:
        """Each stored module's size and first MODULE_HEAD_BYTES (its header, and as a rule its
        imports), by digest, without reading it whole: what the dispatcher needs to know which
        proplets can take it (core.domain.module_needs)."""
        out: dict[str, tuple[int, bytes]] = {}
        async with self.connection() as conn:
            for i in range(0, len(digests), 500):
                part = list(digests[i:i + 500])
                rows = await conn.fetch(
                    f"SELECT digest, length(data), substr(data, 1, {MODULE_HEAD_BYTES}) FROM modules "
                    f"WHERE digest IN ({', '.join('?' * len(part))})", tuple(part))
                out.update({r[0]: (int(r[1]), bytes(r[2])) for r in rows})
        return out

    async def file_by_digest(self, digest: str) -> bytes | None:
        async with self.connection() as conn:
            rows = await conn.fetch("SELECT data FROM modules WHERE digest = ?", (digest,))
        return bytes(rows[0][0]) if rows else None

    async def task_events(self, task_id: str) -> list[TaskEvent]:
        async with self.connection() as conn:
            rows = await conn.fetch(
                "SELECT task_id, state, attempt, proplet_id, detail, at FROM task_events "
                "WHERE task_id = ? ORDER BY id",
                (task_id,),
            )
        return [
            TaskEvent(r["task_id"], TaskState(r["state"]), self.ts_out(r["at"]),  # type: ignore[arg-type]
                      r["attempt"], r["proplet_id"], r["detail"])
            for r in rows
        ]

    async def get_proplet(self, proplet_id: str) -> Proplet | None:
        async with self.connection() as conn:
            rows = await conn.fetch(
                f"SELECT {', '.join(_PROPLET_COLUMNS)} FROM proplets WHERE id = ?", (proplet_id,)
            )
        return self.proplet_from_row(rows[0]) if rows else None

    async def all_proplets(self) -> list[Proplet]:
        async with self.connection() as conn:
            rows = await conn.fetch(f"SELECT {', '.join(_PROPLET_COLUMNS)} FROM proplets ORDER BY id")
        return [self.proplet_from_row(r) for r in rows]

    async def list_proplet_metrics(self, proplet_id: str, offset: int, limit: int) -> Page[PropletMetrics]:
        async with self.connection() as conn:
            total = (await conn.fetch(
                "SELECT COUNT(*) FROM proplet_metrics WHERE proplet_id = ?", (proplet_id,)
            ))[0][0]
            rows = await conn.fetch(
                "SELECT proplet_id, namespace, timestamp, cpu_metrics, memory_metrics FROM proplet_metrics "
                "WHERE proplet_id = ? ORDER BY timestamp DESC, id DESC LIMIT ? OFFSET ?",
                (proplet_id, limit, offset),
            )
        items = [
            PropletMetrics(r["proplet_id"], r["namespace"], self.ts_out(r["timestamp"]),  # type: ignore[arg-type]
                           _json(r["cpu_metrics"]) or {}, _json(r["memory_metrics"]) or {})
            for r in rows
        ]
        return Page(items, int(total))

    async def list_task_metrics(self, task_id: str, offset: int, limit: int) -> Page[TaskMetrics]:
        async with self.connection() as conn:
            total = (await conn.fetch(
                "SELECT COUNT(*) FROM task_metrics WHERE task_id = ?", (task_id,)
            ))[0][0]
            rows = await conn.fetch(
                "SELECT task_id, proplet_id, timestamp, metrics, aggregated FROM task_metrics "
                "WHERE task_id = ? ORDER BY timestamp DESC, id DESC LIMIT ? OFFSET ?",
                (task_id, limit, offset),
            )
        items = [
            TaskMetrics(r["task_id"], r["proplet_id"], self.ts_out(r["timestamp"]),  # type: ignore[arg-type]
                        _json(r["metrics"]) or {}, _json(r["aggregated"]))
            for r in rows
        ]
        return Page(items, int(total))

    async def prune_metrics(self, keep: int) -> int:
        """Keep the newest `keep` samples per proplet and per task; return how many were deleted.

        Looks only at the proplets and tasks that got samples since the last prune (noted as their
        writes were built), and at every one on the first prune of this store and after the notes
        overflowed: a pass over whole tables took 1.3 s a minute with 1.2 million samples on SQLite,
        holding up every write meanwhile, and grows past any statement timeout. Work goes in slices
        of about `_prune_slice_seconds`, each its own transaction, so a write waits one slice at most."""
        state = self._pruning()
        sweep, state.sweep_due = state.sweep_due, False
        deleted = 0
        try:
            for table, column, owner_table in _METRICS_TABLES:
                noted, state.noted[table] = state.noted[table], {}
                deleted += await self._prune_owners(table, column, deque(noted), keep)
                after: str | None = None
                while sweep:
                    async with self.connection() as conn:
                        rows = await conn.fetch(
                            f"SELECT id FROM {owner_table} ORDER BY id LIMIT ?" if after is None else
                            f"SELECT id FROM {owner_table} WHERE id > ? ORDER BY id LIMIT ?",
                            (PRUNE_SWEEP_PAGE,) if after is None else (after, PRUNE_SWEEP_PAGE))
                    if not rows:
                        break
                    after = rows[-1][0]
                    deleted += await self._prune_owners(table, column, deque(r[0] for r in rows), keep)
        except BaseException:
            state.sweep_due = True  # the owners noted are forgotten: the next prune looks at all
            raise
        return deleted

    def _pruning(self) -> _PruneState:
        if self._prune_state is None:
            self._prune_state = _PruneState()
        return self._prune_state

    def _note_sample(self, table: str, owner: str) -> None:
        """A metrics sample of `owner` is about to be written: the next prune looks at it."""
        state = self._pruning()
        noted = state.noted[table]
        if owner in noted:
            return
        if len(noted) >= PRUNE_NOTED_MAX:
            state.sweep_due = True  # overflow policy: note no more; the next prune looks at every owner
            return
        noted[owner] = None

    async def _prune_owners(self, table: str, column: str, owners: deque[str], keep: int) -> int:
        deleted = 0
        while owners:
            deleted += await self._prune_slice(table, column, owners, keep)
        return deleted

    @abc.abstractmethod
    async def _prune_slice(self, table: str, column: str, owners: deque[str], keep: int) -> int:
        """In one transaction of about `_prune_slice_seconds`: delete the samples of `table` older than
        the `keep` newest (by timestamp, then id) of the owners (`column`) at the front of `owners`, at
        most PRUNE_CHUNK rows per statement, removing each owner done (one with more left to delete
        stays at the front); return how many were deleted."""

    async def schema(self) -> dict[str, dict[str, Any]]:
        """Tables, columns and indexes, for the parity test and `propeller info`."""
        raise NotImplementedError

    # ---- writes (the writer batches these; see core.store.writer) -----------------------

    async def apply(self, ops: Sequence[WriteOp]) -> None:
        """Apply a batch of writes in one transaction.

        Between barriers, statements are grouped by phase (task inserts, task updates, events,
        proplets, metrics) so each group goes to the database as one executemany: reordering is
        safe because each phase only depends on earlier phases. An update superseded by a later
        one with the same key is dropped.
        """
        await self._apply_in(self.transaction(), ops)

    async def _apply_in(self, transaction: Any, ops: Sequence[WriteOp]) -> None:
        """Apply the batch inside `transaction` (an `async with` giving a Conn). A transient failure
        of its COMMIT raises CommitInDoubt: the batch may have been stored."""
        committing = False
        try:
            async with transaction as conn:
                for group in plan(ops):
                    if len(group) == 1:
                        await conn.execute(group[0].sql, group[0].params)
                    else:
                        await conn.executemany(group[0].sql, [op.params for op in group])
                committing = True
        except Exception as exc:
            if committing and self.is_transient(exc):
                raise CommitInDoubt(
                    f"the connection to the database ({self.description}) was lost during COMMIT "
                    f"({str(exc) or type(exc).__name__})") from exc
            raise

    async def delete(self, op: WriteOp) -> int:
        """Run one delete in its own transaction; return the number of rows it removed."""
        async with self.transaction() as conn:
            return await conn.execute(op.sql, op.params)

    # builders for write operations

    def op_insert_task(self, task: Task) -> WriteOp:
        """The task's row; its module, if it carries one, goes in with op_put_module."""
        return WriteOp(SQL_INSERT_TASK, self.task_row(task), phase=_PHASE_TASK_INSERT)

    def op_put_module(self, digest: str, data: bytes) -> WriteOp:
        """Store a module under its digest, once: a module already stored is left as it is."""
        return WriteOp(SQL_PUT_MODULE, (digest, data), phase=_PHASE_MODULE, key=digest)

    def op_forget_module(self, digest: str) -> WriteOp:
        """Delete a module no task refers to any more (kept while one does)."""
        return WriteOp(SQL_FORGET_MODULE, (digest, digest), barrier=True)

    def op_update_task(self, task: Task) -> WriteOp:
        return WriteOp(SQL_UPDATE_TASK, self.task_update_row(task), phase=_PHASE_TASK_UPDATE, key=task.id)

    def op_update_task_state(self, task: Task) -> WriteOp:
        """A state transition: only the columns a transition changes (see _TASK_STATE_COLUMNS)."""
        ts = self.ts_in
        return WriteOp(SQL_UPDATE_TASK_STATE, (
            int(task.state), task.proplet_id, task.attempt, task.retries,
            None if task.results is None else dumps(task.results), task.error, task.reason,
            ts(task.queued_at), ts(task.start_time), ts(task.finish_time), ts(task.updated_at), task.id,
        ), phase=_PHASE_TASK_UPDATE, key=task.id)

    def ops_set_task_module(self, task: Task, old_digest: str) -> list[WriteOp]:
        """The task's module replaced (task.file and task.wasm_digest; an empty file: none
        stored), and the one it had forgotten if no other task has it."""
        ops = [self.op_put_module(task.wasm_digest, task.file)] if task.file else []
        ops.append(WriteOp(SQL_UPDATE_TASK_MODULE, (task.wasm_digest, self.ts_in(task.updated_at), task.id),
                           phase=_PHASE_TASK_UPDATE, key=task.id))
        if old_digest and old_digest != task.wasm_digest:
            ops.append(self.op_forget_module(old_digest))
        return ops

    def op_delete_task(self, task_id: str) -> WriteOp:
        return WriteOp(SQL_DELETE_TASK, (task_id,), barrier=True)

    def op_task_event(self, e: TaskEvent) -> WriteOp:
        return WriteOp(
            SQL_INSERT_EVENT,
            (self._row_id(), e.task_id, int(e.state), e.attempt, e.proplet_id, e.detail, self.ts_in(e.at)),
            phase=_PHASE_EVENT,
        )

    def op_upsert_proplet(self, p: Proplet, now: datetime) -> WriteOp:
        return WriteOp(SQL_UPSERT_PROPLET, self.proplet_row(p, now), phase=_PHASE_PROPLET, key=p.id)

    def op_delete_proplet(self, proplet_id: str) -> WriteOp:
        return WriteOp(SQL_DELETE_PROPLET, (proplet_id,), barrier=True)

    def op_proplet_metrics(self, m: PropletMetrics) -> WriteOp:
        self._note_sample("proplet_metrics", m.proplet_id)
        return WriteOp(
            SQL_INSERT_PROPLET_METRICS,
            (self._row_id(), m.proplet_id, m.namespace, self.ts_in(m.timestamp), dumps(m.cpu_metrics),
             dumps(m.memory_metrics), m.proplet_id),
            phase=_PHASE_METRICS,
        )

    def op_task_metrics(self, m: TaskMetrics) -> WriteOp:
        self._note_sample("task_metrics", m.task_id)
        return WriteOp(
            SQL_INSERT_TASK_METRICS,
            (self._row_id(), m.task_id, m.proplet_id, self.ts_in(m.timestamp), dumps(m.metrics),
             None if m.aggregated is None else dumps(m.aggregated), m.task_id),
            phase=_PHASE_METRICS,
        )


@dataclass(frozen=True, slots=True)
class WriteOp:
    """One parameterised statement.

    `phase` orders statements inside a batch (see Store.apply); `key`, when set, makes later ops
    with the same SQL and key supersede earlier ones (each update carries the whole current state).
    A `barrier` op (deletes) keeps its place: nothing is moved across it.
    """

    sql: str
    params: tuple[Any, ...]
    phase: int = 0
    key: str | None = None
    barrier: bool = False


_PHASE_MODULE, _PHASE_TASK_INSERT, _PHASE_TASK_UPDATE, _PHASE_EVENT, _PHASE_PROPLET, _PHASE_METRICS = range(6)


def plan(ops: Sequence[WriteOp]) -> list[list[WriteOp]]:
    """Groups of statements to run in order (see Store.apply)."""
    groups: list[list[WriteOp]] = []
    segment: list[WriteOp] = []

    def flush() -> None:
        latest: dict[tuple[str, str], int] = {}
        for i, op in enumerate(segment):
            if op.key is not None:
                latest[(op.sql, op.key)] = i
        kept = [op for i, op in enumerate(segment) if op.key is None or latest[(op.sql, op.key)] == i]
        by_sql: dict[tuple[int, str], list[WriteOp]] = {}
        for op in sorted(kept, key=lambda o: o.phase):  # stable: order within a phase is kept
            by_sql.setdefault((op.phase, op.sql), []).append(op)
        groups.extend(by_sql.values())
        segment.clear()

    for op in ops:
        if op.barrier:
            flush()
            groups.append([op])
        else:
            segment.append(op)
    flush()
    return groups


def _json(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value)
    return orjson.loads(value)

