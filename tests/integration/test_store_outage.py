"""The store writer against a database that goes away and comes back: a PostgreSQL server of the
test's own, stopped and started (tests.services.PrivatePostgres), and a SQLite file another
connection holds locked."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.config import ManagerSettings
from core.domain import TaskState
from core.schemas import TaskCreate
from core.service import ManagerCore
from core.store.base import Store, StoreUnavailable, WriteOp
from core.store.migrate import migrate
from core.store.postgres import PostgresStore
from core.store.sqlite import SqliteStore
from core.store.writer import StoreWriter
from proplet.agent import PropletAgent
from proplet.config import PropletSettings
from tests.conftest import unique
from tests.services import Mosquitto, PrivatePostgres
from tests.wasmfixtures import wasm
from tests.wire import eventually

pytestmark = [pytest.mark.serial]

INSERT = "INSERT INTO outage_probe (n) VALUES (?)"


@pytest.fixture
async def postgres(private_pg: PrivatePostgres) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(private_pg.dsn)
    await store.open()
    await migrate(store)
    async with store.transaction() as conn:
        await conn.execute("CREATE TABLE outage_probe (id BIGSERIAL PRIMARY KEY, n INTEGER NOT NULL UNIQUE)")
    try:
        yield store
    finally:
        await store.close()


async def _probe(store: Store) -> list[int]:
    async with store.connection() as conn:
        return [row[0] for row in await conn.fetch("SELECT n FROM outage_probe ORDER BY id")]


@contextlib.asynccontextmanager
async def _writing(writer: StoreWriter) -> AsyncIterator[None]:
    """The writer's loop runs for the block (as ManagerCore runs it)."""
    runner = asyncio.create_task(writer.run())
    try:
        yield
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner


async def test_writes_queued_while_postgres_is_down_are_committed_in_order_once_it_is_back(
        private_pg: PrivatePostgres, postgres: PostgresStore) -> None:
    writer = StoreWriter(postgres)
    async with _writing(writer):
        await writer.submit(WriteOp(INSERT, (0,)))
        await writer.wait_idle()
        await asyncio.to_thread(private_pg.stop, "fast")
        for n in range(1, 51):
            await writer.submit(WriteOp(INSERT, (n,)))
        await eventually(lambda: not writer.reachable, 5)
        await asyncio.sleep(1.0)
        assert writer.backlog > 0 and writer.stats.failures == 0
        await asyncio.to_thread(private_pg.start)
        await asyncio.wait_for(writer.wait_idle(), 10)
        assert writer.reachable and writer.unreachable_reason == ""
        # The pool replaced its dead connections by itself: reads work again too.
        assert await _probe(postgres) == list(range(51))
    assert (writer.stats.outages, writer.stats.failures, writer.stats.abandoned) == (1, 0, 0)
    assert writer.stats.retries >= 1 and writer.stats.longest_outage_s >= 1.0


async def test_an_awaited_write_is_given_up_after_its_patience_and_never_applied(
        private_pg: PrivatePostgres, postgres: PostgresStore) -> None:
    writer = StoreWriter(postgres, awaited_patience=0.5)
    async with _writing(writer):
        await asyncio.to_thread(private_pg.stop, "fast")
        awaited = await writer.enqueue(WriteOp(INSERT, (1,)))
        await writer.submit(WriteOp(INSERT, (2,)))
        with pytest.raises(StoreUnavailable, match="unreachable"):
            await asyncio.wait_for(awaited, 5)
        await asyncio.to_thread(private_pg.start)
        await asyncio.wait_for(writer.wait_idle(), 10)
        assert await _probe(postgres) == [2]
    assert writer.stats.abandoned == 1 and writer.stats.failures == 0


async def test_a_read_while_postgres_is_down_says_the_database_is_unreachable(
        private_pg: PrivatePostgres, postgres: PostgresStore) -> None:
    await asyncio.to_thread(private_pg.stop, "fast")
    with pytest.raises(StoreUnavailable, match="cannot be reached"):
        await postgres.count_tasks_by_state()
    await asyncio.to_thread(private_pg.start)
    assert await postgres.count_tasks_by_state() is not None


async def test_a_refused_write_is_not_retried_and_the_rest_of_its_batch_commits(postgres: PostgresStore) -> None:
    writer = StoreWriter(postgres)
    async with _writing(writer):
        first = await writer.enqueue(WriteOp(INSERT, (1,)))
        again = await writer.enqueue(WriteOp(INSERT, (1,)))  # a unique violation: refused, not unreachable
        third = await writer.enqueue(WriteOp(INSERT, (3,)))
        await first
        with pytest.raises(Exception, match="refused"):
            await again
        await third
        assert await _probe(postgres) == [1, 3]
    assert writer.stats.failures == 1 and writer.stats.outages == 0 and writer.reachable


async def test_writes_wait_while_another_process_holds_the_sqlite_file_locked(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.db")
    await store.open()
    await migrate(store)
    async with store.transaction() as conn:
        await conn.execute("CREATE TABLE outage_probe (id INTEGER PRIMARY KEY, n INTEGER NOT NULL UNIQUE)")
    writer = StoreWriter(store)
    other = sqlite3.connect(tmp_path / "store.db", timeout=0, isolation_level=None)
    try:
        async with _writing(writer):
            other.execute("BEGIN EXCLUSIVE")
            await writer.submit(WriteOp(INSERT, (1,)))
            # SQLite's busy timeout (5 s) runs out first; then the writer retries.
            await eventually(lambda: not writer.reachable, 15)
            other.execute("COMMIT")
            await asyncio.wait_for(writer.wait_idle(), 10)
            assert writer.reachable and await _probe(store) == [1]
    finally:
        other.close()
        await store.close()
    assert writer.stats.outages == 1 and writer.stats.failures == 0


async def test_a_queued_task_whose_module_cannot_be_read_waits_for_the_database(
        private_pg: PrivatePostgres, broker: Mosquitto, tmp_path: Path) -> None:
    """Before: a task queued while no proplet was free, dispatched during an outage to a manager that
    did not hold its module in memory (here: restarted since), read the module from the database;
    the read's error ended the dispatcher loop, which shut the manager down. Now the task stays
    queued, saying why, and goes out once the database answers again."""
    settings = ManagerSettings(mqtt_address=broker.url, tenant_id=unique("t"), entity_id=unique("manager"),
                               http_port=0, mqtt_timeout=5.0)
    async with ManagerCore(settings, store=PostgresStore(private_pg.dsn)) as core:
        task = await core.create_task(TaskCreate.model_validate(
            {"name": "add", "file": base64.b64encode(wasm("add")).decode(), "inputs": [20, 22]}))
        await core.start_task(task.id)  # no proplet: it waits in the queue
    async with ManagerCore(settings, store=PostgresStore(private_pg.dsn)) as core:
        assert core.bus is not None
        await core.bus.wait_connected(10)
        assert task.id in core.active
        await asyncio.to_thread(private_pg.stop, "fast")
        proplet = PropletSettings.load(mqtt_address=broker.url, tenant_id=settings.tenant_id,
                                       channel_id=core.topics.channel, entity_id=unique("p"),
                                       cache_dir=tmp_path / "cache", state_dir=tmp_path / "state")
        async with PropletAgent(proplet):
            await eventually(lambda: proplet.entity_id in core.proplets and core.proplets[proplet.entity_id].online, 10)
            await eventually(lambda: "database" in core.active[task.id].reason, 10)
            assert not core._shutdown.is_set(), "the manager is shutting down"
            assert core.active[task.id].state is TaskState.PENDING
            await asyncio.to_thread(private_pg.start)
            await eventually(lambda: task.id not in core.active, 20)
        assert not core._shutdown.is_set()
        done = await core.get_task(task.id)
        assert (done.state, done.results) == (TaskState.COMPLETED, "42")


async def test_health_says_the_store_is_disconnected_while_postgres_is_down_with_no_write_under_way(
        private_pg: PrivatePostgres, broker: Mosquitto) -> None:
    """/health's store_connected came from the writer alone: an idle manager (nothing to write) whose
    database was down said store_connected: true while every read answered 503. The manager's lock
    connection, checked by the database-lock loop, tells it too."""
    settings = ManagerSettings(mqtt_address=broker.url, tenant_id=unique("t"), entity_id=unique("manager"),
                               http_port=0, mqtt_timeout=5.0)
    async with ManagerCore(settings, store=PostgresStore(private_pg.dsn, one_manager=True)) as core:
        assert core.status().store_connected
        await asyncio.to_thread(private_pg.stop, "fast")
        with pytest.raises(StoreUnavailable):
            await core.store.list_jobs(0, 10)
        await eventually(lambda: not core.status().store_connected, 10)
        assert core.status().store_error, "no reason given"
        await asyncio.to_thread(private_pg.start)
        await eventually(lambda: core.status().store_connected, 20)
