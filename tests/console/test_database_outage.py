"""The console while the manager's PostgreSQL server is away: the header and the dashboard say the
database is unreachable, and stop saying so once it is back (a failed read of the task counts used
to end the loop that follows the core, freezing the status)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from core.store.base import WriteOp
from tests.console.conftest import until
from tests.services import PrivatePostgres, private_postgres

pytestmark = [pytest.mark.serial]


@pytest.fixture
def server() -> Iterator[PrivatePostgres]:
    with private_postgres() as pg:
        yield pg


async def test_an_unreachable_database_shows_on_the_header_and_dashboard(console: Any,
                                                                          server: PrivatePostgres) -> None:
    from textual.widgets import Static

    from console.widgets import FleetHeader

    on_postgres = {"storage_type": "postgres", "postgres_host": "127.0.0.1", "postgres_port": server.port,
                   "postgres_user": "postgres", "postgres_db": "postgres"}
    async with console(manager=on_postgres) as (app, pilot, core):
        def services() -> str:
            return " ".join(str(app.screen.query_one("#dash-services", Static).render()).split())

        def header() -> str:
            return str(app.screen.query_one(FleetHeader).text)

        assert "unreachable" not in services()
        await asyncio.to_thread(server.stop, "fast")
        # Any write finds the server gone: the next heartbeat's, or this one.
        await core.writer.submit(WriteOp("UPDATE tasks SET name = name WHERE id = ?", ("none",)))
        await until(pilot, lambda: "unreachable" in services(), timeout=15)
        assert "database:" in services(), services()  # the reason, under the panel
        assert "unreachable" in header(), header()
        # The task counts are read from the database every 2 s: such a read failed meanwhile.
        await asyncio.sleep(2.5)
        assert "unreachable" in services()
        await asyncio.to_thread(server.start)
        await until(pilot, lambda: "unreachable" not in services(), timeout=15)
        assert "unreachable" not in header()
