"""A batch applied twice leaves the database as applied once.

The writer tries a batch again when the database could not be reached (core.store.writer). If the
connection died during COMMIT, the commit may have succeeded, and the retry applies the same
statements again: every write the store builds (`Store.op_*`) must make such a repeat a no-op, not a
refusal (a task's or job's primary key) nor a second row (events, metrics). Checked on both backends
by applying a batch of every op kind twice, and through the writer with a real cut: a TCP proxy in
front of PostgreSQL that closes the writer's connection right after the server answered COMMIT,
before the answer reaches the manager."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import asyncpg.transaction
import pytest

from core.cron import Schedule
from core.domain import (
    FLRound,
    FLUpdateRecord,
    Job,
    Proplet,
    PropletMetrics,
    Task,
    TaskEvent,
    TaskMetrics,
    TaskState,
    new_task_id,
)
from core.store import Store
from core.store.base import WriteOp
from core.store.migrate import migrate
from core.store.postgres import PostgresStore
from core.store.writer import StoreWriter
from tests.services import TcpProxy

TABLES = ("modules", "jobs", "tasks", "task_events", "task_schedules", "proplets", "proplet_metrics", "task_metrics",
          "fl_rounds", "fl_updates", "fl_models")


def _task(**overrides: Any) -> Task:
    now = datetime.now(UTC)
    values: dict[str, Any] = dict(id=new_task_id(), name="add", inputs=["1", "2"], file=b"\0asm\x01\0\0\0",
                                  wasm_digest="sha256:" + "a" * 64, created_at=now, updated_at=now)
    values.update(overrides)
    return Task(**values)


def _every_kind_of_write(store: Store) -> tuple[list[WriteOp], set[str]]:
    """A batch with each write the store builds, as the core sends them; and the builders used."""
    now = datetime.now(UTC)
    used: set[str] = set()

    def op(name: str, *args: Any) -> WriteOp:
        used.add(name)
        built: WriteOp = getattr(store, name)(*args)
        return built

    def ops(name: str, *args: Any) -> list[WriteOp]:
        used.add(name)
        built: list[WriteOp] = getattr(store, name)(*args)
        return built

    job = Job(new_task_id(), "nightly", "parallel", now, now)
    task = _task(job_id=job.id)
    gone = _task()
    proplet, gone_proplet = Proplet("p-1", name="edge"), Proplet("p-2")
    running = _task(id=task.id, job_id=job.id, state=TaskState.RUNNING, proplet_id="p-1", attempt=1,
                    file=b"\0asm\x01\0\0\0\0\x01", wasm_digest="sha256:" + "b" * 64)
    fl_round = FLRound("round-1", "model-0", ["p-1"], 1, 30.0, now + timedelta(seconds=30))
    ops = [
        op("op_insert_job", job),
        op("op_put_module", task.wasm_digest, task.file),
        op("op_insert_task", task),
        op("op_insert_task", gone),
        op("op_task_event", TaskEvent(task.id, TaskState.PENDING, now, 0, "", "created")),
        op("op_put_schedule", Schedule(task.id, "@daily", "UTC", True, now + timedelta(days=1))),
        op("op_upsert_proplet", proplet, now),
        op("op_upsert_proplet", gone_proplet, now),
        op("op_update_task", running),
        op("op_update_task_state", running),
        *ops("ops_set_task_module", running, task.wasm_digest),
        op("op_task_event", TaskEvent(task.id, TaskState.RUNNING, now, 1, "p-1", "")),
        op("op_proplet_metrics", PropletMetrics("p-1", "", now, {"cpu": 1}, {"rss": 2})),
        op("op_task_metrics", TaskMetrics(task.id, "p-1", now, {"cpu": 1})),
        op("op_put_schedule", Schedule(gone.id, "@daily", "UTC", True, now)),
        op("op_delete_schedule", gone.id),
        op("op_delete_task", gone.id),
        op("op_forget_module", gone.wasm_digest),
        op("op_delete_proplet", gone_proplet.id),
        op("op_put_fl_round", fl_round),
        op("op_insert_fl_update", FLUpdateRecord("round-1", "p-1", 10, {"w": [1.0]}, "rest", now)),
        op("op_insert_fl_model", 1, "round-1", {"w": [1.0]}, now),
    ]
    return ops, used


async def _contents(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the tables the writes touch (generated ids left out), in a stable order."""
    out = {}
    async with store.connection() as conn:
        for table in TABLES:
            rows = await conn.fetch(f"SELECT * FROM {table}")
            out[table] = sorted(tuple((k, repr(v)) for k, v in dict(r).items() if k != "id") for r in rows)
    return out


async def test_every_write_applied_again_changes_nothing_and_raises_nothing(store: Store) -> None:
    ops, used = _every_kind_of_write(store)
    builders = {name for name in dir(store) if name.startswith(("op_", "ops_"))}
    assert used == builders, f"writes this test does not repeat: {sorted(builders - used)}"
    await store.apply(ops)
    once = await _contents(store)
    assert len(once["tasks"]) == 1 and len(once["task_events"]) == 2 and len(once["task_metrics"]) == 1
    # The first module went with the last task that had it (`gone`); the one `running` set stays.
    assert once["modules"] == [(("digest", repr("sha256:" + "b" * 64)), ("data", repr(b"\0asm\x01\0\0\0\0\x01")))]
    await store.apply(ops)  # the retry of a batch whose COMMIT succeeded unseen
    assert await _contents(store) == once


async def test_a_task_another_write_created_with_the_same_id_is_still_refused(store: Store) -> None:
    # The repeat of one's own insert is a no-op; an insert of another task under an existing id (two
    # API calls choosing one id at once) must still fail, so the second caller is told.
    first = _task()
    await store.apply([store.op_insert_task(first)])
    other = _task(id=first.id, name="mul", created_at=first.created_at + timedelta(milliseconds=1))
    with pytest.raises(Exception) as refused:
        await store.apply([store.op_insert_task(other)])
    assert not store.is_transient(refused.value)
    got = await store.get_task(first.id)
    assert got is not None and got.name == "add"


async def test_events_built_twice_are_two_rows(store: Store) -> None:
    # Only a repeat of the same write is a no-op: the same event recorded twice (two results alike)
    # is two rows, as before.
    task = _task()
    now = datetime.now(UTC)
    event = TaskEvent(task.id, TaskState.COMPLETED, now, 1, "p-1", "")
    await store.apply([store.op_insert_task(task), store.op_task_event(event), store.op_task_event(event)])
    assert len(await store.task_events(task.id)) == 2


class _CommitCutter(TcpProxy):
    """A TCP proxy in front of PostgreSQL that, once armed, closes the client's connection right after
    the server's `COMMIT` CommandComplete, without passing it on: the transaction is committed, and
    the client sees its connection lost during COMMIT."""

    COMMIT_DONE = b"C\x00\x00\x00\x0bCOMMIT\x00"

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self.armed = False
        self.cuts = 0

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            await asyncio.gather(self._pipe(client_r, server_w, watch=False),
                                 self._pipe(server_r, client_w, watch=True))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (client_w, server_w):
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, watch: bool) -> None:
        while data := await reader.read(65536):
            if watch and self.armed and self.COMMIT_DONE in data:
                self.armed = False
                self.cuts += 1
                raise ConnectionError("cut after COMMIT")
            writer.write(data)
            await writer.drain()
        raise ConnectionError("closed")


def _through(dsn: str, port: int) -> str:
    """`dsn` by way of the proxy on `port`, without TLS (the proxy reads the protocol in clear)."""
    parts = urlsplit(dsn)
    netloc = parts.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "sslmode=disable", ""))


@contextlib.asynccontextmanager
async def _writer_behind_cutter(dsn: str, **writer_options: Any) -> AsyncIterator[
        tuple[_CommitCutter, PostgresStore, StoreWriter]]:
    """A migrated store on `dsn` by way of a _CommitCutter, and a running writer in front of it."""
    cutter = _CommitCutter(urlsplit(dsn).port or 5432)
    store = PostgresStore(_through(dsn, await cutter.start()))
    await store.open()
    await migrate(store)
    writer = StoreWriter(store, **writer_options)
    runner = asyncio.create_task(writer.run())
    try:
        yield cutter, store, writer
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await store.close()
        await cutter.close()


async def test_a_batch_whose_commit_answer_was_lost_is_stored_once_and_refused_to_nobody(pg_dsn: str) -> None:
    """Before: the retried batch hit the task's primary key, so the caller that created the task was
    told the write was refused (and the task existed), and its events were stored twice."""
    async with _writer_behind_cutter(pg_dsn) as (cutter, store, writer):
        tasks = [_task() for _ in range(300)]
        now = datetime.now(UTC)
        cutter.armed = True
        waits = [await writer.enqueue(store.op_insert_task(t),
                                      store.op_task_event(TaskEvent(t.id, TaskState.PENDING, now, 0, "", "created")),
                                      store.op_task_metrics(TaskMetrics(t.id, "p-1", now, {"n": 1})))
                 for t in tasks]
        results = await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), 30)
        assert cutter.cuts == 1, "the proxy never saw the COMMIT it was to cut"
        refused = [r for r in results if isinstance(r, BaseException)]
        assert not refused, refused[:3]
        assert writer.stats.failures == 0 and writer.stats.outages == 1
        async with store.connection() as conn:
            counts = [(await conn.fetch(f"SELECT count(*), count(DISTINCT task_id) FROM {table}"))[0]
                      for table in ("task_events", "task_metrics")]
            assert (await conn.fetch("SELECT count(*) FROM tasks"))[0][0] == 300
        assert [tuple(c) for c in counts] == [(300, 300), (300, 300)]


async def test_a_write_whose_commit_answer_was_lost_is_not_given_up_as_not_stored(pg_dsn: str) -> None:
    """A write the writer gives up during an outage is reported "not stored" (StoreUnavailable). One
    whose COMMIT was sent and whose answer was lost may be stored: it must not be reported so, but
    waits until a retry settles it. Before: given up at the first retry past its patience, its caller
    was told it was not stored, and the task was in the database."""
    # awaited_patience 0: every awaited write is overdue at once.
    async with _writer_behind_cutter(pg_dsn, awaited_patience=0.0) as (cutter, store, writer):
        task = _task()
        cutter.armed = True
        result = await asyncio.wait_for(asyncio.gather(await writer.enqueue(store.op_insert_task(task)),
                                                       return_exceptions=True), 30)
        assert cutter.cuts == 1, "the proxy never saw the COMMIT it was to cut"
        async with store.connection() as conn:
            stored = (await conn.fetch("SELECT count(*) FROM tasks WHERE id = $1", (task.id,)))[0][0]
        assert stored == 1
        assert result == [None], f"the caller was told {result[0]!r}, but the task was stored"
        assert writer.stats.abandoned == 0


async def test_two_stores_in_one_process_never_give_two_rows_one_id(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Row ids came from a counter of each store, started at the clock: two stores started in the
    same microsecond (tests open several, on one database at times) gave the same ids, and the second
    row was dropped by ON CONFLICT (id) DO NOTHING without a word. The clock is held still here to
    make that microsecond certain."""
    from core.store import base
    from core.store.sqlite import SqliteStore

    monkeypatch.setattr(base.time, "time_ns", lambda: 1_700_000_000_000_000_000)
    first, second = SqliteStore(tmp_path / "one.db"), SqliteStore(tmp_path / "one.db")
    await first.open()
    await second.open()
    try:
        await migrate(first)
        task = _task()
        await first.apply([first.op_insert_task(task)])
        now = datetime.now(UTC)
        await first.apply([first.op_task_event(TaskEvent(task.id, TaskState.PENDING, now, 0, "", "first"))])
        await second.apply([second.op_task_event(TaskEvent(task.id, TaskState.SCHEDULED, now, 0, "", "second"))])
        assert [e.detail for e in await first.task_events(task.id)] == ["first", "second"]
    finally:
        await first.close()
        await second.close()


async def test_a_commit_asyncpg_loses_step_with_is_retried_not_refused(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL shutting down under a batch left asyncpg's protocol out of step, and its COMMIT
    raised InternalClientError ("cannot switch to state 15; another operation (2) is in progress"),
    which was taken for a refusal: the batch (a task's `running` event) was dropped, seen once in the
    fault test that stops the server mid-run. The batch may have been stored: it is tried again."""
    real_commit = asyncpg.transaction.Transaction.commit
    broken: list[bool] = []

    async def commit_then_lose_step(self: Any) -> None:
        await real_commit(self)
        if not broken:
            broken.append(True)
            raise asyncpg.exceptions.InternalClientError(
                "cannot switch to state 15; another operation (2) is in progress")

    async with _writer_behind_cutter(pg_dsn) as (_, store, writer):
        monkeypatch.setattr(asyncpg.transaction.Transaction, "commit", commit_then_lose_step)
        task = _task()
        event = TaskEvent(task.id, TaskState.RUNNING, datetime.now(UTC), 1, "p-1", "running")
        await asyncio.wait_for(writer.write(store.op_insert_task(task), store.op_task_event(event)), 30)
        assert broken and writer.stats.failures == 0
        async with store.connection() as conn:
            assert (await conn.fetch("SELECT count(*) FROM task_events WHERE task_id = $1", (task.id,)))[0][0] == 1
