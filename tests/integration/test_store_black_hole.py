"""A PostgreSQL connection that silently stops answering (a network partition, a NAT that dropped
its state, a host that vanished: no RST, no FIN) is taken for lost within a bound, and the manager
treats it as any other outage.

A TCP proxy in front of the shared PostgreSQL server stops forwarding, both ways and for every
connection, without closing anything: what the manager sends goes nowhere and nothing comes back,
as on a partitioned network. When it forwards again, what was held is delivered (TCP retransmits),
but a connection the manager gave up during the cut stays open on the server's side, as a server
keeps a session whose client vanished until its own TCP keepalive gives up (two hours by default):
that session still holds the manager's lock."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import pytest

from core.config import ManagerSettings
from core.domain import TaskEvent, TaskState
from core.service import ManagerCore
from core.store.postgres import ANSWER_TIMEOUT, LOCK_CHECK_INTERVAL, PostgresStore
from tests.conftest import unique
from tests.integration.test_store_replay import _task, _through
from tests.services import Mosquitto, TcpProxy
from tests.wire import eventually

pytestmark = [pytest.mark.serial, pytest.mark.slow]

# The documented bound (docs/reliability.md): a statement under way is given up after ANSWER_TIMEOUT;
# an idle manager's lock connection is checked every LOCK_CHECK_INTERVAL with the same timeout.
DETECTION_BOUND = LOCK_CHECK_INTERVAL + ANSWER_TIMEOUT
# For a loaded test machine: how late the event loop may get round to noticing.
SLACK = 2.0


class _BlackHole(TcpProxy):
    """A TCP proxy that, while cut, forwards nothing either way and closes nothing; see the module's
    docstring for what happens when it forwards again."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self._forwarding = asyncio.Event()
        self._forwarding.set()
        self._kept: list[asyncio.StreamWriter] = []
        # What each link's reader got during the cut, by the writer it goes to.
        self._held: dict[asyncio.StreamWriter, bytearray] = {}

    def cut(self) -> None:
        self._forwarding.clear()

    def heal(self) -> None:
        for writer, held in self._held.items():
            if held:
                writer.write(bytes(held))
                held.clear()
        self._forwarding.set()

    async def close(self) -> None:
        await super().close()
        for writer in self._kept:
            writer.transport.abort()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_w: asyncio.StreamWriter | None = None
        keep_server_side = False
        try:
            await self._forwarding.wait()  # a connection attempt during the cut gets no answer
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            upward = asyncio.create_task(self._pipe(client_r, server_w))
            downward = asyncio.create_task(self._pipe(server_r, client_w))
            done, pending = await asyncio.wait((upward, downward), return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            # The client went away while the cut was on: the server never hears of it.
            keep_server_side = upward in done and upward.result()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass  # the proxy's end (close) cancels its links: not an error of theirs
        finally:
            client_w.transport.abort()
            if server_w is not None:
                if keep_server_side:
                    self._kept.append(server_w)
                else:
                    server_w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Forward until the end of `reader`; True when that end came during a cut: then what was held
        is dropped and the far side hears nothing (the sender's kernel gave up retransmitting, and
        its FIN or RST was lost in the partition too)."""
        held = self._held.setdefault(writer, bytearray())
        try:
            while True:
                try:
                    data = await reader.read(65536)
                except ConnectionError:
                    data = b""
                if not self._forwarding.is_set():
                    if not data:
                        return True
                    held += data  # sent on by heal(), before anything read after it
                    continue
                if not data:
                    return False
                writer.write(data)
                await writer.drain()
        finally:
            self._held.pop(writer, None)


@contextlib.asynccontextmanager
async def _manager_behind(hole: _BlackHole, dsn: str, broker: Mosquitto) -> AsyncIterator[ManagerCore]:
    settings = ManagerSettings(mqtt_address=broker.url, tenant_id=unique("t"), entity_id=unique("manager"),
                               http_port=0, mqtt_timeout=5.0)
    store = PostgresStore(_through(dsn, await hole.start()), one_manager=True)
    async with ManagerCore(settings, store=store) as core:
        assert core.bus is not None
        await core.bus.wait_connected(10)
        yield core


async def test_a_connection_that_stops_answering_is_an_outage_within_the_bound_and_loses_nothing(
        pg_dsn: str, broker: Mosquitto) -> None:
    """Before: the batch under way waited on the silent socket for as long as the kernel retransmits
    (about 15 minutes); the lock's check skipped the connection that batch held, so /health said
    store_connected for the whole cut, and every write stayed queued behind the stalled batch."""
    hole = _BlackHole(urlsplit(pg_dsn).port or 5432)
    try:
        async with _manager_behind(hole, pg_dsn, broker) as core:
            store, writer = core.store, core.writer
            now = datetime.now(UTC)

            def write(task: Any) -> list[Any]:
                return [store.op_insert_task(task),
                        store.op_task_event(TaskEvent(task.id, TaskState.PENDING, now, 0, "", "created"))]

            before = [_task() for _ in range(20)]
            for task in before:
                await writer.submit(*write(task))
            await asyncio.wait_for(writer.wait_idle(), 10)
            assert core.status().store_connected

            hole.cut()
            cut_at = time.monotonic()
            during = [_task() for _ in range(200)]
            try:
                for task in during:  # the first batch goes out at once, into the hole
                    await writer.submit(*write(task))
                await eventually(lambda: not core.status().store_connected, DETECTION_BOUND + SLACK, 0.05)
                detected_s = time.monotonic() - cut_at
                status = core.status()
                assert status.store_error, "no reason given"
                assert writer.stats.outages == 1 and writer.stats.failures == 0
                await asyncio.sleep(3.0)  # the cut goes on: writes wait, none is refused
                assert writer.backlog > 0 and writer.stats.failures == 0
            finally:
                hole.heal()  # also after a failed check: the manager's stop must not wait on the hole
            healed_at = time.monotonic()
            await eventually(lambda: core.status().store_connected and not writer.backlog, 20, 0.05)
            back_s = time.monotonic() - healed_at
            assert not core._shutdown.is_set(), "the manager stopped (it took its own old session for another manager)"

            async with store.connection() as conn:
                ids = [t.id for t in before + during]
                tasks = (await conn.fetch("SELECT count(*) FROM tasks WHERE id = ANY(?::text[])", (ids,)))[0][0]
                events = await conn.fetch(
                    "SELECT count(*), count(DISTINCT task_id) FROM task_events WHERE task_id = ANY(?::text[])",
                    (ids,))
            assert tasks == 220
            assert tuple(events[0]) == (220, 220)
            print(f"\nFAULT postgres black hole: detected_s={detected_s:.1f}, bound_s={DETECTION_BOUND:.0f}, "
                  f"store_error={status.store_error!r}, stored_again_s={back_s:.1f}, "
                  f"outages={writer.stats.outages}, retries={writer.stats.retries}")
    finally:
        await hole.close()
