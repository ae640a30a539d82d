"""One manager per PostgreSQL database: a manager holds a session-level advisory lock on its database
for its life, so a second manager (on this host or another) refuses to start naming the first, and a
manager that lost the lock with its connection takes it again, or stops if another manager took it
meanwhile. Real PostgreSQL (the shared server, and a private one the test stops and starts) and a
real Mosquitto."""

from __future__ import annotations

import asyncio
import base64
import os
import socket

import asyncpg
import pytest

from core.config import ManagerSettings
from core.domain import Task
from core.schemas import TaskCreate
from core.service import ManagerCore
from core.store.base import StoreError, WriteOp
from core.store.migrate import migrate
from core.store.postgres import _MANAGER_LOCK_KEY, PostgresStore
from tests.conftest import unique
from tests.services import Mosquitto, PrivatePostgres
from tests.wasmfixtures import wasm
from tests.wire import eventually

pytestmark = [pytest.mark.serial]


def _settings(broker: Mosquitto) -> ManagerSettings:
    return ManagerSettings(mqtt_address=broker.url, tenant_id=unique("t"), entity_id=unique("manager"),
                           http_port=0, mqtt_timeout=5.0)


def _add_task() -> TaskCreate:
    return TaskCreate.model_validate({"name": "add", "file": base64.b64encode(wasm("add")).decode(),
                                      "inputs": [20, 22]})


async def test_a_second_manager_on_the_same_postgres_database_refuses_to_start_naming_the_first(
        broker: Mosquitto, pg_dsn: str) -> None:
    """Before, both ran: each recovered and dispatched the same queued tasks."""
    async with ManagerCore(_settings(broker), store=PostgresStore(pg_dsn, one_manager=True)) as first:
        second = ManagerCore(_settings(broker), store=PostgresStore(pg_dsn, one_manager=True))
        with pytest.raises(StoreError) as refused:
            await second.__aenter__()
        message = str(refused.value)
        assert "Another Propeller manager is using the database" in message, message
        assert f"pid {os.getpid()} on {socket.gethostname()}" in message, message
        assert "MANAGER_POSTGRES_DB" in message and "MANAGER_ENTITY_ID" in message, message
        # The refused one left no connection behind, and the first works on.
        task = await first.create_task(_add_task())
        assert (await first.get_task(task.id)).name == "add"
    # Once the first has stopped, the lock is free again.
    async with ManagerCore(_settings(broker), store=PostgresStore(pg_dsn, one_manager=True)) as third:
        assert await third.get_task(task.id) is not None


async def test_the_lock_is_taken_again_after_the_postgres_server_restarts(
        broker: Mosquitto, private_pg: PrivatePostgres) -> None:
    store = PostgresStore(private_pg.dsn, one_manager=True)
    async with ManagerCore(_settings(broker), store=store) as core:
        await asyncio.to_thread(private_pg.stop, "fast")  # ends every session, the lock's too
        await eventually(lambda: not store.holds_manager_lock, 5)
        await asyncio.to_thread(private_pg.start)
        await eventually(lambda: store.holds_manager_lock, 15)
        # It holds the lock again: another manager is refused, and this one stores as before.
        with pytest.raises(StoreError, match="Another Propeller manager is using the database"):
            await PostgresStore(private_pg.dsn, one_manager=True).open()
        task = await asyncio.wait_for(core.create_task(_add_task()), 15)
        assert (await core.get_task(task.id)).name == "add"
        assert core.taken_over is None and not core._shutdown.is_set()


async def test_a_manager_whose_lock_another_manager_took_while_it_was_cut_off_stops_and_stores_nothing(
        broker: Mosquitto, private_pg: PrivatePostgres) -> None:
    """The lock's session is ended from the server (as a restart, an idle-session killer or a failover
    does) while another manager waits for the lock, so that one gets it first: this one must not run
    on as a second manager, nor write what it queued meanwhile into the other one's database."""
    store = PostgresStore(private_pg.dsn, one_manager=True)
    core = ManagerCore(_settings(broker), store=store)
    orphan = Task(id=unique("orphan"), name="add")
    other = await asyncpg.connect(private_pg.dsn, server_settings={
        "application_name": "pid 4242 on other-host (propeller serve)"})
    try:
        async with core:
            assert store._lock_conn is not None
            lock_pid = store._lock_conn.get_server_pid()
            waiting = asyncio.ensure_future(other.execute("SELECT pg_advisory_lock($1)", _MANAGER_LOCK_KEY))
            admin = await asyncpg.connect(private_pg.dsn)
            try:
                await eventually(lambda: _lock_waiters(admin), 5)
                assert await admin.fetchval("SELECT pg_terminate_backend($1, 5000)", lock_pid)
            finally:
                await admin.close()
            await asyncio.wait_for(waiting, 5)  # the other manager holds it
            await core.writer.submit(store.op_insert_task(orphan))
            await asyncio.wait_for(core.wait_closed(), 20)
            assert core.taken_over is not None
            message = str(core.taken_over)
            assert "Another Propeller manager took the database" in message, message
            assert "pid 4242 on other-host (propeller serve)" in message, message
        assert await other.fetchval("SELECT count(*) FROM tasks WHERE id = $1", orphan.id) == 0
    finally:
        await other.close()


async def _lock_waiters(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"))


async def test_a_batch_under_way_when_the_lock_is_lost_and_taken_by_another_manager_is_not_committed(
        pg_dsn: str) -> None:
    """The lock's session ends while a batch runs (its statements were sent after apply() found the
    lock held) and another manager takes the lock before the batch's COMMIT: the batch must not be
    committed into the database the other manager now owns. Before: the batch ran on a pool
    connection, whose session knows nothing of the lock, and committed (the task row was there)."""
    store = PostgresStore(pg_dsn, one_manager=True)
    await store.open()
    other = await asyncpg.connect(pg_dsn)
    admin = await asyncpg.connect(pg_dsn)
    try:
        await migrate(store)
        assert store._lock_conn is not None
        lock_pid = store._lock_conn.get_server_pid()
        orphan = Task(id=unique("orphan"), name="add")
        waiting = asyncio.ensure_future(other.execute("SELECT pg_advisory_lock($1)", _MANAGER_LOCK_KEY))
        await eventually(lambda: _lock_waiters(admin), 5)
        # A batch whose statements take a second: the lock is lost and taken by `other` meanwhile.
        batch = asyncio.ensure_future(store.apply([
            store.op_insert_task(orphan), WriteOp("SELECT pg_sleep(1)", (), phase=4)]))
        await asyncio.sleep(0.3)
        assert not batch.done()
        assert await admin.fetchval("SELECT pg_terminate_backend($1, 5000)", lock_pid)
        await asyncio.wait_for(waiting, 5)  # the other manager holds the lock before the COMMIT
        with pytest.raises(Exception) as failed:
            await asyncio.wait_for(batch, 10)
        assert store.is_transient(failed.value), failed.value
        assert await admin.fetchval("SELECT count(*) FROM tasks WHERE id = $1", orphan.id) == 0
    finally:
        await other.close()
        await admin.close()
        await store.close()


class _HolderLetsGo(PostgresStore):
    """A store whose first look-up of the lock's holder comes just after that holder let go: the
    holder's session (`holder`) releases the lock first, as a session that is ending does."""

    def __init__(self, dsn: str, holder: asyncpg.Connection) -> None:
        super().__init__(dsn, one_manager=True)
        self.holder: asyncpg.Connection | None = holder
        self.lookups = 0

    async def _lock_holder(self, conn: asyncpg.Connection) -> list:
        self.lookups += 1
        if self.holder is not None:
            assert await self.holder.fetchval("SELECT pg_advisory_unlock($1)", _MANAGER_LOCK_KEY)
            self.holder = None
        return await super()._lock_holder(conn)


async def test_a_lock_let_go_between_the_attempt_and_the_look_up_of_its_holder_is_taken(
        broker: Mosquitto, private_pg: PrivatePostgres) -> None:
    """Before, the empty look-up read as "another manager holds it": a manager refused to start, and a
    running one whose lock's connection had been replaced (its own earlier session still ending)
    stopped as taken over, closing its API under its clients."""
    other = await asyncpg.connect(private_pg.dsn)
    admin = await asyncpg.connect(private_pg.dsn)
    try:
        # At start-up.
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", _MANAGER_LOCK_KEY)
        store = _HolderLetsGo(private_pg.dsn, other)
        async with ManagerCore(_settings(broker), store=store) as core:
            assert store.holds_manager_lock and store.lookups == 1
            # Running: the lock's session ends, a session that was waiting takes the lock and lets go of
            # it just after this manager's next attempt.
            assert store._lock_conn is not None
            lock_pid = store._lock_conn.get_server_pid()
            waiting = asyncio.ensure_future(other.execute("SELECT pg_advisory_lock($1)", _MANAGER_LOCK_KEY))
            await eventually(lambda: _lock_waiters(admin), 5)
            store.holder = other
            assert await admin.fetchval("SELECT pg_terminate_backend($1, 5000)", lock_pid)
            await asyncio.wait_for(waiting, 5)
            await eventually(lambda: store.holds_manager_lock, 10)
            assert store.lookups == 2 and store.holder is None
            assert core.taken_over is None and not core._shutdown.is_set()
            task = await asyncio.wait_for(core.create_task(_add_task()), 15)
            assert (await core.get_task(task.id)).name == "add"
            assert store._lock_conn is not None
            assert store._lock_conn.get_server_pid() != lock_pid
    finally:
        await other.close()
        await admin.close()
